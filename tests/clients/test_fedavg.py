"""FedAvg clients: local training on a copy, reproducible, and the update a server sees."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.attacks.inversion import FunctionalModel, prepare_target
from fedleak.clients import fedavg_update, local_training

pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.fixture()
def small(digits):
    x, y = digits.batch(4, seed=3)
    return fedleak.make_mlp(digits.input_shape, [16], 10, seed=1), x, y


def test_one_sgd_step_is_learning_rate_times_gradient(small):
    model, x, y = small
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    upd = fedavg_update(model, x, y, lr=0.3, local_steps=1)
    for name, d in upd.delta().items():
        torch.testing.assert_close(d, 0.3 * grads[name], rtol=1e-4, atol=1e-7)
    assert upd.num_examples == 4 and upd.local_steps is None  # steps stay private by default
    assert upd.learning_rate is None  # and so does the rate, unless the server is to know it
    told = fedavg_update(model, x, y, lr=0.3, local_steps=1, reveal_learning_rate=True)
    assert told.learning_rate == 0.3 and all(torch.equal(told.after[k], upd.after[k]) for k in upd.after)


def test_model_untouched_and_seeded(small):
    model, x, y = small
    state = {k: v.clone() for k, v in model.state_dict().items()}
    a = fedavg_update(model, x, y, lr=0.1, local_steps=3, optimizer="adam", batch_size=2, seed=5,
                      reveal_local_steps=True)
    b = fedavg_update(model, x, y, lr=0.1, local_steps=3, optimizer="adam", batch_size=2, seed=5)
    c = fedavg_update(model, x, y, lr=0.1, local_steps=3, optimizer="adam", batch_size=2, seed=6)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert a.local_steps == 3
    assert all(torch.equal(a.after[k], b.after[k]) for k in a.after)
    assert any(not torch.equal(a.after[k], c.after[k]) for k in a.after)  # other mini-batch order


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_attack_unroll_reproduces_the_client(small, optimizer):
    """The attacks' differentiable unroll, fed the true data and learning rate, gives the client's ΔW."""
    model, x, y = small
    upd = fedavg_update(model, x, y, lr=0.05, local_steps=4, optimizer=optimizer)
    target = prepare_target(model, upd)
    fm = FunctionalModel(model, target)
    sim = fm.simulate(x, y, kind="weights", lr=torch.tensor(0.05), steps=4, optimizer=optimizer)
    for s, t in zip(sim, target.tensors):
        torch.testing.assert_close(s.detach(), t, rtol=2e-3, atol=2e-6)


def test_bad_client_settings(small):
    model, x, y = small
    with pytest.raises(fedleak.FedleakError, match="optimizer"):
        local_training(model, x, y, lr=0.1, optimizer="rmsprop")
    with pytest.raises(fedleak.FedleakError, match="learning rate"):
        fedavg_update(model, x, y, lr=0.0)
    with pytest.raises(fedleak.FedleakError, match="local_steps"):
        fedavg_update(model, x, y, lr=0.1, local_steps=0)


def test_a_transform_runs_on_every_local_step_seeded_by_the_client(fashion):
    """A client that augments each mini-batch (a new flip and shift per step) trains on other images than the
    plain client; the same seed gives the same update, the caller's generator is left as it was."""
    from fedleak.defenses import make_defense

    x, y = fashion.batch(8, seed=1)
    model = fedleak.make_mlp(fashion.input_shape, [32], fashion.num_classes, seed=0)
    aug = make_defense("augmentation", padding=2)
    seen = []

    def recording(net, inputs, labels):
        out = aug(net, inputs, labels)
        seen.append(out[0])
        return out

    torch.manual_seed(5)
    before = torch.rand(1)
    torch.manual_seed(5)
    u = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=3, seed=4, transform=recording)
    assert torch.equal(torch.rand(1), before)  # the caller's generator did not move
    again = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=3, seed=4, transform=aug)
    plain = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=3, seed=4)
    assert len(seen) == 3 and not torch.equal(seen[0], seen[1]) and not torch.equal(seen[0], x)
    assert all(torch.equal(u.after[k], again.after[k]) for k in u.after)
    assert not all(torch.equal(u.after[k], plain.after[k]) for k in u.after)
