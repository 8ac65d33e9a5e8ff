"""Binary classifiers with one logit and binary cross-entropy, attacked as their two-class softmax twin."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak import metrics


class BinaryNet(nn.Module):
    """A binary classifier as users write one: a single logit, trained with ``BCEWithLogitsLoss``."""

    def __init__(self, inputs: int, width: int = 1024):
        super().__init__()
        self.fc1 = nn.Linear(inputs, width)
        self.fc2 = nn.Linear(width, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


def bce_gradient(model, x, y):
    loss = F.binary_cross_entropy_with_logits(model(x).squeeze(1), y.float())
    return dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))


@pytest.fixture(scope="module")
def lfw():
    return fedleak.load_dataset("lfw")


def test_the_twin_s_cross_entropy_gradient_is_the_binary_one(lfw):
    torch.manual_seed(0)
    model = BinaryNet(625, 64).eval()
    x, y = lfw.batch(6, seed=1)
    twin = fedleak.binary_twin(model)
    assert torch.allclose(twin.model(x), torch.cat([torch.zeros(6, 1), model(x)], 1), atol=1e-6)
    observed = fedleak.GradientUpdate(bce_gradient(model, x, y), num_examples=6)
    own = fedleak.compute_gradient_update(twin.model, x, y)  # the twin's client: cross-entropy, two classes
    mapped = twin.gradient(observed)
    assert all(torch.allclose(mapped.gradients[k], own.gradients[k], atol=1e-7) for k in own.gradients)
    assert model.fc2.out_features == 1  # the model itself is not changed


def test_a_single_logit_model_s_updates_are_certified(lfw):
    """FedSGD and a one-step FedAvg update of a single-logit model on held-out two-class faces: certified, exact,
    with the note saying how the model was read; no false certificate."""
    torch.manual_seed(0)
    model = BinaryNet(625).eval()
    x, y = lfw.batch(8, seed=15)
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(bce_gradient(model, x, y), num_examples=8))
    scores = metrics.match(rec, x, y)
    assert rec.num_certified >= 6 and not scores.false_certificate.any()
    assert scores.recovered.sum() == rec.num_certified
    assert any("binary cross-entropy" in n for n in rec.notes)
    for batch, certified in ((4, 4), (8, 0)):  # at an unknown learning rate, more than half of the batch certifies
        x, y = lfw.batch(batch, seed=15)
        client = copy.deepcopy(model)
        opt = torch.optim.SGD(client.parameters(), lr=0.1)
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(client(x).squeeze(1), y.float()).backward()
        opt.step()
        weights = fedleak.WeightUpdate(model.state_dict(), client.state_dict(), num_examples=batch)
        rec = fedleak.reconstruct(model, weights)
        assert rec.num_certified == certified and not metrics.match(rec, x, y).false_certificate.any()
    assert any("a certificate needs more than half of the batch at one factor" in n for n in rec.notes)


def test_simulated_clients_of_a_single_logit_model_train_with_binary_cross_entropy(lfw):
    torch.manual_seed(0)
    model = BinaryNet(625, 64).eval()
    x, y = lfw.batch(6, seed=1)
    update = fedleak.compute_gradient_update(model, x, y)
    assert all(torch.equal(update.gradients[k], g) for k, g in bce_gradient(model, x, y).items())
    client = copy.deepcopy(model)
    opt = torch.optim.SGD(client.parameters(), lr=0.1)
    opt.zero_grad()
    F.binary_cross_entropy_with_logits(client(x).squeeze(1), y.float()).backward()
    opt.step()
    trained = fedleak.fedavg_update(model, x, y, lr=0.1, momentum=0.0)
    assert all(torch.allclose(trained.after[k], v) for k, v in client.state_dict().items())


def test_the_plan_reads_a_single_logit_model(lfw):
    torch.manual_seed(0)
    model = BinaryNet(625, 256).eval()
    x, y = lfw.batch(8, seed=15)
    result = fedleak.plan(model, fedleak.GradientUpdate(bce_gradient(model, x, y), num_examples=8), lfw)
    text = result.to_text()
    assert "cannot apply" not in text.splitlines()[0] and "noised" not in text
    assert "binary cross-entropy" in text and f"{sum(p.numel() for p in model.parameters()):,} parameters" in text


def test_analysis_fishing_and_the_audit_read_a_single_logit_model(lfw):
    """The exclusivity analysis and fishing read the twin too: the same activations, and its cross-entropy is the
    model's binary cross-entropy."""
    torch.manual_seed(0)
    model = BinaryNet(625, 512).eval()
    x, y = lfw.batch(16, seed=3)
    report = fedleak.analyze_exclusivity(model, x, y)
    twin_report = fedleak.analyze_exclusivity(fedleak.binary_twin(model).model, x, y)
    assert torch.equal(torch.as_tensor(report.certifiable), torch.as_tensor(twin_report.certifiable))
    fished = fedleak.fish(model, x, y)
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, fished.inputs, y))
    scores = metrics.match(rec, fished.inputs, y)
    assert rec.num_certified >= 12 and not scores.false_certificate.any()


