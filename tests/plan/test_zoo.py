"""Built-in models and the model specs ``fedleak check --model`` reads."""

from __future__ import annotations

import re
import textwrap

import pytest
import torch
import user_models
from safetensors.torch import save_file

import fedleak
from fedleak.models import BUILTIN_MODELS, FlowerNet
from fedleak.models.catalog import MODEL_CATALOG


def test_the_cli_lists_every_built_in_model():
    assert {entry.name for entry in MODEL_CATALOG} == set(BUILTIN_MODELS.names()) == set(fedleak.available_models())


@pytest.mark.parametrize("name", sorted(BUILTIN_MODELS.names()))
def test_built_in_models_are_seeded_and_read_by_the_exact_route(name):
    a, b = fedleak.load_model(name), fedleak.load_model(name)
    assert all(torch.equal(p, q) for p, q in zip(a.module.parameters(), b.module.parameters()))
    assert not any(torch.equal(p, q) for p, q in zip(a.module.parameters(), fedleak.load_model(name, seed=1).module
                                                     .parameters()) if p.numel() > 1)
    net = fedleak.as_network(a.module, input_shape=a.input_shape)
    assert net.input_shape == a.input_shape and a.data in fedleak.available_datasets()
    assert not a.module.training


def test_flower_cnn_is_flowers_net():
    ours, theirs = FlowerNet(), user_models.FlowerNet()
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    theirs.load_state_dict(ours.state_dict())
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(ours(x), theirs(x))


def test_a_users_class_file_with_weights(tmp_path):
    source = tmp_path / "my_net.py"
    source.write_text(textwrap.dedent("""
        import torch.nn as nn
        import torch.nn.functional as F
        from helper import WIDTH  # a module next to the file, as a script would import it

        class Net(nn.Module):
            def __init__(self, width=WIDTH):
                super().__init__()
                self.fc1 = nn.Linear(64, width)
                self.fc2 = nn.Linear(width, 10)

            def forward(self, x):
                return self.fc2(F.relu(self.fc1(x.flatten(1))))
        """))
    (tmp_path / "helper.py").write_text("WIDTH = 32\n")
    loaded = fedleak.load_model(f"{source}:Net")
    assert loaded.name == "Net" and "my_net.py" in loaded.source and loaded.module.fc1.out_features == 32
    state = {k: torch.full_like(v, 0.01) for k, v in loaded.module.state_dict().items()}
    save_file(state, str(tmp_path / "w.safetensors"))
    with_weights = fedleak.load_model(f"{source}:Net", weights=tmp_path / "w.safetensors")
    assert torch.all(with_weights.module.fc1.weight == 0.01)


def test_a_model_function_or_a_model_the_file_builds(tmp_path):
    """Users' files often build the model in a function (``get_model()``) or at module level (``model = Net()``):
    both are models, seeded like a class (the file runs under the seed)."""
    source = tmp_path / "task.py"
    source.write_text(textwrap.dedent("""
        import torch.nn as nn

        def get_model(width=16):
            return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.ReLU(), nn.Linear(width, 10))

        model = get_model(8)

        if __name__ == "__main__":
            raise SystemExit("training would start here")
        """))
    made = fedleak.load_model(f"{source}:get_model", seed=3)
    built = fedleak.load_model(f"{source}:model", seed=3)
    assert made.module[1].out_features == 16 and built.module[1].out_features == 8
    assert "function get_model" in made.source and "module model" in built.source
    assert not made.module.training and not built.module.training
    again, other = (fedleak.load_model(f"{source}:model", seed=s).module for s in (3, 4))
    assert torch.equal(again[1].weight, built.module[1].weight)
    assert not torch.equal(other[1].weight, built.module[1].weight)
    assert torch.equal(fedleak.load_model(f"{source}:get_model", seed=3).module[1].weight, made.module[1].weight)


@pytest.mark.parametrize("spec, message", [
    ("no-such-model", "unknown model 'no-such-model'"),
    ("/no/such/file.py:Net", "model file not found"),
    ("{tmp}/bad.py:Net", "running"),
    ("{tmp}/ok.py:Missing", "defines no nn.Module class, model function or module 'Missing'; it defines "
                            "NeedsArgs, Net, factory, not_a_model"),
    ("{tmp}/ok.py:NeedsArgs", "cannot be built without arguments (it needs n)"),
    ("{tmp}/ok.py:factory", "cannot be built without arguments (it needs width)"),
    ("{tmp}/ok.py:not_a_model", "not_a_model() returned int, not an nn.Module"),
    ("{tmp}/ok.py:WIDTH", "defines no nn.Module class, model function or module 'WIDTH'"),
])
def test_bad_model_specs_are_one_clear_error(tmp_path, spec, message):
    (tmp_path / "bad.py").write_text("raise RuntimeError('boom')\n")
    (tmp_path / "ok.py").write_text("import torch.nn as nn\nclass Net(nn.Module):\n    pass\n"
                                    "class NeedsArgs(nn.Module):\n    def __init__(self, n):\n"
                                    "        super().__init__()\n"
                                    "WIDTH = 3\n"
                                    "def factory(width):\n    return nn.Linear(width, 2)\n"
                                    "def not_a_model():\n    return 3\n")
    with pytest.raises(fedleak.ModelError, match=re.escape(message)):
        fedleak.load_model(spec.format(tmp=tmp_path))


