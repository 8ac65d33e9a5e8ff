"""The client's and the server's computations run the same under the caller's torch.no_grad() or
torch.inference_mode(), also on data made inside inference mode, and what they return are ordinary tensors."""

import pytest
import torch

import fedleak
from fedleak.autograd_mode import autograd_on, ordinary, with_autograd

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def weights(model):
    return list(model.state_dict().values())


CLIENT = {  # each public function that computes a client's gradient, and what of its result is compared
    "compute_gradient_update": lambda m, x, y: list(fedleak.compute_gradient_update(m, x, y).gradients.values()),
    "local_training": lambda m, x, y: weights(fedleak.local_training(m, x, y, lr=0.1, local_steps=2)),
    "fedavg_update": lambda m, x, y: list(fedleak.fedavg_update(m, x, y, lr=0.1, local_steps=2).after.values()),
    "defended_gradient": lambda m, x, y: list(
        fedleak.defended_gradient(m, x, y, "top-k:ratio=0.1").update.gradients.values()),
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("client", sorted(CLIENT))
def test_a_clients_update_does_not_depend_on_the_callers_mode(digits, client, mode):
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    x, y = digits.batch(4, seed=0)
    plain = CLIENT[client](model, x, y)
    with MODES[mode]():
        xm, ym = digits.batch(4, seed=0)  # the data made in the caller's mode too
        inside = CLIENT[client](model, xm, ym)
    assert len(inside) == len(plain) and all(torch.equal(a, b) for a, b in zip(inside, plain))
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()


def test_with_autograd_turns_autograd_on_and_copies_inference_tensors():
    seen = {}

    @with_autograd
    def probe(a, *, b):
        seen.update(grad=torch.is_grad_enabled(), inference=torch.is_inference_mode_enabled(),
                    a=a.is_inference(), b=b)
        return a

    with torch.inference_mode():
        t = torch.ones(3)
        out = probe(t, b=5)
    assert seen == {"grad": True, "inference": False, "a": False, "b": 5}
    assert not out.is_inference() and torch.equal(out, t)
    plain = torch.ones(2)
    assert ordinary(plain) is plain and ordinary("x") == "x"
    with torch.inference_mode():
        with autograd_on():
            assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        assert torch.is_inference_mode_enabled() and not torch.is_grad_enabled()  # the caller's modes, restored


SERVER = {  # the server's analyses that differentiate the model, and what of their result is compared
    "fish": lambda m, x, y: [fedleak.fish(m, x, y).inputs],
    "analyze_exclusivity": lambda m, x, y: [torch.from_numpy(fedleak.analyze_exclusivity(m, x, y).certifiable)],
}


@pytest.mark.parametrize("analysis", sorted(SERVER))
def test_the_servers_analyses_do_not_depend_on_the_callers_mode(digits, analysis):
    model = fedleak.make_convnet(digits.input_shape, 10, channels=(4,), kernel=3, padding=1, pool=None,
                                 fc_widths=(64,), seed=0)
    x, y = digits.batch(2, seed=0)
    plain = SERVER[analysis](model, x, y)
    with torch.inference_mode():
        inside = SERVER[analysis](model, x, y)
    assert all(torch.equal(a, b) for a, b in zip(inside, plain))
