"""Reused work arrays (fedleak.nets.scratch): the band assembly and the float32 factorisation give the same
results with them as with fresh arrays, sample after sample."""

import numpy as np

from fedleak.models.convnet import make_convnet
from fedleak.nets import as_network
from fedleak.nets.conv_solve import factor
from fedleak.nets.scratch import reused_arrays, work_array


def test_work_arrays_are_fresh_outside_and_shared_inside():
    a, b = work_array("x", (3, 4)), work_array("x", (3, 4))
    assert a is not b and not a.any()
    with reused_arrays():
        c = work_array("x", (3, 4))
        c[:] = 1.0
        with reused_arrays():  # a nested block shares the outer one's arrays
            assert work_array("x", (3, 4)) is c
        assert work_array("x", (3, 4), order="F") is not c  # another layout, another array
        assert work_array("y", (3, 4)) is not c
    assert work_array("x", (3, 4)) is not c and not work_array("x", (3, 4)).any()


def test_reused_band_and_factor_equal_fresh_ones():
    """The band writes the same entries every time, so a reused band holds no trace of the previous sample's
    (its structural zeros stay zero); the reused factor equals a fresh one."""
    blk = as_network(make_convnet((1, 12, 12), 3, channels=(3, 8), padding=1, fc_widths=(8,), seed=0)).blocks[1]
    rng = np.random.default_rng(0)
    ws = [(rng.random(blk.conv_dim) < p).astype(float) for p in (0.9, 0.3, 0.6)]
    fresh = [blk.gram.band(w) for w in ws]
    with reused_arrays():
        for w, ref in zip(ws, fresh):
            ab = blk.gram.band(w)
            assert np.shares_memory(ab, blk.gram.band(w))  # the same memory, rewritten
            np.testing.assert_array_equal(ab, ref)
            got, want = factor(ab, 1e-3), factor(ref.copy(), 1e-3)
            if want is None:
                assert got is None
            else:
                np.testing.assert_array_equal(got[0], want[0])
                assert got[1] == want[1]
