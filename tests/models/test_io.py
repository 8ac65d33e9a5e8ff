import pytest
import torch
from torch import nn

import fedleak


@pytest.mark.parametrize("name", ["m.safetensors", "m.pt", "m"])  # safetensors, read by content whatever the suffix
def test_round_trip_keeps_names_shape_and_outputs(tmp_path, digits, name):
    model = fedleak.make_mlp(digits.input_shape, [32, 16], 10, seed=2)
    path = fedleak.save_mlp(model, tmp_path / name)
    loaded = fedleak.load_mlp(path)
    assert loaded.input_shape == (1, 8, 8)
    assert [n for n, _ in loaded.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert torch.equal(loaded(digits.x[:5]), model(digits.x[:5]))


def test_user_sequential_saved_with_torch(tmp_path):
    model = nn.Sequential(nn.Linear(6, 4, bias=False), nn.ReLU(), nn.Linear(4, 3, bias=False))
    torch.save(model.state_dict(), tmp_path / "m.pt")
    loaded = fedleak.load_mlp(tmp_path / "m.pt")
    x = torch.rand(2, 6)
    assert torch.equal(loaded(x), model(x)) and loaded[0].bias is None


@pytest.mark.parametrize(
    "state, message",
    [
        ({"fc.weight": torch.zeros(3, 4)}, "not a Sequential Linear parameter"),
        ({"0.weight": torch.zeros(3, 4), "4.weight": torch.zeros(2, 3)}, "not separated by exactly one"),
        ({"0.weight": torch.zeros(3, 4), "2.weight": torch.zeros(2, 5)}, "takes 5 inputs"),
        ({"0.weight": torch.zeros(3, 4, 2)}, "no 2-d weight"),
    ],
)
def test_bad_model_files(tmp_path, state, message):
    torch.save(state, tmp_path / "m.pt")
    with pytest.raises(fedleak.ModelError, match=message):
        fedleak.load_mlp(tmp_path / "m.pt")


def test_corrupt_model_file(tmp_path):
    (tmp_path / "m.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(fedleak.ModelError, match="cannot read model file"):
        fedleak.load_mlp(tmp_path / "m.safetensors")
    with pytest.raises(fedleak.ModelError, match="not found"):
        fedleak.load_mlp(tmp_path / "missing.pt")
