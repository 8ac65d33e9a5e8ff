"""Tensor files read without unpickling anything (fedleak.tensor_files): .npz archives and unknown formats."""

import numpy as np
import pytest
import torch

import fedleak
from fedleak.errors import ModelError, UpdateError
from fedleak.models.zoo import load_weights
from fedleak.tensor_files import LISTED, read_tensor_file


def test_npz_by_name_and_by_position(tmp_path):
    arrays = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, dtype=np.float64)]
    np.savez(tmp_path / "named.npz", w=arrays[0], b=arrays[1])
    np.savez(tmp_path / "listed.npz", *arrays)
    named, meta = read_tensor_file(tmp_path / "named.npz", "update", UpdateError)
    assert meta == {} and set(named) == {"w", "b"} and named["b"].dtype == torch.float64
    listed, meta = read_tensor_file(tmp_path / "listed.npz", "update", UpdateError, lists=True)
    assert LISTED in meta and list(listed) == ["0", "1"] and torch.equal(listed["0"], torch.from_numpy(arrays[0]))
    with pytest.raises(UpdateError, match="holds a list of 2 tensors, not a dict"):
        read_tensor_file(tmp_path / "listed.npz", "update", UpdateError)


def test_what_an_npz_may_not_hold(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    np.savez(tmp_path / "objects.npz", a=np.array([Evil()], dtype=object))
    with pytest.raises(UpdateError, match="pickled Python objects; fedleak never unpickles"):
        read_tensor_file(tmp_path / "objects.npz", "update", UpdateError)
    assert not marker.exists()
    np.savez(tmp_path / "text.npz", a=np.array(["x", "y"]))
    with pytest.raises(UpdateError, match="dtype <U1; numeric arrays are needed"):
        read_tensor_file(tmp_path / "text.npz", "update", UpdateError)
    (tmp_path / "plain.npz").write_bytes(b"not a zip archive at all")
    with pytest.raises(UpdateError, match="not a .npz archive"):
        read_tensor_file(tmp_path / "plain.npz", "update", UpdateError)
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(UpdateError, match="holds no arrays"):
        read_tensor_file(tmp_path / "empty.npz", "update", UpdateError)


def test_an_unknown_format_names_the_ones_read(tmp_path):
    (tmp_path / "update.dat").write_bytes(b"\x00" * 64)
    with pytest.raises(UpdateError, match=r"as safetensors: .*fedleak reads .safetensors, a torch file .* or .npz"):
        read_tensor_file(tmp_path / "update.dat", "update", UpdateError)
    (tmp_path / "update.bin").write_bytes(b"\x00" * 64)  # a torch suffix: read as one, and refused as one
    with pytest.raises(UpdateError, match="corrupt or not a torch file of tensors"):
        read_tensor_file(tmp_path / "update.bin", "update", UpdateError)


def test_weights_as_flowers_ndarrays(tmp_path, digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    source = fedleak.make_mlp(digits.input_shape, [16], 10, seed=1)
    np.savez(tmp_path / "round.npz", *[v.numpy() for v in source.state_dict().values()])
    load_weights(model, tmp_path / "round.npz")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    np.savez(tmp_path / "short.npz", *[v.numpy() for v in source.state_dict().values()][:2])
    with pytest.raises(ModelError, match="list of 2 arrays, but MLP's state dict has 4 entries"):
        load_weights(model, tmp_path / "short.npz")


def test_a_training_checkpoint_gives_its_state_dict(tmp_path, digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    source = fedleak.make_mlp(digits.input_shape, [16], 10, seed=1)
    opt = torch.optim.SGD(source.parameters(), lr=0.1, momentum=0.9)
    torch.save({"model_state_dict": source.state_dict(), "optimizer_state_dict": opt.state_dict(), "epoch": 3},
               tmp_path / "ckpt.pt")
    load_weights(model, tmp_path / "ckpt.pt")
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.state_dict().items())
    torch.save({"a": source.state_dict(), "b": model.state_dict()}, tmp_path / "two.pt")
    with pytest.raises(ModelError, match=r"2 dicts of tensors \('a', 'b'\), so which one is meant is not clear"):
        load_weights(model, tmp_path / "two.pt")
    torch.save({"epoch": 3, "loss": 0.5}, tmp_path / "none.pt")
    with pytest.raises(ModelError, match=r"holds 'epoch' \(int\), 'loss' \(float\): no dict of tensors"):
        load_weights(model, tmp_path / "none.pt")


def test_torch_files_as_trainers_name_them_and_files_without_a_suffix(tmp_path):
    """Lightning's ``.ckpt``, Hugging Face's ``pytorch_model.bin``, ``checkpoint.pth.tar`` are torch files; a file
    with no suffix is read by what its first bytes say it is. Pickled objects stay unread in every one."""
    state = {"w": torch.ones(2, 3), "b": torch.zeros(2)}
    for name in ("model.ckpt", "pytorch_model.bin", "checkpoint.pth.tar", "no_suffix"):
        torch.save({"state_dict": state, "epoch": 3, "global_step": 10}, tmp_path / name)
        tensors, _ = read_tensor_file(tmp_path / name, "weights", ModelError)
        assert set(tensors) == {"w", "b"}
    np.savez(tmp_path / "arrays.npz", *[v.numpy() for v in state.values()])
    (tmp_path / "arrays.npz").rename(tmp_path / "arrays")
    listed, meta = read_tensor_file(tmp_path / "arrays", "weights", ModelError, lists=True)
    assert LISTED in meta and torch.equal(listed["0"], state["w"])
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("evil.ckpt", "evil"):
        torch.save({"w": Evil()}, tmp_path / name)
        with pytest.raises(ModelError, match="never unpickles"):
            read_tensor_file(tmp_path / name, "weights", ModelError)
        torch.save({"w": Evil()}, tmp_path / name, _use_new_zipfile_serialization=False)
        with pytest.raises(ModelError, match="never unpickles"):
            read_tensor_file(tmp_path / name, "weights", ModelError)
    assert not marker.exists()
