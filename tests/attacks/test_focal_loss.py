"""A client that trains with a focal loss (``focal_gamma``): told its exponent, the exclusivity attack certifies its
samples at their own scales, from gradients and one-step weight updates, on ten and on two classes; not told, it
certifies none where none sits at the batch's scale, and says why; auto and IG search with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from user_models import GeluMLP

import fedleak

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("data, widths, size", [("fashion", [1024], 16), ("lfw", [1024], 16), ("digits", [256], 8)])
def test_told_the_exponent_the_exclusivity_attack_certifies(request, data, widths, size):
    """Fashion-MNIST, two-class LFW faces and digits, default-initialised MLPs, γ = 2, four batches each: every
    certified sample is an original with its label (0 false); told γ it certifies at least half of the batch's
    samples, and more than three times as many as read as a plain cross-entropy."""
    ds = request.getfixturevalue(data)
    told = blind = 0
    for seed in range(4):
        model = fedleak.make_mlp(ds.input_shape, widths, ds.num_classes, seed=seed)
        x, y = ds.batch(size, seed=100 + seed)
        update = fedleak.compute_gradient_update(model, x, y, focal_gamma=2.0)
        for gamma in (0.0, 2.0):
            rec = fedleak.reconstruct(model, update, focal_gamma=gamma)
            assert fedleak.metrics.match(rec, x, y).false_certificates == 0
            if gamma:
                told += int(rec.certified.sum())
            else:
                blind += int(rec.certified.sum())
    assert told >= 2 * size and told > 3 * blind


def test_a_one_step_fedavg_update_of_a_focal_client(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(8, seed=2)
    update = fedleak.fedavg_update(model, x, y, lr=1.0, focal_gamma=2.0)
    rec = fedleak.reconstruct(model, update, focal_gamma=2.0)
    assert int(rec.certified.sum()) >= 6 and fedleak.metrics.match(rec, x, y).false_certificates == 0
    assert not fedleak.reconstruct(model, update).certified.any()


def test_the_searches_simulate_the_focal_loss(fashion):
    """IG matches the focal client's gradient (a GELU model, which the exact route does not read); auto holds what
    the exact route certifies; DLG, which learns soft labels, refuses a focal loss, which takes class indices."""
    torch.manual_seed(0)
    model = GeluMLP(784, 256, 10).eval()
    x, y = fashion.batch(2, seed=1)
    update = fedleak.compute_gradient_update(model, x, y, focal_gamma=2.0)
    psnr = {g: float(np.mean(fedleak.metrics.match(fedleak.reconstruct(model, update, "ig", iterations=300, seed=0,
                                                                       focal_gamma=g), x, y).psnr))
            for g in (0.0, 2.0)}
    assert psnr[2.0] > psnr[0.0] + 10
    mlp = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0)
    x, y = fashion.batch(16, seed=0)
    rec = fedleak.reconstruct(mlp, fedleak.compute_gradient_update(mlp, x, y, focal_gamma=2.0), "auto", budget=5,
                              progress=False, iterations=50, focal_gamma=2.0)
    assert int(rec.certified.sum()) >= 8 and fedleak.metrics.match(rec, x, y).false_certificates == 0
    with pytest.raises(fedleak.FedleakError, match="a focal loss takes class indices.*learn_labels=False"):
        fedleak.reconstruct(model, update, "dlg", focal_gamma=2.0, iterations=2)


def test_a_cnn_of_a_focal_client(digits):
    """The conv blocks' inversion and the whole-batch check recompute the focal client's gradient."""
    from fedleak.models.convnet import make_convnet

    model = make_convnet(digits.input_shape, 10, channels=(4,), kernel=3, padding=1, pool=None, fc_widths=(256,),
                         seed=0)
    x, y = digits.batch(4, seed=0)
    update = fedleak.compute_gradient_update(model, x, y, focal_gamma=2.0)
    told = fedleak.reconstruct(model, update, focal_gamma=2.0)
    plain = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y))
    assert told.num_certified == plain.num_certified >= 3
    assert fedleak.metrics.match(told, x, y).false_certificates == 0


def test_trap_weights_take_the_focal_loss_and_imprint_refuses_it(fashion):
    """A trap-weight server told a focal client's exponent certifies what it certifies of a cross-entropy client
    (its recomputed gradients and whole-batch proof carry each sample's factor); imprint's counting proof bounds the
    cross-entropy's loss vectors, so it refuses the option (read as a cross-entropy client's, it stays sound)."""
    from fedleak.attacks.malicious import imprint_weights, trap_weights

    model = trap_weights(fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0), seed=0)
    x, y = fashion.batch(16, seed=300)
    plain = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), "trap-weights")
    focal = fedleak.compute_gradient_update(model, x, y, focal_gamma=2.0)
    told = fedleak.reconstruct(model, focal, "trap-weights", focal_gamma=2.0)
    assert told.num_certified == plain.num_certified >= 12
    assert fedleak.metrics.match(told, x, y).false_certificates == 0
    assert fedleak.reconstruct(model, focal, "trap-weights").num_certified < told.num_certified
    imprinted = imprint_weights(fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=0), fashion.x[:200], seed=0)
    with pytest.raises(fedleak.OptionError, match="imprint attack's counting proof .* takes no focal_gamma"):
        fedleak.reconstruct(imprinted, fedleak.compute_gradient_update(imprinted, x, y, focal_gamma=2.0), "imprint",
                            focal_gamma=2.0)


@pytest.mark.parametrize("data, seed, size", [("digits", 47, 8), ("fashion", 63, 16)])
def test_trap_weights_not_told_a_focal_loss_certify_no_blend(request, data, seed, size):
    """Read as a cross-entropy client's, a focal client's samples (γ = 5, an untrained model) spread about 1% around
    their common scale, so no two share it; two blends of like samples read off several rows each, or two blends
    that agree by chance, voted twice that scale, and those blends were certified (max abs errors 0.34 and 0.50).
    Copies of one input now vote once, and as many candidates around half the voted scale as voted refuse it."""
    from fedleak.attacks.malicious import trap_weights

    ds = request.getfixturevalue(data)
    model = trap_weights(fedleak.make_mlp(ds.input_shape, [1024], ds.num_classes, seed=seed), seed=seed)
    x, y = ds.batch(size, seed=300 + seed)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y, focal_gamma=5.0), "trap-weights")
    assert fedleak.metrics.match(rec, x, y).false_certificates == 0
