"""Unit/channel-level exclusivity of CNN batches and the CNN certifiable condition (real LFW faces):
``analyze_exclusivity`` reports the conv layers too when the network has conv blocks."""

import numpy as np
import torch

import fedleak
from fedleak.attacks.exact import conv_exclusivity_attack
from fedleak.models.convnet import make_convnet
from fedleak.updates import compute_gradient_update


def test_counts_and_certifiable_mask_agree_with_the_attack():
    x, y = fedleak.load_dataset("lfw").batch(4, seed=1)
    model = make_convnet((1, 25, 25), 2, channels=(6, 32), fc_widths=(128,), seed=0)
    # max_error (an attack option): the proven bound of a certified input, as a fraction of the data range
    rep = fedleak.analyze_exclusivity(model, x, y, max_error=0.5)
    assert len(rep.conv_layers) == 2 and len(rep.layers) == 1
    for c in rep.conv_layers:
        assert (c.unit_exans <= c.active_units).all() and (c.effective_unit_exans <= c.unit_exans).all()
        assert (c.channel_exans <= c.active_channels).all() and (c.active_channels <= c.channels).all()
    # a batch of 4 faces shares every channel of a 6-channel layer: channel-level exclusivity is rare
    assert rep.conv_layers[0].channel_exans.sum() <= rep.conv_layers[0].unit_exans.sum()
    assert (rep.certifiable <= rep.head_certifiable).all()
    assert (rep.certifiable == (rep.head_certifiable & np.all([c.solvable for c in rep.conv_layers], 0)
                                & (rep.error_bound <= rep.allowed_error))).all()
    d = rep.to_dict()
    assert d["condition"]["conv_blocks_solvable"] and len(d["conv_layers"]) == 2
    # the attack certifies exactly the samples the analysis calls certifiable (up to the batch certificate)
    rec = conv_exclusivity_attack(model, compute_gradient_update(model, x, y), fallback="none", max_error=0.5)
    assert rec.num_certified >= int(rep.certifiable.sum()) >= 1
    strict = fedleak.analyze_exclusivity(model, x, y, max_error=1e-3)  # proven to 1e-3 of the range: none here
    assert not strict.certifiable.any() and strict.allowed_error < rep.allowed_error
    assert (strict.head_certifiable == rep.head_certifiable).all()
    assert "certifiable" in rep.summary()


def test_channel_exclusivity_counts_on_a_tiny_example():
    model = make_convnet((1, 8, 8), 2, channels=(2,), fc_widths=(4,), seed=0)
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].weight[0, 0, 1, 1] = 1.0  # channel 0 copies the pixel
        model[0].weight[1, 0, 1, 1] = -1.0  # channel 1 is never active for non-negative images
        model[0].bias.zero_()
    x = torch.zeros(2, 1, 8, 8)
    x[0, 0, 2, 2] = 1.0  # only sample 0 lights channel 0
    rep = fedleak.analyze_exclusivity(model, x, torch.tensor([0, 1]), solve=False)
    c = rep.conv_layers[0]
    assert c.channel_exans.tolist() == [1, 0] and c.unit_exans.tolist() == [1, 0]
    assert not rep.certifiable.any()
