"""DisguisedNets on real images: a keyed block permutation and per-block rotation, linear, invertible with the key."""

from __future__ import annotations

import pytest
import torch
from user_models import FlowerNet

import fedleak
from fedleak.defenses import defended_gradient, make_defense, parse_defense
from fedleak.errors import OptionError


def block(images: torch.Tensor, b: int, p: int) -> torch.Tensor:
    """Block ``p`` (row by row) of every image and channel, flattened row by row: ``(N, C, b*b)``."""
    per_row = images.shape[3] // b
    r, c = divmod(p, per_row)
    return images[:, :, r * b:(r + 1) * b, c * b:(c + 1) * b].reshape(*images.shape[:2], b * b)


@pytest.fixture(scope="module")
def images(fashion):
    return fashion.batch(4, seed=0)


def test_blocks_are_permuted_and_rotated_as_defined(images):
    x, y = images
    plain = make_defense("disguisednets", block=7, key=3, projection=False)
    rotated = make_defense("disguisednets", block=7, key=3)
    secret = rotated.secret(28, 28)
    perm, q = secret.permutation, secret.rotation
    assert sorted(perm.tolist()) == list(range(16)) and perm.tolist() != list(range(16))
    assert torch.allclose(q.T @ q, torch.eye(49, dtype=torch.float64), atol=1e-12)
    xp, yp = plain(None, x, y)
    xr, yr = rotated(None, x, y)
    assert torch.equal(yp, y) and torch.equal(yr, y)
    for p in range(16):
        assert torch.equal(block(xp, 7, p), block(x, 7, int(perm[p])))  # position p shows input block perm[p]
        expected = block(x, 7, int(perm[p])).double() @ q.T  # each block's pixels times the orthogonal matrix
        assert torch.allclose(block(xr, 7, p).double(), expected, atol=1e-5)


def test_same_key_same_transform_other_key_other_transform(images):
    x, y = images
    a = make_defense("disguisednets", key=11)
    again = parse_defense("disguisednets:key=11")
    other = make_defense("disguisednets", key=12)
    first = a(None, x, y)[0]
    assert torch.equal(first, a(None, x, y)[0]) and torch.equal(first, again(None, x, y)[0])
    assert not torch.allclose(first, other(None, x, y)[0], atol=1e-3)
    torch.manual_seed(0)
    u = a(None, x, y)[0]
    torch.manual_seed(1)
    assert torch.equal(u, a(None, x, y)[0])  # the global generator plays no part
    assert not torch.equal(make_defense("disguisednets", key=11, projection=False)(None, x, y)[0],
                           make_defense("disguisednets", key=12, projection=False)(None, x, y)[0])


def test_linear_orthogonal_and_invertible_with_the_key(digits):
    d = make_defense("disguisednets", block=4, key=5)
    basis = torch.eye(64, dtype=torch.float64).reshape(64, 1, 8, 8)
    matrix = d.disguise(basis).reshape(64, 64).T  # column i: the image of basis vector i
    assert torch.allclose(matrix.T @ matrix, torch.eye(64, dtype=torch.float64), atol=1e-12)  # orthogonal
    x, _ = digits.batch(6, seed=1)
    xd = d.disguise(x.double())
    assert torch.allclose(xd.reshape(6, 64), x.double().reshape(6, 64) @ matrix.T, atol=1e-12)  # linear
    a, b = x[:3].double(), x[3:].double()
    assert torch.allclose(d.disguise(2 * a - 0.5 * b), 2 * d.disguise(a) - 0.5 * d.disguise(b), atol=1e-12)
    assert torch.allclose(d.invert(xd), x.double(), atol=1e-12)  # the key holder undoes it
    assert torch.allclose(d.invert(d.disguise(x)), x, atol=1e-5)  # float32 as a client sends it
    assert not torch.allclose(xd, x.double(), atol=1e-2)
    wrong = make_defense("disguisednets", block=4, key=6)
    assert not torch.allclose(wrong.invert(xd), x.double(), atol=1e-2)


def test_defended_gradient_on_the_flower_cnn(fashion):
    net = FlowerNet()
    x, y = fashion.batch(3, seed=2)
    x3 = torch.nn.functional.pad(x, (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # Fashion-MNIST as 3 x 32 x 32 images
    d = make_defense("disguisednets", block=4, key=1)
    out = defended_gradient(net, x3, y, d, seed=0)
    assert torch.equal(out.inputs, d.disguise(x3)) and torch.equal(out.labels, y)
    ref = fedleak.compute_gradient_update(net, d.disguise(x3), y)
    for name, g in ref.gradients.items():
        assert torch.allclose(out.update.gradients[name], g, atol=1e-7)


@pytest.mark.parametrize("spec, match", [
    ("disguisednets:block=0", "block"), ("disguisednets:key=-1", "key"), ("disguisednets:key=4294967296", "key"),
    ("disguisednets:projection=maybe", "projection"), ("disguisednets:size=4", "size"),
])
def test_bad_parameters(spec, match):
    with pytest.raises(OptionError, match=match):
        parse_defense(spec)


def test_inputs_it_cannot_disguise(digits):
    x, y = digits.batch(4, seed=0)
    with pytest.raises(OptionError, match="block"):
        make_defense("disguisednets", block=3)(None, x, y)  # 8 x 8 is not cut into 3 x 3 blocks
    with pytest.raises(OptionError, match=r"images \(N, C, H, W\)"):
        make_defense("disguisednets")(None, x.reshape(4, 64), y)
    with pytest.raises(OptionError, match="floating-point"):
        make_defense("disguisednets")(None, (x * 255).to(torch.uint8), y)
    with pytest.raises(OptionError, match="block"):
        make_defense("disguisednets", block=1.5)


def test_a_model_trained_on_disguised_images_is_tested_on_disguised_images():
    from fedleak.defenses import DefenseStack

    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    stack = DefenseStack.of("disguisednets:block=4,key=7 + mixup")
    disguised = make_defense("disguisednets", block=4, key=7).disguise(images)
    torch.testing.assert_close(stack.at_inference(images), disguised)
    assert torch.equal(DefenseStack.of("mixup").at_inference(images), images)  # MixUp tests on clean images
