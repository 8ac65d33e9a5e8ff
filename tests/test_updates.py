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


def test_every_gradient_is_a_tensor_of_its_own():
    """Autograd hands one tensor to parameters added together, and an expanded (stride-0) one for a plain sum: each
    gradient of the update is still a contiguous tensor of its own, which changing in place changes alone."""
    from fedleak.updates import owned

    class Sum(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(3))
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return self.fc(x * 0 + self.a + self.b)

    model = Sum()
    grads = torch.autograd.grad((model.a + model.b).sum(), [model.a, model.b])
    assert grads[0].untyped_storage().data_ptr() == grads[1].untyped_storage().data_ptr()  # what autograd gives
    mine = owned(grads)
    assert all(g.is_contiguous() for g in mine) and torch.equal(mine[0], grads[0])
    assert len({g.untyped_storage().data_ptr() for g in mine}) == 2
    update = fedleak.compute_gradient_update(model, torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    a, b = update.gradients["a"], update.gradients["b"]
    assert torch.equal(a, b) and a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()
    a.add_(1.0)
    assert not torch.equal(a, b)


def test_gradient_update_leaves_model_grads_alone(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    fedleak.compute_gradient_update(model, *_batch(digits))
    assert all(p.grad is None for p in model.parameters())


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
    with pytest.raises(fedleak.UpdateError, match="the model's names carry the prefix 'module.', which the update's lack"):
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


class _Head(nn.Module):
    """Outputs given per test: logits, one logit (squeezed or not), or a sigmoid's probability."""

    def __init__(self, out: torch.Tensor, sigmoid: bool = False):
        super().__init__()
        self.scale = nn.Linear(1, 1, bias=False)
        self.out, self.sigmoid = out, sigmoid

    def forward(self, x):
        out = self.out * self.scale.weight[0, 0] ** 0 + 0 * x.flatten(1)[:, :1].sum()
        return torch.sigmoid(out) if self.sigmoid else out


@pytest.mark.parametrize(("out", "sigmoid", "expected"), [
    (torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.0]]), False, [1, 0]),
    (torch.tensor([[0.5], [-0.5]]), False, [1, 0]),
    (torch.tensor([0.5, -0.5]), False, [1, 0]),
    (torch.tensor([[-0.2], [0.3]]), True, [0, 1]),
])
def test_model_predictions_read_one_logit_squeezed_or_not_and_a_final_sigmoid(out, sigmoid, expected):
    from fedleak.client_loss import model_predictions

    with torch.no_grad():
        assert model_predictions(_Head(out, sigmoid), torch.zeros(2, 3)).tolist() == expected
