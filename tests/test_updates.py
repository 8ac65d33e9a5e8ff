import pytest
import torch
from torch import nn

import fedleak
from fedleak.updates import check_matches_model


def _batch(digits, n=4):
    return digits.x[:n], digits.y[:n]


def test_gradient_update_is_torch_autograd_of_mean_cross_entropy(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    x, y = _batch(digits)
    update = fedleak.compute_gradient_update(model, x, y)
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    assert set(update.gradients) == {n for n, _ in model.named_parameters()}
    for name, p in model.named_parameters():
        assert torch.equal(update.gradients[name], p.grad)
    assert update.num_examples == 4


def test_gradient_update_leaves_model_grads_alone(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    fedleak.compute_gradient_update(model, *_batch(digits))
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_save_and_load_round_trip(tmp_path, digits, suffix):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    update = fedleak.compute_gradient_update(model, *_batch(digits))
    path = tmp_path / f"u{suffix}"
    if suffix == ".pt":
        torch.save(dict(update.gradients), path)
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
    with pytest.raises(fedleak.UpdateError, match=r"does not fit the model's parameter"):
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


def test_bad_updates_are_named(digits):
    model = fedleak.make_mlp(digits.input_shape, [8], 10, seed=0)
    grads = dict(fedleak.compute_gradient_update(model, *_batch(digits)).gradients)
    with pytest.raises(fedleak.UpdateError, match=r"missing \['3.bias'\]"):
        check_matches_model(model, {k: v for k, v in grads.items() if k != "3.bias"})
    with pytest.raises(fedleak.UpdateError, match=r"unexpected \['extra'\]"):
        check_matches_model(model, {**grads, "extra": torch.zeros(1)})
    with pytest.raises(fedleak.UpdateError, match="'1.weight' has shape"):
        check_matches_model(model, {**grads, "1.weight": torch.zeros(3, 3)})
    # a DataParallel / DDP wrapper's names, either way round: the message says which prefix to strip
    with pytest.raises(fedleak.UpdateError, match="the update's names carry the prefix 'module.'"):
        check_matches_model(model, {"module." + k: v for k, v in grads.items()})
    with pytest.raises(fedleak.UpdateError, match="the model's names carry the prefix 'module.'"):
        check_matches_model(nn.DataParallel(model), grads)
    with pytest.raises(fedleak.UpdateError) as plain:
        check_matches_model(model, {**{k: v for k, v in grads.items() if k != "3.bias"}, "extra": torch.zeros(1)})
    assert "prefix" not in str(plain.value)
    nan = grads["1.bias"].clone()
    nan[0] = float("nan")
    with pytest.raises(fedleak.UpdateError, match="non-finite"):
        fedleak.GradientUpdate({**grads, "1.bias": nan})
    with pytest.raises(fedleak.UpdateError, match="dtype"):
        fedleak.GradientUpdate({**grads, "1.bias": torch.zeros(8, dtype=torch.long)})


def test_weight_update_validation():
    a = {"w": torch.ones(2)}
    with pytest.raises(fedleak.UpdateError, match="differ in keys"):
        fedleak.WeightUpdate(a, {"v": torch.ones(2)})
    with pytest.raises(fedleak.UpdateError, match="zero"):
        fedleak.WeightUpdate(a, {"w": torch.ones(2)})
    with pytest.raises(fedleak.UpdateError, match="shape"):
        fedleak.WeightUpdate(a, {"w": torch.ones(3)})


def test_empty_batch_and_nan_inputs_are_refused(digits):
    model = fedleak.make_mlp(digits.input_shape, [8], 10, seed=0)
    with pytest.raises(fedleak.FedleakError, match="empty"):
        fedleak.compute_gradient_update(model, digits.x[:0], digits.y[:0])
    x = digits.x[:2].clone()
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(fedleak.FedleakError, match="NaN"):
        fedleak.compute_gradient_update(model, x, digits.y[:2])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_every_non_finite_entry_is_found_wherever_it_is(dtype):
    # the one-pass finiteness check (a sum, then the least and largest entry) must see a NaN or inf anywhere, in
    # vectorised and scalar tails alike, and in a non-contiguous view; the number of bad entries is reported
    from fedleak.validation import all_finite

    assert all_finite(torch.zeros(0, 3, dtype=dtype))
    for n in (1, 7, 33, 4099):
        base = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype)
        assert all_finite(base)
        for pos in {0, n // 2, n - 1}:
            for value in (float("nan"), float("inf"), -float("inf")):
                bad = base.clone()
                bad[pos] = value
                assert not all_finite(bad)
                with pytest.raises(fedleak.UpdateError, match="holds 1 non-finite"):
                    fedleak.GradientUpdate({"w": bad})
    view = torch.randn(5, 6).to(dtype).t()
    view[4, 1] = float("nan")
    assert not all_finite(view)
    # finite entries whose sum overflows the dtype are finite
    huge = torch.full((64,), float(torch.finfo(dtype).max), dtype=dtype)
    assert not bool(torch.isfinite(huge.sum()))
    assert all_finite(huge)
    huge[5] = -float("inf")
    assert not all_finite(huge)
