"""A simulated client's mode (fedleak.clients.mode): training mode as training loops run a model, or eval."""

import pytest
from torch import nn

from fedleak.clients.mode import check_client_mode, client_mode
from fedleak.errors import OptionError


def test_the_model_is_back_in_its_mode_after_the_client():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()
    with client_mode(model, "train"):
        assert model.training and model[1].training
    assert not model.training and not model[1].training
    with pytest.raises(RuntimeError), client_mode(model, "train"):
        raise RuntimeError("the client failed")
    assert not model.training
    with pytest.raises(OptionError, match="client_mode must be train or eval, got 'inference'"):
        check_client_mode("inference")


def test_each_module_is_back_in_its_own_mode():
    # a model trained with a frozen BatchNorm: the model in training mode, that layer in eval mode
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5)).train()
    model[1].eval()
    with client_mode(model, "eval"):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == [True, True, False, True]
