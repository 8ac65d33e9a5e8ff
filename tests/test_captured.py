"""What a server captured, read as it comes (fedleak.captured): lists named by the model, and a client's weights
told from a gradient."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak.captured import READ_AS, WEIGHTS_DISTANCE, named_like, read_captured, weights_evidence
from fedleak.models.flower import FlowerNet
from tests.user_models import DropoutMLP


class ConvBN(nn.Module):
    """A model with BatchNorm: its state dict has running statistics and an integer counter."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.relu(self.bn(self.conv(x))), 1))


def _trained(model, x, y, steps=1, lr=0.05, weight_decay=0.0):
    client = copy.deepcopy(model).train()
    opt = torch.optim.SGD(client.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(client(x), y).backward()
        opt.step()
    return client.state_dict()


def _models(digits):
    torch.manual_seed(0)
    return [fedleak.make_mlp(digits.input_shape, [32], 10, seed=0), DropoutMLP(64, 32, 10).eval(), ConvBN().eval(),
            fedleak.make_convnet((1, 8, 8), 10, channels=(4,), seed=0)]


def test_a_gradient_is_never_read_as_weights(digits):
    x, y = digits.x[:8], digits.y[:8]
    for model in _models(digits):
        for trained_steps in (0, 20):  # at initialisation, and after some training
            if trained_steps:
                model.load_state_dict(_trained(model, x, y, steps=trained_steps))
                model.eval()
            grads = dict(fedleak.compute_gradient_update(model, x, y).gradients)
            read, notes = read_captured(model, grads)
            evidence = weights_evidence(model, grads)
            assert isinstance(read, dict) and notes == () and not evidence.holds_weights
            assert evidence.unchanged == 0 and evidence.distance > 2 * WEIGHTS_DISTANCE
            listed, _ = read_captured(model, list(grads.values()))
            assert list(listed) == list(grads)


@pytest.mark.parametrize("steps", [1, 5])
def test_a_clients_weights_are_read_as_a_fedavg_update(digits, steps):
    x, y = digits.x[:8], digits.y[:8]
    for model in _models(digits):
        after = _trained(model, x, y, steps=steps)
        for form in (after, list(after.values()), [v.numpy() for v in after.values()],
                     {k: v.numpy() for k, v in after.items()}):
            read, notes = read_captured(model, form)
            assert isinstance(read, fedleak.WeightUpdate), type(model).__name__
            assert set(read.after) == set(after) and all(torch.equal(read.after[k], after[k]) for k in after)
            assert all(torch.equal(read.before[k], v) for k, v in model.state_dict().items())
            assert len(notes) == 1 and "the client's weights" in notes[0]
            again, notes_again = read_captured(model, read)  # the note travels with the update
            assert again is read and notes_again == notes


def test_a_model_that_holds_the_clients_weights_is_named_as_the_mistake(digits):
    """Handing the attack the client's own trained model with its reply reads an update of zero: the message says
    which model to pass."""
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    model.load_state_dict(_trained(model, digits.x[:8], digits.y[:8]))
    for kind in ("auto", "weights"):
        with pytest.raises(fedleak.FedleakError, match="the round's weights, before the client's local training"):
            read_captured(model, model.state_dict(), kind)


def test_weights_moved_beyond_half_their_norm_are_read_as_told(tmp_path, digits):
    model = fedleak.make_mlp(digits.input_shape, [32], 10, seed=0)
    # a tiny batch overfit with weight decay: weights moved 1.6x their norm, none kept
    after = _trained(model, digits.x[:8], digits.y[:8], steps=50, weight_decay=1e-3)
    evidence = weights_evidence(model, after)
    assert evidence.distance > 1 and evidence.unchanged == 0
    torch.save(after, tmp_path / "after.pt")
    assert isinstance(fedleak.load_update(tmp_path / "after.pt", model), fedleak.GradientUpdate)
    told = fedleak.load_update(tmp_path / "after.pt", model, kind="weights")
    assert isinstance(told, fedleak.WeightUpdate) and "as told" in read_captured(model, told)[1][0]
    grads = fedleak.compute_gradient_update(model, digits.x[:8], digits.y[:8])
    torch.save(dict(grads.gradients), tmp_path / "g.pt")
    assert isinstance(fedleak.load_update(tmp_path / "g.pt", model, kind="gradient"), fedleak.GradientUpdate)
    fedleak.save_update(grads, tmp_path / "g.safetensors")
    with pytest.raises(fedleak.UpdateError, match="holds a gradient update, not weights"):
        fedleak.load_update(tmp_path / "g.safetensors", model, kind="weights")
    with pytest.raises(fedleak.UpdateError, match="needs the model"):
        fedleak.load_update(tmp_path / "after.pt", kind="weights")
    with pytest.raises(fedleak.UpdateError, match="kind must be one of 'auto', 'gradient', 'weights'"):
        fedleak.load_update(tmp_path / "after.pt", model, kind="delta")
    with pytest.raises(fedleak.UpdateError, match=r"unexpected \['extra'\]"):
        read_captured(model, {**after, "extra": torch.zeros(1)}, kind="weights")


def test_the_evidence_that_tells_weights_from_gradients(digits):
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.x[:8], digits.y[:8]
    after = _trained(model, x, y, steps=3)
    evidence = weights_evidence(model, after)
    # digits' always-blank pixels give their first-layer weights no gradient: kept bit for bit
    blank = int((x.flatten(1) == 0).all(0).sum())
    assert evidence.distance < 0.05 and evidence.unchanged >= 64 * blank > 0 and evidence.holds_weights
    decayed = weights_evidence(model, _trained(model, x, y, steps=3, weight_decay=1e-4))
    assert decayed.unchanged == 0 and decayed.holds_weights  # near the weights, though none is kept
    grads = weights_evidence(model, dict(fedleak.compute_gradient_update(model, x, y).gradients))
    assert not grads.holds_weights and grads.unchanged == 0
    far = {k: v + 10 * WEIGHTS_DISTANCE * v.abs().max() for k, v in after.items()}
    assert not weights_evidence(model, far).holds_weights  # too far from the round's weights, nothing kept


def test_a_list_is_named_by_parameters_or_state_dict(digits):
    model = ConvBN()
    params = [p.detach() for p in model.parameters()]
    state = list(model.state_dict().values())
    assert list(named_like(model, params)) == [n for n, _ in model.named_parameters()]
    assert list(named_like(model, state)) == list(model.state_dict())
    with pytest.raises(fedleak.UpdateError, match=r"list of 2 tensor\(s\), but the model has 6 trainable parameter"
                                                  r"\(s\), 6 parameter\(s\), 9 state dict entries"):
        named_like(model, params[:2])
    with pytest.raises(fedleak.UpdateError, match=r"entry 0 \(shape \(4,\)\) does not fit the model's 'conv.weight'"):
        named_like(model, [params[1], params[0], *params[2:]])


def test_reconstruct_and_plan_read_a_flower_reply(digits):
    """Flower's quickstart Net and its reply as Flower sends it: the state dict's values as numpy arrays."""
    torch.manual_seed(0)
    net = FlowerNet().eval()
    x = torch.rand(4, 3, 32, 32)
    y = torch.tensor([0, 1, 2, 3])
    reply = [v.numpy() for v in _trained(net, x, y).values()]
    rec = fedleak.reconstruct(net, reply, attack="dlm", iterations=2)
    assert any("the client's weights" in note for note in rec.notes)
    planned = fedleak.plan(net, reply)
    assert planned.update.kind == "weights"
    assert any("the client's weights" in note for note in planned.notes)
    with pytest.raises(fedleak.UpdateError, match="the client's weights are the model's own"):
        fedleak.reconstruct(net, [v.numpy() for v in net.state_dict().values()], attack="dlm")


def test_names_saved_through_a_wrapper_are_read_as_the_models(digits):
    """A client that trains under DataParallel/DDP or torch.compile sends its tensors named ``module.<name>`` or
    ``_orig_mod.<name>``: read with the model's names, said in a note, and certified as the plain update is."""
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.x[:3], digits.y[:3]
    grads = fedleak.compute_gradient_update(model, x, y).gradients
    for prefix in ("module.", "_orig_mod.", "module._orig_mod."):
        rec = fedleak.reconstruct(model, {prefix + k: v for k, v in grads.items()}, num_examples=3)
        assert rec.certified.all() and any(f"carry the prefix '{prefix}'" in note for note in rec.notes)
    reply = {"module." + k: v for k, v in fedleak.fedavg_update(model, x, y, lr=0.5).after.items()}
    update = fedleak.read_update(model, reply, num_examples=3)
    assert isinstance(update, fedleak.WeightUpdate) and "module." in update.metadata[READ_AS]
    assert fedleak.reconstruct(model, update, attack="exclusivity").certified.all()
    # names that do not differ by one common prefix are not guessed at
    mixed = {("module." if k.startswith("1.") else "") + k: v for k, v in grads.items()}
    with pytest.raises(fedleak.UpdateError, match="unexpected"):
        fedleak.reconstruct(model, mixed)


def test_numpy_arrays_are_copied(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    grads = {k: v.numpy().copy() for k, v in fedleak.compute_gradient_update(model, digits.x[:2],
                                                                             digits.y[:2]).gradients.items()}
    read, _ = read_captured(model, grads)
    told, _ = read_captured(model, grads, kind="gradient")
    assert all(isinstance(v, torch.Tensor) for v in told.values())
    first = next(iter(grads))
    grads[first][...] = np.nan
    assert torch.isfinite(read[first]).all()


def test_a_flower_reply_with_its_reported_count_is_certified(digits):
    """The user's flow: the round's model, the reply's NDArrays and FitRes.num_examples; one local SGD step."""
    model = fedleak.make_mlp(digits.input_shape, [1024], 10, seed=0).eval()
    certified = 0
    for seed in range(3):
        x, y = digits.batch(8, seed=seed)
        client = copy.deepcopy(model)
        opt = torch.optim.SGD(client.parameters(), lr=0.1)
        opt.zero_grad()
        F.cross_entropy(client(x), y).backward()
        opt.step()
        reply = [v.numpy() for v in client.state_dict().values()]
        update = fedleak.read_update(model, reply, num_examples=8)
        assert isinstance(update, fedleak.WeightUpdate) and update.num_examples == 8
        rec = fedleak.reconstruct(model, update)
        scores = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
        assert int(scores.false_certificates) == 0
        assert any("the client's weights" in note for note in rec.notes)
        certified += rec.num_certified
        blind = fedleak.reconstruct(model, reply)  # no count: nothing certified, and the reason says what to give
        assert blind.num_certified == 0 and "num_examples" in blind.samples[0].reason
    assert certified >= 12


def test_read_update_refuses_what_is_not_an_update(digits):
    model = fedleak.make_mlp(digits.input_shape, [16], 10, seed=0)
    with pytest.raises(fedleak.UpdateError, match="got str"):
        fedleak.read_update(model, "update.pt")
    grads = fedleak.compute_gradient_update(model, digits.x[:2], digits.y[:2])
    assert fedleak.read_update(model, grads) is grads
    assert fedleak.read_update(model, list(grads.gradients.values()), num_examples=2).num_examples == 2
    with pytest.raises(fedleak.UpdateError, match="num_examples"):
        fedleak.read_update(model, grads, num_examples=0)
