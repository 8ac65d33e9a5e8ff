"""The entry point every attack runs through: an attack's outcome does not depend on the caller's autograd mode."""

import contextlib

import pytest
import torch

import fedleak
from fedleak.attacks.registry import attack_specs
from fedleak.errors import FedleakError

MODES = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}
QUICK = {"iterations": 3}  # the optimisation attacks' budget, kept small; the others refuse the option


@pytest.fixture(scope="module")
def setting():
    data = fedleak.load_dataset("digits")
    x, y = data.batch(2, seed=0)
    model = fedleak.make_mlp(data.input_shape, [64], 10, seed=0)
    return model, {"gradient": fedleak.compute_gradient_update(model, x, y),
                   "weights": fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1)}


def attempt(model, update, attack, mode, options):
    """The attack's result, or the message of the FedleakError it raised."""
    try:
        with mode():
            return fedleak.reconstruct(model, update, attack, **options)
    except FedleakError as err:
        return str(err)


def outcome(model, update, attack, mode=contextlib.nullcontext):
    """The attack's rebuilt inputs and certificates (plain tensors, whatever the mode), or its error's message."""
    rec = attempt(model, update, attack, mode, QUICK)
    if isinstance(rec, str) and "unknown option" in rec:
        rec = attempt(model, update, attack, mode, {})
    if isinstance(rec, str):
        return rec
    assert not any(t.is_inference() for t in (rec.inputs, rec.labels, rec.certified))
    return rec.inputs, rec.certified


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("attack", sorted(fedleak.available_attacks()))
def test_every_attack_runs_the_same_under_the_callers_autograd_mode(setting, attack, mode):
    model, updates = setting
    kinds = fedleak.available_attacks()[attack].update_kinds
    for kind in kinds:
        plain = outcome(model, updates[kind], attack)
        inside = outcome(model, updates[kind], attack, MODES[mode])
        if isinstance(plain, str):
            assert inside == plain
        else:
            assert torch.equal(inside[0], plain[0]) and torch.equal(inside[1], plain[1])
    assert not torch.is_inference_mode_enabled() and torch.is_grad_enabled()


def test_a_list_of_gradients_in_parameter_order(setting):
    """``[p.grad for p in model.parameters()]`` or ``torch.autograd.grad``'s tuple is keyed by the model's names;
    a list of the wrong length, or in another order, is refused saying what to pass."""
    model, updates = setting
    grads = list(updates["gradient"].gradients.values())
    keyed = fedleak.reconstruct(model, dict(updates["gradient"].gradients))
    for listed in (grads, tuple(grads)):
        rec = fedleak.reconstruct(model, listed)
        assert torch.equal(rec.inputs, keyed.inputs) and torch.equal(rec.certified, keyed.certified)
    with pytest.raises(fedleak.UpdateError, match=r"list of 3 tensor\(s\), but the model has 4 trainable"):
        fedleak.reconstruct(model, grads[:3])
    with pytest.raises(fedleak.UpdateError,
                       match=r"entry 0 \(shape \(64,\)\) does not fit .*parameters\(\) or model.state_dict\(\) order"):
        fedleak.reconstruct(model, [grads[1], grads[0], *grads[2:]])


def test_num_examples_for_an_update_that_does_not_carry_it(digits):
    """A FedAvg reply as Flower delivers it (NDArrays) carries no batch size, which the weight route needs:
    ``num_examples=`` (the client's reported ``num-examples``) certifies it; a number that contradicts the update's
    own, or that is not a count, is refused."""
    x, y = digits.batch(4, seed=1)
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    reply = [v.numpy() for v in fedleak.fedavg_update(model, x, y, lr=0.1).after.values()]
    blind = fedleak.reconstruct(model, reply)
    assert not blind.certified.any() and "num_examples" in blind.samples[0].reason
    told = fedleak.reconstruct(model, reply, num_examples=4)
    assert told.certified.all() and len(told) == 4
    assert fedleak.metrics.match(told, x, y).recovered_fraction == 1.0
    with pytest.raises(fedleak.UpdateError, match="reports 4 examples, but num_examples=3"):
        fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), num_examples=3)
    with pytest.raises(fedleak.UpdateError, match="num_examples must be a whole number"):
        fedleak.reconstruct(model, reply, num_examples="4")


