"""Layers whose weight weight normalisation computes (fedleak.nets.weight_norm): the exact methods and the first-layer
attack read such a layer as the plain layer with that weight, the weight's gradient rebuilt from g's and v's, and
certify what the plain twin's gradient certifies; updates that are not the model's gradient certify nothing."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils import parametrizations
from user_models import sized_gradient

import fedleak
from fedleak.errors import ModelError
from fedleak.nets.dense_norms import fold_dense_norms


def _old_form(layer: nn.Module, dim: int | None = 0) -> nn.Module:
    with warnings.catch_warnings():  # deprecated by torch, still in users' code
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(layer, dim=dim)


FORMS = {"parametrization": parametrizations.weight_norm, "hook": _old_form}


class Normed(nn.Module):
    """A user's MLP with every Linear layer under weight normalisation, its g drawn away from v's norms."""

    def __init__(self, inputs: int, classes: int, form: str = "parametrization", dim: int | None = 0,
                 act=F.relu) -> None:
        super().__init__()
        self.fc1 = FORMS[form](nn.Linear(inputs, 256), dim=dim)
        self.fc2 = FORMS[form](nn.Linear(256, classes), dim=dim)
        self.act = act
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith(("original0", "weight_g")):
                    p.mul_(torch.empty(p.shape).uniform_(0.5, 2.0, generator=gen))

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.view(x.size(0), -1))))


def _twin(model: Normed) -> nn.Sequential:
    """Plain Linear layers with the weights the normalisation computes."""
    with torch.no_grad():
        model(torch.zeros(1, model.fc1.in_features))  # (the older form sets the weight in forward)
    twin = nn.Sequential(nn.Flatten(), nn.Linear(model.fc1.in_features, 256), nn.ReLU(),
                         nn.Linear(256, model.fc2.out_features))
    with torch.no_grad():
        for plain, normed in ((twin[1], model.fc1), (twin[3], model.fc2)):
            plain.weight.copy_(normed.weight)
            plain.bias.copy_(normed.bias)
    return twin.eval()


def _model(data: fedleak.Dataset, **kwargs) -> Normed:
    torch.manual_seed(0)
    return Normed(data.x[0].numel(), data.num_classes, **kwargs).eval()


@pytest.mark.parametrize("form", sorted(FORMS))
def test_the_rebuilt_gradient_is_the_weights(digits, form):
    model = _model(digits, form=form)
    x, y = digits.batch(4, seed=3)
    fold = fold_dense_norms(model)
    assert fold is not None and [f.layer for f in fold.weight_norms] == ["fc1", "fc2"]
    grads = dict(sized_gradient(model, x, y).gradients)
    assert fold.gradient(fedleak.GradientUpdate(grads)).misfit == ""
    rebuilt = fold.gradient(fedleak.GradientUpdate(grads)).update.gradients
    plain = sized_gradient(_twin(model), x, y).gradients
    for name, twin_name in (("fc1.weight", "1.weight"), ("fc2.weight", "3.weight")):
        scale = float(plain[twin_name].abs().max())
        assert float((rebuilt[name] - plain[twin_name]).abs().max()) <= 1e-5 * scale


@pytest.mark.parametrize("form", sorted(FORMS))
def test_a_normalised_model_certifies_what_its_twin_certifies(digits, form):
    model = _model(digits, form=form)
    x, y = digits.batch(4, seed=3)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y))
    twin = fedleak.reconstruct(_twin(model), sized_gradient(_twin(model), x, y))
    score, twin_score = fedleak.metrics.match(rec, x, y), fedleak.metrics.match(twin, x, y)
    assert rec.num_certified == twin.num_certified == 4
    assert score.false_certificates == 0
    assert set(score.certified_original.tolist()) == set(twin_score.certified_original.tolist())
    assert any("weight normalisation on 'fc1'" in n for n in rec.notes)
    assert model.fc1.weight.shape == (256, 64)  # the user's model keeps its normalisation


def test_a_one_step_weight_change_is_read_through_the_normalisation(fashion):
    model = _model(fashion)
    x, y = fashion.batch(8, seed=1)
    change = fedleak.fedavg_update(model, x, y, lr=0.5, local_steps=1)
    rec = fedleak.reconstruct(model, change, attack="exclusivity")
    score = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified >= 4 and score.false_certificates == 0


def test_a_one_step_change_with_weight_decay_is_peeled_through_the_normalisation(digits):
    model = _model(digits, form="hook")  # (a FedAvg client deep-copies the older form's model too)
    x, y = digits.batch(4, seed=3)
    change = fedleak.fedavg_update(model, x, y, lr=0.5, local_steps=1, weight_decay=5e-3)
    rec = fedleak.reconstruct(model, change, attack="exclusivity")
    assert rec.num_certified >= 2 and fedleak.metrics.match(rec, x, y).false_certificates == 0
    assert any("weight decay" in n for n in rec.notes)


def test_several_local_steps_do_not_fit_and_certify_nothing(digits):
    model = _model(digits, form="hook")  # (a FedAvg client deep-copies the older form's model too)
    x, y = digits.batch(4, seed=3)
    change = fedleak.fedavg_update(model, x, y, lr=0.5, local_steps=3)
    rec = fedleak.reconstruct(model, change, attack="exclusivity")
    assert rec.num_certified == 0


def test_an_update_that_is_not_the_models_gradient_certifies_nothing(digits):
    model = _model(digits)
    x, y = digits.batch(4, seed=3)
    grads = dict(sized_gradient(model, x, y).gradients)
    gen = torch.Generator().manual_seed(0)
    noised = {n: g + 1e-3 * g.abs().max() * torch.randn(g.shape, generator=gen) for n, g in grads.items()}
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(noised, num_examples=4), attack="exclusivity")
    assert rec.num_certified == 0 and any("not the same multiple of v" in n for n in rec.notes)
    scaled = {n: g * (2.0 if n.endswith("original0") else 0.5 if n.endswith("original1") else 1.0)
              for n, g in grads.items()}  # g's and v's rescaled apart: orthogonal still, no gradient of the model
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(scaled, num_examples=4), attack="exclusivity")
    assert rec.num_certified == 0


def test_a_whole_tensor_normalisation_says_why_it_certifies_nothing(fashion):
    model = _model(fashion, dim=None)
    x, y = fashion.batch(4, seed=3)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
    assert rec.num_certified == 0
    assert any("dim=None: the whole tensor" in n and "above max_noise" in n for n in rec.notes)


def test_the_first_layer_attack_reads_a_normalised_first_layer(fashion):
    model = _model(fashion, act=F.gelu)  # (not a ReLU network: the first-layer route)
    x, y = fashion.batch(1, seed=5)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="first-layer")
    assert rec.num_certified == 1
    assert float((rec.inputs[0].reshape(-1) - x[0].reshape(-1)).abs().max()) <= 1e-4


class NormedConv(nn.Module):
    def __init__(self, head: bool) -> None:
        super().__init__()
        self.conv = parametrizations.weight_norm(nn.Conv2d(1, 4, 3, padding=1))
        self.fc1 = nn.Linear(4 * 8 * 8, 512)
        if head:
            self.fc1 = parametrizations.weight_norm(self.fc1)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1))))


def _plain_conv(model: NormedConv) -> nn.Sequential:
    twin = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 512), nn.ReLU(),
                         nn.Linear(512, 10))
    with torch.no_grad():
        for plain, normed in ((twin[0], model.conv), (twin[3], model.fc1), (twin[5], model.fc2)):
            plain.weight.copy_(normed.weight)
            plain.bias.copy_(normed.bias)
    return twin.eval()


def test_a_cnn_certifies_through_normalised_conv_layers_and_a_normalised_head(digits):
    """A normalised head's rebuilt gradient carries its rounding bound into the features the conv inversion starts
    from (:mod:`fedleak.attacks.exact.feature_noise`): the same certificates as the plain twin's, with larger bounds
    that the samples keep (before, a normalised head certified nothing below conv layers)."""
    x, y = digits.batch(2, seed=3)
    for head in (False, True):
        torch.manual_seed(0)
        model = NormedConv(head=head).eval()
        rec = fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")
        twin = _plain_conv(model)
        twin_rec = fedleak.reconstruct(twin, sized_gradient(twin, x, y), attack="exclusivity")
        assert rec.num_certified == twin_rec.num_certified == 2
        assert fedleak.metrics.match(rec, x, y).false_certificates == 0
        if head:
            assert bool((rec.error_bounds > twin_rec.error_bounds).all())


class NormedThenNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = parametrizations.weight_norm(nn.Linear(64, 256))
        self.bn = nn.BatchNorm1d(256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.bn(self.fc1(x.flatten(1)))))


def test_a_normalised_layer_with_a_norm_folded_into_it_is_refused_by_name(digits):
    model = NormedThenNorm().eval()
    x, y = digits.batch(2, seed=3)
    with pytest.raises(ModelError, match="'fc1' has weight normalisation and a BatchNorm1d"):
        fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")


def test_a_spectral_norm_is_still_refused_by_name(digits):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), parametrizations.spectral_norm(nn.Linear(64, 256)), nn.ReLU(),
                          nn.Linear(256, 10)).eval()
    x, y = digits.batch(2, seed=3)
    with pytest.raises(ModelError, match="parametrizations.weight.original"):
        fedleak.reconstruct(model, sized_gradient(model, x, y), attack="exclusivity")


def test_the_first_layer_rows_of_a_normalised_models_change_are_read(digits):
    model = _model(digits)
    x, y = digits.batch(4, seed=3)
    change = fedleak.fedavg_update(model, x, y, lr=0.5, local_steps=3, weight_decay=5e-3)
    rec = fedleak.reconstruct(model, change, attack="first-layer")
    score = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == 0 and score.false_certificates == 0
    assert len(rec) >= 1 and float(np.nanmax(score.psnr)) >= 60  # a sample of units that fire for it alone, exact


def test_a_model_under_the_older_form_after_a_training_step_is_attacked(digits):
    """The older hook keeps the last weight it computed, with its autograd graph: a copy of the model (the weights
    before a change, a client's copy) must not fail on it."""
    model = _model(digits, form="hook")
    x, y = digits.batch(4, seed=3)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()  # (the weight attribute now has a graph)
    model.zero_grad()
    model.eval()
    change = fedleak.fedavg_update(model, x, y, lr=0.5, local_steps=1)
    rec = fedleak.reconstruct(model, change, attack="exclusivity")
    assert rec.num_certified >= 2 and fedleak.metrics.match(rec, x, y).false_certificates == 0