def test_weights_saved_through_a_wrapper_fit_the_model(tmp_path):
    """State dicts as trainers save them: DataParallel/DDP's ``module.``, torch.compile's ``_orig_mod.``, a
    Lightning checkpoint's ``model.`` inside ``state_dict``; and a class holding the saved network as an attribute.
    A mismatch that no one common prefix explains is still refused."""
    state = fedleak.make_mlp((1, 8, 8), [1024], 10, seed=1).state_dict()  # the built-in "mlp"'s shapes
    for name, saved in [("dp.pt", {"module." + k: v for k, v in state.items()}),
                        ("compiled.pth", {"_orig_mod." + k: v for k, v in state.items()}),
                        ("lightning.ckpt", {"state_dict": {"model." + k: v for k, v in state.items()}, "epoch": 3})]:
        torch.save(saved, tmp_path / name)
        model = fedleak.load_model("mlp", weights=tmp_path / name).module
        assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()), name
    holder = tmp_path / "holder.py"
    holder.write_text("import fedleak, torch.nn as nn\n"
                      "class Holder(nn.Module):\n"
                      "    def __init__(self):\n"
                      "        super().__init__()\n"
                      "        self.net = fedleak.make_mlp((1, 8, 8), [1024], 10)\n"
                      "    def forward(self, x):\n"
                      "        return self.net(x)\n")
    torch.save(state, tmp_path / "inner.pt")
    held = fedleak.load_model(f"{holder}:Holder", weights=tmp_path / "inner.pt").module
    assert torch.equal(held.net[1].weight, state["1.weight"])
    torch.save({("module." if k.startswith("1.") else "") + k: v for k, v in state.items()}, tmp_path / "mixed.pt")
    with pytest.raises(fedleak.ModelError, match="do not fit"):
        fedleak.load_model("mlp", weights=tmp_path / "mixed.pt")


def test_weights_must_fit_and_are_never_unpickled(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    with pytest.raises(fedleak.ModelError, match="do not fit"):
        fedleak.load_model("mlp", weights=tmp_path / "other.pt")
    torch.save({"x": object()}, tmp_path / "pickled.pt")
    with pytest.raises(fedleak.ModelError, match="never unpickles"):
        fedleak.load_model("mlp", weights=tmp_path / "pickled.pt")
    model = fedleak.make_mlp((1, 8, 8), [16], 10)
    fedleak.save_mlp(model, tmp_path / "m.safetensors")
    with pytest.raises(fedleak.ModelError, match="already holds"):
        fedleak.load_model(tmp_path / "m.safetensors", weights=tmp_path / "other.pt")
    assert fedleak.load_model(tmp_path / "m.safetensors").module[1].out_features == 16


def test_a_model_that_takes_the_datas_values_laid_out_otherwise_is_told_how_to_read_them(tmp_path):
    """A data set holds C x H x W images: a file of N x 1 x L signals is read as N x 1 x 1 x L. A Conv1d model
    taking (1, L) is refused in one line that says which view of the sample it needs."""
    from fedleak.models.zoo import load_model_for

    source = tmp_path / "signal.py"
    source.write_text(
        "import torch.nn as nn, torch.nn.functional as F\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv1d(1, 4, 5, padding=2)\n"
        "        self.fc = nn.Linear(4 * 64, 3)\n"
        "    def forward(self, x):\n"
        "        return self.fc(F.relu(self.conv(x)).flatten(1))\n")
    view = r"x = x\.view\(x\.size\(0\), 1, 64\)"
    with pytest.raises(fedleak.FedleakError, match=r"takes inputs of shape \(1, 64\).*" + view):
        load_model_for(f"{source}:Net", (1, 1, 64), 3)
    assert load_model_for(f"{source}:Net", (1, 64), 3) is not None
    with pytest.raises(fedleak.FedleakError, match=r"does not run on the data's inputs \(1, 1, 32\)") as info:
        load_model_for(f"{source}:Net", (1, 1, 32), 3)
    assert "laid out otherwise" not in str(info.value)


def test_a_binary_classifier_that_squeezes_its_logit_is_loaded_for_two_classes(tmp_path):
    """``self.fc(h).squeeze(1)`` gives one value per sample: a binary classifier's logit, for two-class data."""
    from fedleak.models.zoo import load_model_for

    source = tmp_path / "binary.py"
    source.write_text(
        "import torch.nn as nn, torch.nn.functional as F\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc1 = nn.Linear(64, 32)\n"
        "        self.fc2 = nn.Linear(32, 1)\n"
        "    def forward(self, x):\n"
        "        return self.fc2(F.relu(self.fc1(x.flatten(1)))).squeeze(1)\n")
    assert load_model_for(f"{source}:Net", (1, 8, 8), 2, binary=True) is not None
    with pytest.raises(fedleak.FedleakError, match="it needs an output per class"):
        load_model_for(f"{source}:Net", (1, 8, 8), 3, binary=True)
