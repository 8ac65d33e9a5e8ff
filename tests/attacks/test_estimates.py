"""The exact route's estimates as points of the search: a warm-started sample the search moved goes back to its
estimate where the estimate explains the update better."""

import pytest
import torch

import fedleak
from fedleak.attacks.inversion import Estimate, Prior
from fedleak.attacks.inversion import search as search_module
from fedleak.attacks.inversion.estimates import restore_estimates

pytestmark = pytest.mark.usefixtures("one_thread")


def test_only_the_estimates_that_lower_the_objective_are_put_back():
    target = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    estimates = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the first is right, the second is wrong
    moved = torch.tensor([[1.5, 1.0], [2.1, 2.0], [3.0, 3.0]])

    def evaluate(x):
        return float(((x - target) ** 2).sum())

    x, value, restored = restore_estimates(moved, estimates, evaluate)
    assert restored == 1 and torch.equal(x[0], estimates[0]) and torch.equal(x[1:], moved[1:])
    assert value == pytest.approx(0.01, rel=1e-5)


def _search(model, update, x, y, known):
    prior = Prior(tuple(Estimate(int(y[k]), "given", x[k]) for k in known))
    return fedleak.reconstruct(model, update, attack="ig", batch_size=len(x), labels=y[list(known) + [3]],
                               prior=prior, iterations=150, restarts=1, progress=False, seed=0)


def test_exact_estimates_survive_a_search_for_the_rest(digits, monkeypatch):
    """Three exact estimates and one unknown sample: the search, chasing the unknown one, moves the estimates off;
    they come back exact. Without the step (monkeypatched away) they do not."""
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(4, seed=3)
    update = fedleak.compute_gradient_update(model, x, y)
    rec = _search(model, update, x, y, [0, 1, 2])
    errors = (rec.inputs[:3] - x[:3]).abs().amax(dim=(1, 2, 3))
    assert (errors < 1e-6).all()
    assert any("set back to the estimate" in n for n in rec.notes)
    monkeypatch.setattr(search_module, "restore_estimates", lambda x, e, f: (x, f(x), 0))
    moved = _search(model, update, x, y, [0, 1, 2])
    assert (moved.inputs[:3] - x[:3]).abs().amax(dim=(1, 2, 3)).max() > 1e-3
