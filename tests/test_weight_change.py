"""A client's weight change (new - old, old - new) told from a gradient by the float spacing of the model's weights,
read as a weight update from them, with its sign read off the output layer or tried both ways."""

import copy

import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak.captured import READ_AS, read_captured
from fedleak.updates import WeightUpdate
from fedleak.weight_change import UNSIGNED, grid_evidence, other_sign
from tests.test_captured import _models


def _step(model, x, y, lr=0.1, steps=1, momentum=0.0):
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=lr, momentum=momentum)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(client(x), y).backward()
        opt.step()
    return {n: p.detach() for n, p in client.named_parameters()}


def test_gradients_in_any_format_are_not_read_as_changes(digits):
    x, y = digits.x[:8], digits.y[:8]
    for model in _models(digits):
        g = dict(fedleak.compute_gradient_update(model, x, y).gradients)
        for variant in (g, {k: -v for k, v in g.items()}, {k: 8 * v for k, v in g.items()},
                        {k: v.half().float() for k, v in g.items()}, {k: v.bfloat16().float() for k, v in g.items()}):
            evidence = grid_evidence(model, variant)
            assert not evidence.holds_change, evidence
            read, notes = read_captured(model, variant)
            assert isinstance(read, dict) and notes == ()


@pytest.mark.parametrize("lr,steps,momentum", [(0.01, 1, 0.0), (0.1, 1, 0.0), (0.05, 3, 0.9)])
def test_a_weight_change_of_either_sign_is_read_as_a_weight_update(digits, lr, steps, momentum):
    x, y = digits.x[:4], digits.y[:4]
    for model in _models(digits):
        new = _step(model, x, y, lr, steps, momentum)
        old = {n: p.detach() for n, p in model.named_parameters()}
        for sign in (1, -1):
            change = {n: sign * (new[n] - old[n]) for n in old}
            assert grid_evidence(model, change).holds_change
            read, notes = read_captured(model, change)
            assert isinstance(read, WeightUpdate) and "weight change" in notes[0] and notes[0] == read.metadata[READ_AS]
            assert not read.metadata[UNSIGNED]  # ten classes: the sign is read off the output layer
            for n in old:  # the weights after are the client's (exactly, but where new - old itself rounded)
                moved = (new[n] - old[n]).abs()
                assert bool(((read.after[n] - new[n]).abs() <= 1.2e-7 * moved).all()), n


def test_reconstruct_certifies_a_change_as_it_certifies_the_weights(digits):
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.x[:4], digits.y[:4]
    new = _step(model, x, y)
    old = {n: p.detach() for n, p in model.named_parameters()}
    as_weights = fedleak.reconstruct(model, new, num_examples=4)
    assert as_weights.num_certified == 4
    for sign in (1, -1):
        rec = fedleak.reconstruct(model, {n: sign * (new[n] - old[n]) for n in old}, num_examples=4)
        assert rec.num_certified == 4
        assert torch.equal(rec.inputs, as_weights.inputs) and torch.equal(rec.labels, as_weights.labels)


def test_two_classes_read_both_signs_and_certify_no_label_the_sign_leaves_open(lfw):
    torch.manual_seed(0)
    model = fedleak.make_mlp(lfw.input_shape, [256], 2, seed=0)
    old = {n: p.detach() for n, p in model.named_parameters()}
    for m in (1, 4):
        x, y = lfw.x[:m], lfw.y[:m]
        new = _step(model, x, y)
        reply = fedleak.reconstruct(model, new, num_examples=m)
        for sign in (1, -1):
            change = {n: sign * (new[n] - old[n]) for n in old}
            read, _ = read_captured(model, change)
            assert read.metadata[UNSIGNED] and other_sign(read) is not None
            rec = fedleak.reconstruct(model, change, num_examples=m)
            for i in range(len(rec)):
                if bool(rec.certified[i]):  # a certified sample carries its own label
                    j = int((x.flatten(1) - rec.inputs[i].reshape(1, -1)).abs().amax(1).argmin())
                    assert int(rec.labels[i]) == int(y[j])
            if m == 1:  # one sample: its label rests on the sign, which a change does not give
                assert rec.num_certified == 0 and "label is not proven" in rec.why_uncertified()
                searched = fedleak.reconstruct(model, change, attack="auto", num_examples=1, iterations=20,
                                               progress=False)  # the exact input is held, not searched away
                assert searched.num_certified == 0 and torch.allclose(searched.inputs[0], x[0], atol=1e-4)
                assert searched.routes[0].endswith("label unproven)")
            else:
                assert rec.num_certified == reply.num_certified > 0


@pytest.mark.parametrize("server", ["trap-weights", "imprint"])
def test_a_malicious_servers_attack_reads_a_two_class_change_of_either_sign(lfw, server):
    """Trap weights and imprint bins on a two-class change old - new, whose sign is not read: certified with the
    other sign, as the same change new - old is (trap weights certified none of 16 before, 25 over three batches)."""
    base = fedleak.make_mlp(lfw.input_shape, [1000], 2, seed=0)
    model = fedleak.trap_weights(base, seed=0) if server == "trap-weights" else \
        fedleak.imprint_weights(base, lfw.x[200:400], bins=64)
    x, y = lfw.batch(16, seed=5)
    new = _step(model, x, y)
    old = {n: p.detach() for n, p in model.named_parameters()}
    runs = [fedleak.reconstruct(model, {n: sign * (new[n] - old[n]) for n in old}, attack=server, num_examples=16)
            for sign in (1, -1)]
    assert runs[0].num_certified == runs[1].num_certified > 0
    assert any("other sign" in n for n in runs[1].notes) and not any("other sign" in n for n in runs[0].notes)
    for rec in runs:
        assert fedleak.metrics.match(rec, x, y).false_certificates == 0