def _opacus(net):
    """``net`` as Opacus's ``PrivacyEngine.make_private`` returns it (a ``GradSampleModule``), hooks active."""
    from opacus import PrivacyEngine

    data = torch.utils.data.TensorDataset(torch.zeros(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    wrapped, _, _ = PrivacyEngine().make_private(module=net, optimizer=optimizer, data_loader=loader,
                                                 noise_multiplier=0.0, max_grad_norm=1.0, poisson_sampling=False)
    return wrapped


@pytest.mark.parametrize("wrap", [torch.nn.DataParallel, torch.compile, _opacus],
                         ids=["DataParallel", "torch.compile", "opacus"])
def test_a_wrapped_model_is_read_as_the_model_inside(wrap, digits):
    """``nn.DataParallel(net)``, ``torch.compile(net)`` or Opacus's ``GradSampleModule`` computes what ``net``
    does; its names carry a prefix. Every entry point reads the model inside: the client simulators name their
    updates as it does, and the attacks take those updates, dicts, gradient updates and weight updates under the
    wrapper's names, and the analysis; Opacus's hooks neither fail on fedleak's copies nor store what it
    computes."""
    x, y = digits.batch(4, seed=1)
    net = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    wrapped = wrap(net)
    gradient = fedleak.compute_gradient_update(wrapped, x, y)
    assert list(gradient.gradients) == [n for n, _ in net.named_parameters()]
    prefixed = dict(zip([n for n, _ in wrapped.named_parameters()], gradient.gradients.values()))
    weights = fedleak.fedavg_update(wrapped, x, y, lr=0.1)
    own = dict(zip(wrapped.state_dict(), weights.before))
    weights_prefixed = fedleak.WeightUpdate(before={k: weights.before[n] for k, n in own.items()},
                                            after={k: weights.after[n] for k, n in own.items()}, num_examples=4)
    updates = (gradient, prefixed, fedleak.GradientUpdate(prefixed, num_examples=4), weights, weights_prefixed)
    for update in updates:
        rec = fedleak.reconstruct(wrapped, update, num_examples=4)
        assert rec.certified.all() and fedleak.metrics.match(rec, x, y).recovered_fraction == 1.0
    assert any("the update's names carry the prefix" in n for n in rec.notes)
    assert fedleak.analyze_exclusivity(wrapped, x, y).certifiable.all()
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in wrapped.parameters())


@pytest.mark.parametrize("attack", sorted(fedleak.available_attacks()))
def test_every_attack_takes_the_data_range_as_its_registry_entry_says(setting, attack):
    """An attack whose registry entry reads the data's range takes ``data_range`` (whatever else it then says of
    this update); every other attack refuses it, naming those that read it."""
    model, updates = setting
    info = fedleak.available_attacks()[attack]
    update = updates[info.update_kinds[0]]
    got = attempt(model, update, attack, contextlib.nullcontext, {**(QUICK if info.optimises else {}),
                                                                   "data_range": (0.0, 1.0)})
    if info.reads_range:
        assert isinstance(got, fedleak.Reconstruction) or "data_range" not in got, got
    else:
        assert isinstance(got, str) and f"'{attack}' does not read the data's range" in got


@pytest.mark.parametrize("attack", sorted(name for name, spec in attack_specs().items() if spec.takes_loss))
@pytest.mark.parametrize("loss", [{"label_smoothing": 0.1}, {"class_weights": [1.0] * 10}, {"focal_gamma": 2.0}],
                         ids=["label_smoothing", "class_weights", "focal_gamma"])
def test_every_attack_that_takes_the_clients_loss_takes_each_option(setting, attack, loss):
    """An attack whose registry entry takes the client's loss (``takes_loss``, what ``fedleak audit`` tells it)
    takes each of its options on its own update kind, never as an unknown option."""
    model, updates = setting
    info = fedleak.available_attacks()[attack]
    got = attempt(model, updates[info.update_kinds[0]], attack, contextlib.nullcontext,
                  {**(QUICK if info.optimises else {}), **loss})
    assert isinstance(got, fedleak.Reconstruction) or "unknown option" not in got, got