class SigmoidNet(BinaryNet):
    """The other way users write a binary classifier: a sigmoid at the end, trained with ``BCELoss``."""

    def forward(self, x):
        return torch.sigmoid(super().forward(x))


def test_a_model_ending_with_a_sigmoid_is_read_at_its_logit(lfw):
    """``BCELoss(sigmoid(z), y)`` has the gradient of ``BCEWithLogitsLoss(z, y)`` at ``z``: the simulated client
    trains the model as written, and the attacks read it without its final sigmoid."""
    torch.manual_seed(0)
    model = SigmoidNet(625).eval()
    x, y = lfw.batch(8, seed=15)
    loss = F.binary_cross_entropy(model(x)[:, 0], y.float())
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    simulated = fedleak.compute_gradient_update(model, x, y)
    assert all(torch.allclose(simulated.gradients[k], g, atol=1e-8) for k, g in grads.items())
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(grads, num_examples=8))
    assert rec.num_certified >= 6 and not metrics.match(rec, x, y).false_certificate.any()
    assert any("ends with a sigmoid" in n for n in rec.notes)
    assert "SigmoidNet" in fedleak.plan(model, simulated, lfw).to_text().splitlines()[0]


class FunctionalBinaryNet(nn.Module):
    """The same classifier with its weights applied through F.linear (meta-learning code's style)."""

    def __init__(self, inputs: int, width: int = 1024):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(width, inputs, generator=gen) / inputs**0.5)
        self.b1 = nn.Parameter(torch.zeros(width))
        self.w2 = nn.Parameter(torch.randn(1, width, generator=gen) / width**0.5)
        self.b2 = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return F.linear(F.relu(F.linear(x.view(x.size(0), -1), self.w1, self.b1)), self.w2, self.b2)


def test_a_single_logit_of_functional_layers_is_read_as_its_twin(lfw):
    model = FunctionalBinaryNet(625).eval()
    x, y = lfw.batch(8, seed=15)
    twin = fedleak.binary_twin(model)
    assert twin.weight == "w2" and tuple(twin.model.w2.shape) == (2, 1024) and tuple(model.w2.shape) == (1, 1024)
    assert torch.allclose(twin.model(x), torch.cat([torch.zeros(8, 1), model(x)], 1), atol=1e-6)
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(bce_gradient(model, x, y), num_examples=8))
    scores = metrics.match(rec, x, y)
    assert rec.num_certified >= 6 and not scores.false_certificate.any()
    assert any("binary cross-entropy" in n for n in rec.notes)


class SqueezedNet(BinaryNet):
    """A binary classifier that squeezes its logit to one value per sample, as ``BCEWithLogitsLoss`` on float labels
    takes it (``(N,)`` outputs)."""

    def forward(self, x):
        return super().forward(x).squeeze(1)