def test_kind_change_is_read_as_told_and_refuses_other_names(digits):
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    new = _step(model, digits.x[:2], digits.y[:2])
    change = {n: new[n] - p.detach() for n, p in model.named_parameters()}
    read, notes = read_captured(model, change, "change")
    assert isinstance(read, WeightUpdate) and "weight change" in notes[0]
    with pytest.raises(fedleak.UpdateError, match="change"):
        read_captured(model, {**change, "extra": torch.zeros(1)}, "change")
    name = next(iter(change))
    for bad in (torch.zeros(1), None):  # a wrong shape (which would broadcast), or no tensor
        with pytest.raises(fedleak.UpdateError, match=f"change of '{name}'"):
            read_captured(model, {**change, name: bad}, "change")
    assert other_sign(fedleak.compute_gradient_update(model, digits.x[:2], digits.y[:2])) is None


def test_auto_searches_with_the_sign_the_certificates_settled(lfw):
    """A two-class change old - new: the exact route certifies it with the other sign, and the search that follows
    runs on that sign, as on new - old (read with the wrong sign, its images lost 5-7 dB: LFW, 16 samples)."""
    model = fedleak.make_mlp(lfw.input_shape, [256], 2, seed=0)
    x, y = lfw.x[:6], lfw.y[:6]  # more than half of the batch certifies (two classes, an unknown learning rate)
    new = _step(model, x, y)
    old = {n: p.detach() for n, p in model.named_parameters()}
    runs = [fedleak.reconstruct(model, {n: sign * (new[n] - old[n]) for n in old}, attack="auto", num_examples=6,
                                iterations=50, progress=False) for sign in (1, -1)]
    assert runs[0].num_certified == runs[1].num_certified > 0
    assert any("other sign" in n for n in runs[1].notes)
    assert torch.equal(runs[0].labels, runs[1].labels)  # and the same inputs, to the change's own rounding
    assert float((runs[0].inputs - runs[1].inputs).abs().max()) < 1e-4


@pytest.mark.parametrize("lr", [0.1, 0.03])
def test_a_change_divided_by_the_learning_rate_is_read_with_it(lfw, digits, lr):
    """A pseudo-gradient ``(old - new) / lr`` passed with the rate is read as the change it was divided from: it
    certifies what the weights certify with the rate (the version before refused the rate with a gradient, and read
    as a gradient without it, such an update certifies less); a gradient, or the pseudo-gradient with a rate that
    does not put it back on the weights' spacing, is refused with what to pass."""
    for data, classes in ((lfw, 2), (digits, 10)):
        certified = {"pseudo": 0, "rate": 0, "weights": 0}
        for seed in range(3):
            model = fedleak.make_mlp(data.input_shape, [512], classes, seed=seed)
            x, y = data.batch(8, seed=seed)
            new, old = _step(model, x, y, lr), {n: p.detach() for n, p in model.named_parameters()}
            pseudo = fedleak.GradientUpdate({n: (old[n] - new[n]) / lr for n in old}, num_examples=8)
            read = fedleak.reconstruct(model, pseudo, learning_rate=lr)
            assert any("divided by the learning rate given" in note for note in read.notes)
            weights = fedleak.reconstruct(model, WeightUpdate(old, new, num_examples=8, learning_rate=lr))
            assert read.num_certified == weights.num_certified
            torch.testing.assert_close(read.inputs[read.certified], weights.inputs[weights.certified], rtol=0,
                                       atol=1e-4)  # the same samples, each to its certificate's precision (1e-4)
            as_gradient = fedleak.reconstruct(model, pseudo)
            for rec in (read, as_gradient):
                assert fedleak.metrics.match(rec, x, y).false_certificates == 0
            # read once each (peeling, on the change's rounding, blurs the comparison of the two readings)
            certified["pseudo"] += fedleak.reconstruct(model, pseudo, peel=False).num_certified
            certified["rate"] += fedleak.reconstruct(model, pseudo, learning_rate=lr, peel=False).num_certified
        assert certified["rate"] > certified["pseudo"], certified
        assert grid_evidence(model, pseudo.gradients, lr).holds_change
        for wrong in (lr / 2, 2 * lr):  # off the spacing; on twice it everywhere
            assert not grid_evidence(model, pseudo.gradients, wrong).holds_change
            with pytest.raises(fedleak.FedleakError, match="this gradient's do not"):
                fedleak.reconstruct(model, pseudo, learning_rate=wrong)
        gradient = fedleak.compute_gradient_update(model, x, y)
        with pytest.raises(fedleak.FedleakError, match="a FedSGD gradient needs no learning rate"):
            fedleak.reconstruct(model, gradient, learning_rate=lr)
