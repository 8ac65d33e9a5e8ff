"""The format an update's values carry: their dtype's, or a coarser one every value fits (autocast, half uploads)."""

import pytest
import torch
from user_models import mixed_precision_gradient

import fedleak
from fedleak.precision import MIN_ENTRIES, Precision, carried_dtype, sample_entries, update_precision


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_an_autocast_gradient_is_read_as_the_format_it_was_computed_in(fashion, dtype):
    model = fedleak.make_mlp(fashion.input_shape, [256], 10, seed=0)
    x, y = fashion.batch(8, seed=0)
    grads = mixed_precision_gradient(model, x, y, dtype)
    assert grads[0].dtype == torch.float32 and carried_dtype(grads[0]) == dtype
    precision = update_precision(dict(zip([n for n, _ in model.named_parameters()], grads)))
    assert precision.coarse and precision.dtype == dtype and precision.stored == torch.float32
    assert f"fits {str(dtype)[6:]}" in precision.describe() and "torch.autocast" in precision.describe()
    plain = fedleak.compute_gradient_update(model, x, y)  # the same client in float32
    assert not update_precision(plain.gradients).coarse and update_precision(plain.gradients).describe() == ""


def test_a_half_precision_tensor_and_small_or_float64_tensors():
    t = torch.randn(64, 64)
    assert carried_dtype(t) == torch.float32 and carried_dtype(t.half()) == torch.float16
    assert carried_dtype(t.double()) == torch.float64
    few = torch.zeros(1000)
    few[: MIN_ENTRIES - 1] = torch.randn(MIN_ENTRIES - 1).bfloat16().float()
    assert carried_dtype(few) == torch.float32  # too few nonzero values to tell a format by
    assert update_precision({"w": t.bfloat16()}).describe() == "the update is in bfloat16"
    assert Precision(torch.bfloat16).roundoff == pytest.approx(2.0**-8)


def test_a_sample_of_entries_visits_every_column():
    """A stride of a whole row would read one column only (the first pixel of every image, 0 on Fashion-MNIST: a
    4096 x 784 layer's gradient then showed no value to read its format by)."""
    t = torch.arange(4096 * 784, dtype=torch.float64).reshape(4096, 784)
    columns = {int(v) % 784 for v in sample_entries(t, 4096)}
    assert len(columns) == 784


def test_two_tensors_tell_an_update_s_format():
    """One tensor's values may fit bfloat16 by their nature (few-bit inputs times one factor per unit); the update is
    read as rounded only where the next largest tensor that can tell fits it too. A tensor of zeros (a frozen layer)
    tells nothing and is passed over."""
    gen = torch.Generator().manual_seed(0)
    big, small = torch.randn(256, 64, generator=gen), torch.randn(64, 16, generator=gen)
    assert update_precision({"a": big.bfloat16().float(), "b": small}).dtype == torch.float32
    assert update_precision({"a": big.bfloat16().float(), "b": small.bfloat16().float()}).dtype == torch.bfloat16
    assert update_precision({"a": big.half().float(), "b": small.bfloat16().float()}).dtype == torch.bfloat16
    assert update_precision({"a": big.bfloat16().float(), "b": small[:2, :2]}).dtype == torch.bfloat16  # b can't tell
    frozen = update_precision({"frozen": torch.zeros(512, 512), "b": small.bfloat16().float()})
    assert frozen.dtype == torch.bfloat16 and frozen.name == "b"
