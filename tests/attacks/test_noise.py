"""The rounding noise an update carries beyond the gradient's own, read from the update's values where it is used."""

from __future__ import annotations

import torch

from fedleak.attacks.exact.noise import RoundingNoise


def test_a_weight_updates_rounding_noise_is_read_from_the_update_as_its_float64_value():
    """The noise of a weight delta, ``eps |after|`` (plus a transport error, times a defense's factor), is read
    from ``after`` where it is used, in float64: rows, columns, a bias whole and row norms a piece at a time,
    each the value a float64 copy of the noise would hold (none is made)."""
    gen = torch.Generator().manual_seed(0)
    after = torch.randn(300, 40, generator=gen) * 0.05
    after[0, :3] = 0.0
    after[1, 1] = 1e-33  # eps times it is subnormal in float32, not in float64
    eps = float(torch.finfo(torch.float32).eps)
    full = eps * after.double().abs()
    noise = RoundingNoise.of(after, 1)
    assert noise.values.data_ptr() == after.data_ptr()  # the update's own tensor, not a copy
    rows = [5, 1, 299]
    assert noise.rows(rows).dtype == torch.float64 and torch.equal(noise.rows(rows), full[rows])
    assert torch.equal(noise.columns(rows[:2]), full[:, rows[:2]])
    assert torch.equal(noise.whole(), full) and noise.rows([1])[0, 1] > 0
    assert torch.equal(noise.row_norms(), full.norm(dim=1))
    err = RoundingNoise.of(after, 4, 1e-7) * 0.5  # a transport error, and a defense's factor
    assert torch.equal(err.whole(), (4 * eps * after.double().abs() + 1e-7) * 0.5)
    assert torch.equal(err.row_norms(), err.whole().norm(dim=1))
