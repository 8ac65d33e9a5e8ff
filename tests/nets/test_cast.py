"""One shared float64 copy per tensor (fedleak.nets.cast): a change made in place, through ``.data`` or by
replacing the tensor gives a new copy; inside ``unchanged()`` a tensor's bits are summed once and a change that
bumps its version is still seen."""

import torch

from fedleak.nets import cast as cast_module
from fedleak.nets.cast import cast, state, unchanged


def test_copies_are_shared_and_follow_changes():
    w = torch.nn.Parameter(torch.randn(6, 5))
    a = cast(w, torch.float64)
    assert a.dtype == torch.float64 and cast(w, torch.float64) is a
    w.data[2, 3] += 1.0  # invisible to the version counter, seen by the bit sum
    b = cast(w, torch.float64)
    assert b is not a and float(b[2, 3]) == float(w.detach()[2, 3])
    with torch.no_grad():
        w.mul_(2.0)
    assert torch.equal(cast(w, torch.float64), w.detach().double())


def test_bit_sum_sees_a_one_bit_change_in_odd_and_even_sizes():
    for n in (7, 8, 4096):
        x = torch.randn(n)
        before = state(x)
        x.view(torch.int32)[n // 2] ^= 1
        assert state(x) != before


def test_unchanged_sums_each_tensor_once_and_still_sees_version_bumps(monkeypatch):
    calls = []
    real = cast_module.state
    monkeypatch.setattr(cast_module, "state", lambda t: calls.append(1) or real(t))
    w = torch.nn.Parameter(torch.randn(4, 4))
    with unchanged():
        a = cast(w, torch.float64)
        assert cast(w, torch.float64) is a and cast(w, torch.float64) is a
        assert len(calls) == 1
        with torch.no_grad():
            w.add_(1.0)  # bumps the version: a new copy, even inside the block
        assert torch.equal(cast(w, torch.float64), w.detach().double())
    n = len(calls)
    cast(w, torch.float64)
    assert len(calls) == n + 1  # outside the block every call checks again
