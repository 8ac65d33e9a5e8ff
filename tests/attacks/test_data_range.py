"""The range the client's inputs live on (``data_range``): the boxed searches (IG, DLM, DLM+) search inside it, auto
hands it to both its routes and, not given, widens its search's box to the inputs its exact route rebuilt; attacks
that do not read it refuse it. Data normalised as Flower's quickstart does (mean and std 0.5: [-1, 1])."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from user_models import GeluMLP

import fedleak

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def flower_digits(digits):
    return digits.normalized(0.5, 0.5)


def _pixel_psnr(rec, data, x, y):
    scores = fedleak.metrics.match(rec, x, y, data_range=data.pixel_range, normalization=data.normalization)
    return float(np.mean(scores.psnr))


@pytest.mark.parametrize("attack", ["ig", "dlm+"])
def test_a_boxed_search_searches_inside_the_data_s_range(flower_digits, attack):
    """By default the box is [0, 1], which holds no background pixel of this data (-1): the search's result is far
    off and its notes say which box it assumed. Given the data's range it searches there and finds the batch."""
    torch.manual_seed(0)
    model = GeluMLP(64, 64, 10).eval()
    x, y = flower_digits.batch(2, seed=1)
    update = (fedleak.compute_gradient_update(model, x, y) if attack == "ig"
              else fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1))
    run = {"iterations": 200, "seed": 0, "input_shape": flower_digits.input_shape}
    blind = fedleak.reconstruct(model, update, attack, **run)
    told = fedleak.reconstruct(model, update, attack, data_range=flower_digits.value_range, **run)
    assert blind.inputs.min() >= 0.0 and any("its default box" in n and "data_range" in n for n in blind.notes)
    assert told.inputs.min() >= -1.0 and told.inputs.max() <= 1.0 and told.inputs.min() < -0.5
    assert not any("its default box" in n for n in told.notes)
    assert _pixel_psnr(told, flower_digits, x, y) > _pixel_psnr(blind, flower_digits, x, y) + 20


def test_an_unboxed_search_refuses_the_range_and_a_given_box_wins(flower_digits):
    torch.manual_seed(0)
    model = GeluMLP(64, 32, 10).eval()
    x, y = flower_digits.batch(1, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    with pytest.raises(fedleak.OptionError, match="'dlg' does not read the data's range"):
        fedleak.reconstruct(model, update, "dlg", data_range=(-1, 1), iterations=2)
    with pytest.raises(fedleak.FedleakError, match="dlg attack searches unboxed.*box=\\(low, high\\)"):
        fedleak.attacks.get_attack("dlg").run(model, update, data_range=(-1, 1), iterations=2)  # the registry's own
    with pytest.raises(fedleak.FedleakError, match="data_range must be finite with low < high"):
        fedleak.reconstruct(model, update, "ig", data_range=(1, -1), iterations=2)
    boxed = fedleak.reconstruct(model, update, "ig", data_range=(-1, 1), box=(0.0, 0.5), iterations=20, seed=0,
                                input_shape=flower_digits.input_shape)
    assert boxed.inputs.min() >= 0.0 and boxed.inputs.max() <= 0.5


def test_auto_widens_its_search_to_the_inputs_its_exact_route_rebuilt(flower_digits):
    """Not told the range, auto still knows it is not [0, 1] where the inputs its exact route rebuilt leave it:
    the search then holds them and searches the rest inside the least range that holds them (a note says so);
    told the range, both routes take it and no such note is needed."""
    model = fedleak.make_mlp(flower_digits.input_shape, [64], 10, seed=0)
    x, y = flower_digits.batch(8, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    blind = fedleak.reconstruct(model, update, "auto", budget=6, progress=False, iterations=150, seed=0)
    widened = [n for n in blind.notes if "beyond the search's default box" in n]
    assert widened and "it searches in [-1, 1]" in widened[0]
    searched = ~blind.certified
    assert searched.any() and blind.inputs[searched].min() < 0
    told = fedleak.reconstruct(model, update, "auto", budget=6, progress=False, iterations=150, seed=0,
                               data_range=flower_digits.value_range)
    assert not any("default box" in n for n in told.notes)
    assert int(told.certified.sum()) == int(blind.certified.sum())
    assert fedleak.metrics.match(told, x, y, data_range=(-1, 1)).false_certificates == 0


def test_an_attack_that_does_not_read_the_range_refuses_it(flower_digits):
    model = fedleak.make_mlp(flower_digits.input_shape, [32], 10, seed=0)
    x, y = flower_digits.batch(2, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    with pytest.raises(fedleak.OptionError, match="'trap-weights' does not read the data's range.*auto, "
                                                  "class-fishing, conv-exclusivity, dlm, dlm\\+, exclusivity, ig"):
        fedleak.reconstruct(model, update, "trap-weights", data_range=(-1, 1))


def test_the_search_steps_in_units_of_the_data_s_range():
    """Unscaled tabular records (scikit-learn's breast-cancer table: 30 features in [0, 4254]): Adam's step on the
    inputs is ``lr`` times the box's width, so IG crosses the range; in absolute units (0.1 per step, 500 steps) it
    could move no input by more than 50 of it, and stayed at about 5 dB."""
    from sklearn.datasets import load_breast_cancer

    table = load_breast_cancer()
    x_all = torch.tensor(table.data, dtype=torch.float32).reshape(-1, 1, 1, 30)
    data = fedleak.Dataset("breast-cancer", x_all, torch.tensor(table.target), tuple(table.target_names),
                           value_range=(0.0, float(x_all.max())))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(30, 64), torch.nn.GELU(), torch.nn.Linear(64, 2))
    x, y = data.batch(1, seed=0)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), "ig", iterations=500, seed=0,
                              data_range=data.value_range, input_shape=data.input_shape)
    assert _pixel_psnr(rec, data, x, y) > 20
