"""Updates on disk (fedleak.update_files): fedleak's own format, plain files of tensors, and what is refused."""

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fedleak


def _batch(digits, n=4):
    return digits.x[:n], digits.y[:n]


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".npz"])
def test_save_and_load_round_trip(tmp_path, digits, suffix):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    update = fedleak.compute_gradient_update(model, *_batch(digits))
    path = tmp_path / f"u{suffix}"
    if suffix == ".pt":
        torch.save(dict(update.gradients), path)
    elif suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in update.gradients.items()})
    else:
        fedleak.save_update(update, path)
    loaded = fedleak.load_update(path)
    assert isinstance(loaded, fedleak.GradientUpdate)
    for k, v in update.gradients.items():
        assert torch.equal(loaded.gradients[k], v)
    if suffix == ".safetensors":
        assert loaded.num_examples == 4


def test_weight_update_round_trip(tmp_path, digits):
    model = fedleak.make_mlp(digits.input_shape, [8], 10, seed=0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    after = {k: v + 0.01 for k, v in before.items()}
    upd = fedleak.WeightUpdate(before, after, num_examples=5, local_steps=3)
    fedleak.save_update(upd, tmp_path / "w.safetensors")
    loaded = fedleak.load_update(tmp_path / "w.safetensors")
    assert isinstance(loaded, fedleak.WeightUpdate) and loaded.local_steps == 3 and loaded.num_examples == 5
    assert torch.allclose(loaded.delta()["1.weight"], torch.full_like(before["1.weight"], -0.01))


def test_corrupt_and_missing_update_files(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(fedleak.UpdateError, match="cannot read update file"):
        fedleak.load_update(bad)
    with pytest.raises(fedleak.UpdateError, match="not found"):
        fedleak.load_update(tmp_path / "missing.safetensors")
    pt = tmp_path / "bad.pt"
    pt.write_bytes(b"garbage")
    with pytest.raises(fedleak.UpdateError, match="cannot read update file"):
        fedleak.load_update(pt)


def test_a_torch_file_of_a_gradient_list_is_keyed_by_the_model(tmp_path, digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    update = fedleak.compute_gradient_update(model, digits.x[:2], digits.y[:2])
    torch.save(list(update.gradients.values()), tmp_path / "list.pt")
    with pytest.raises(fedleak.UpdateError, match=r"holds a list of tensors, which only the model can name"):
        fedleak.load_update(tmp_path / "list.pt")
    loaded = fedleak.load_update(tmp_path / "list.pt", model)
    assert list(loaded.gradients) == list(update.gradients) and loaded.num_examples is None
    assert all(torch.equal(loaded.gradients[k], v) for k, v in update.gradients.items())
    torch.save(list(update.gradients.values())[::-1], tmp_path / "reversed.pt")
    with pytest.raises(fedleak.UpdateError, match=r"does not fit the model's '1.weight'"):
        fedleak.load_update(tmp_path / "reversed.pt", model)


def test_pickled_code_in_a_torch_file_is_not_executed(tmp_path):
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pt"
    with open(path, "wb") as fh:
        pickle.dump({"w": Evil()}, fh)
    with pytest.raises(fedleak.UpdateError):
        fedleak.load_update(path)
    assert not marker.exists()


def test_save_is_atomic_and_keeps_previous_file(tmp_path, digits):
    model = fedleak.make_mlp(digits.input_shape, [8], 10, seed=0)
    update = fedleak.compute_gradient_update(model, *_batch(digits))
    path = fedleak.save_update(update, tmp_path / "u.safetensors")
    original = path.read_bytes()
    with pytest.raises(fedleak.UpdateError):
        fedleak.save_update("not an update", path)  # type: ignore[arg-type]
    assert path.read_bytes() == original
    assert [p.name for p in tmp_path.iterdir()] == ["u.safetensors"]


def _sgd_step(model, x, y, lr=0.1):
    """A FedAvg client's reply: its weights after one local SGD step (its own copy of the model)."""
    import copy

    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=lr)
    opt.zero_grad()
    F.cross_entropy(client(x), y).backward()
    opt.step()
    return client.state_dict()


@pytest.mark.parametrize("form", ["pt-dict", "pt-list", "npz-named", "npz-list"])
def test_a_plain_file_of_the_clients_weights_is_read_as_a_fedavg_update(tmp_path, digits, form):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0).eval()
    x, y = digits.x[:4], digits.y[:4]
    after = _sgd_step(model, x, y)
    path = tmp_path / f"after.{form.split('-')[0]}"
    if form == "pt-dict":
        torch.save(after, path)
    elif form == "pt-list":
        torch.save(list(after.values()), path)
    elif form == "npz-named":
        np.savez(path, **{k: v.numpy() for k, v in after.items()})
    else:  # Flower's NDArrays, as numpy.savez(path, *ndarrays) writes them
        np.savez(path, *[v.numpy() for v in after.values()])
    loaded = fedleak.load_update(path, model)
    assert isinstance(loaded, fedleak.WeightUpdate) and loaded.num_examples is None
    assert all(torch.equal(loaded.after[k], v) and torch.equal(loaded.before[k], model.state_dict()[k])
               for k, v in after.items())
    rec = fedleak.reconstruct(model, replace(loaded, num_examples=4))
    scores = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert int(scores.false_certificates) == 0 and rec.num_certified >= 1
    assert any("the client's weights" in note for note in rec.notes)


def test_a_plain_file_of_a_gradient_stays_a_gradient(tmp_path, digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    update = fedleak.compute_gradient_update(model, *_batch(digits))
    np.savez(tmp_path / "g.npz", *[v.numpy() for v in update.gradients.values()])
    loaded = fedleak.load_update(tmp_path / "g.npz", model)
    assert isinstance(loaded, fedleak.GradientUpdate)
    assert all(torch.equal(loaded.gradients[k], v) for k, v in update.gradients.items())
