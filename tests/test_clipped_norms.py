"""Clipping per layer read off a gradient: layers at one L2 norm."""

import pytest

import fedleak
from fedleak.clipped_norms import read_layer_clip


@pytest.mark.parametrize("widths", [(256,), (256, 128)])
def test_per_layer_clipping_is_read_with_its_bound(fashion, widths):
    model = fedleak.make_mlp(fashion.input_shape, widths, 10, seed=0)
    x, y = fashion.batch(4, seed=2)
    update = fedleak.defended_gradient(model, x, y, "clipping:bound=0.05", seed=0).update
    clip = read_layer_clip(update.gradients)
    assert clip is not None and clip.bound == pytest.approx(0.05, rel=1e-3) and len(clip.layers) == len(widths) + 1
    assert "clipped per layer at norm" in clip.describe()


def test_unclipped_and_whole_update_clipped_gradients_are_not_read(fashion, lfw):
    for data, classes in ((fashion, 10), (lfw, 2)):
        for seed in range(2):
            model = fedleak.make_mlp(data.input_shape, (128, 128), classes, seed=seed)
            for m in (1, 8):
                x, y = data.batch(m, seed=seed)
                update = fedleak.compute_gradient_update(model, x, y)
                assert read_layer_clip(update.gradients) is None
                whole = fedleak.defended_gradient(model, x, y, "clipping:bound=0.05,per=update", seed=0).update
                assert read_layer_clip(whole.gradients) is None


def test_the_searches_model_a_clipping_they_read(digits):
    model = fedleak.make_mlp((1, 8, 8), [64], 10, seed=0)
    x, y = digits.batch(2, seed=31)
    update = fedleak.defended_gradient(model, x, y, "clipping:bound=0.1", seed=0).update
    read = fedleak.reconstruct(model, update, attack="ig", iterations=5, seed=0)
    assert any("clipped per layer" in n and "go through clipping(bound=" in n for n in read.notes)
    plain = fedleak.reconstruct(model, update, attack="ig", iterations=5, seed=0, defense="none")
    assert not any("clipped per layer" in n for n in plain.notes)
