"""A federation whose clients train with another loss than the plain cross-entropy: their local step is of that
loss, the settings carry it to every party, and what cannot carry it is refused before anything starts."""

import pytest
import torch

import fedleak
from fedleak.errors import FedleakError, OptionError
from fedleak.federation import FederationSettings

pytest.importorskip("flwr")

SMALL = {"data": "digits", "hidden": (32,), "batch_size": 8, "test_size": 200, "public_size": 100}


def test_a_clients_step_is_of_its_loss_and_the_settings_carry_it():
    from fedleak.federation.client import local_update
    from fedleak.federation.settings import data_split, make_model

    def step(**loss):  # a fresh model each time: local_update trains it in place
        s = FederationSettings(**SMALL, **loss)
        model = make_model(s, data_split(s.data, s.test_size, s.public_size))
        return model, local_update(model, s, partition_id=0, server_round=1), s

    _, plain, _ = step()
    _, smoothed, settings = step(label_smoothing=0.2)
    assert FederationSettings.from_json(settings.to_json()) == settings and settings.loss.label_smoothing == 0.2
    fresh = make_model(settings, data_split(settings.data, settings.test_size, settings.public_size))
    want = fedleak.compute_gradient_update(fresh, smoothed.inputs, smoothed.labels, label_smoothing=0.2)
    for name, change in smoothed.delta.items():  # one SGD step at lr 0.1 of the smoothed loss
        assert torch.allclose(change, settings.lr * want.gradients[name], atol=1e-6)
        assert not torch.allclose(change, plain.delta[name], atol=1e-6)


def test_what_cannot_carry_the_clients_loss_is_refused():
    with pytest.raises(FedleakError, match=r"'imprint' reads a plain cross-entropy's update"):
        FederationSettings(**SMALL, threat="imprint", focal_gamma=2.0)
    with pytest.raises(OptionError, match=r"step defense 'dp-sgd' .* plain cross-entropy"):
        FederationSettings(**SMALL, defenses=("dp-sgd:noise_multiplier=0.5,max_grad_norm=1",), label_smoothing=0.1)
    weighted = FederationSettings(**SMALL, class_weights=[1.0 + k for k in range(10)])
    assert weighted.class_weights == tuple(1.0 + k for k in range(10))
    assert FederationSettings.from_json(weighted.to_json()) == weighted