class SqueezedSigmoidNet(BinaryNet):
    def forward(self, x):
        return torch.sigmoid(super().forward(x).view(-1))


class SqueezedConvNet(nn.Module):
    """A conv binary classifier ending with ``.view(-1)``: the input shape comes from probing it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 25 * 25, 512)
        self.fc2 = nn.Linear(512, 1)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(F.relu(self.conv(x)).flatten(1)))).view(-1)


@pytest.mark.parametrize(("make", "probability"), [(lambda: SqueezedNet(625), False),
                                                   (lambda: SqueezedSigmoidNet(625), True),
                                                   (SqueezedConvNet, False)])
def test_a_squeezed_logit_is_read_as_one_logit_per_sample(lfw, make, probability):
    """The client's own loss on the ``(N,)`` output is what the simulated client computes, the twin gives ``(0, z)``
    per sample (the squeeze and sigmoid after the output layer peeled), and the update is certified."""
    torch.manual_seed(0)
    model = make().eval()
    x, y = lfw.batch(4, seed=15)
    out = model(x)
    assert out.shape == (4,)
    loss = F.binary_cross_entropy(out, y.float()) if probability else F.binary_cross_entropy_with_logits(out, y.float())
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    simulated = fedleak.compute_gradient_update(model, x, y)
    assert all(torch.allclose(simulated.gradients[k], g, atol=1e-8) for k, g in grads.items())
    twin_model, _, notes = fedleak.binary.as_two_class(model)
    logits = twin_model(x)
    assert logits.shape == (4, 2) and torch.equal(logits[:, 0], torch.zeros(4))
    assert (any("ends with a sigmoid" in n for n in notes)) == probability
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(grads, num_examples=4))
    assert rec.num_certified >= 3 and not metrics.match(rec, x, y).false_certificate.any()
    assert fedleak.fedavg_update(model, x, y, lr=0.1).after.keys() == model.state_dict().keys()


def test_soft_labels_of_two_classes_train_a_single_logit_with_their_class_1_probability(lfw):
    """MixUp, InstaHide and label smoothing give soft labels (rows of two class probabilities): a single-logit
    client's binary cross-entropy takes the class-1 probability as its target (they were refused)."""
    torch.manual_seed(0)
    model = BinaryNet(625, 64).eval()
    x, y = lfw.batch(6, seed=1)
    q = torch.rand(6)
    soft = torch.stack([1 - q, q], 1)
    loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], q)
    own = torch.autograd.grad(loss, list(model.parameters()))
    update = fedleak.compute_gradient_update(model, x, soft)
    assert all(torch.allclose(update.gradients[n], g, atol=1e-7) for (n, _), g in zip(model.named_parameters(), own))
    with pytest.raises(fedleak.FedleakError, match="soft labels have 3 classes"):
        fedleak.compute_gradient_update(model, x, torch.full((6, 3), 1 / 3))


def test_the_label_mixing_defenses_run_on_a_single_logit_client(lfw):
    """MixUp and label smoothing read a single logit as two classes: label smoothing's soft labels give the binary
    cross-entropy with the target (1 - s) y + s / 2 (they refused, asking for num_classes)."""
    torch.manual_seed(0)
    model = BinaryNet(625, 64).eval()
    x, y = lfw.batch(6, seed=1)
    smoothed = fedleak.defended_gradient(model, x, y, "label-smoothing:smoothing=0.2").update
    loss = F.binary_cross_entropy_with_logits(model(x)[:, 0], 0.8 * y.float() + 0.1)
    own = torch.autograd.grad(loss, list(model.parameters()))
    assert all(torch.allclose(smoothed.gradients[n], g, atol=1e-7) for (n, _), g in zip(model.named_parameters(), own))
    assert fedleak.defended_gradient(model, x, y, "mixup").update.num_examples == 6
