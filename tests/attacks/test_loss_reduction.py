"""A client whose loss sums over its batch (``reduction="sum"``) sends every sample at the scale 1, not 1/M: the
exclusivity attack certifies it with ``loss_reduction="sum"`` and the reported batch size; read as a mean-loss
gradient of the reported batch, the samples' common scale tells it is not one, and it is read as a gradient times
an unknown common factor (``known_scale=False``), saying so; without the batch size it certifies nothing and says
what the update is, never calling its samples blends."""

import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak import metrics

M = 8


@pytest.fixture(scope="module")
def batch(fashion):
    model = fedleak.make_mlp(fashion.input_shape, [1024], 10, seed=3)
    x, y = fashion.batch(M, seed=3)
    names = [n for n, _ in model.named_parameters()]

    def gradient(reduction: str) -> dict:
        loss = F.cross_entropy(model(x), y, reduction=reduction)
        return dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))

    return model, x, y, gradient("mean"), gradient("sum")


def test_a_summed_loss_is_certified_as_the_mean_one(batch):
    model, x, y, mean, total = batch
    as_mean = fedleak.reconstruct(model, fedleak.GradientUpdate(mean, num_examples=M))
    as_sum = fedleak.reconstruct(model, fedleak.GradientUpdate(total, num_examples=M), loss_reduction="sum")
    scores = metrics.match(as_sum, x, y)
    assert not scores.false_certificate.any()
    assert as_sum.num_certified == as_mean.num_certified >= M // 2
    assert (scores.max_abs_error[scores.certified] < 1e-4).all()
    assert as_sum.batch_size == M
    assert as_sum.label_counts.tolist() == torch.bincount(y, minlength=10).tolist()


def test_a_summed_loss_read_as_a_mean_one_says_so(batch):
    model, x, y, _, total = batch
    bare = fedleak.reconstruct(model, total)
    assert bare.num_certified == 0 and bare.batch_size is None  # not "a batch of 1"
    why = bare.why_uncertified()
    assert "not a mean-loss gradient" in why and "loss_reduction='sum'" in why
    reported = fedleak.reconstruct(model, fedleak.GradientUpdate(total, num_examples=M))
    assert reported.num_certified >= M // 2 and not metrics.match(reported, x, y).false_certificate.any()
    note = next(n for n in reported.notes if "unknown common factor" in n)
    assert "known_scale=False" in note and "pass loss_reduction='sum'" in note


def test_the_other_way_round_and_without_the_batch_size(batch):
    model, x, y, mean, total = batch
    wrong = fedleak.reconstruct(model, fedleak.GradientUpdate(mean, num_examples=M), loss_reduction="sum")
    assert wrong.num_certified >= M // 2 and any("pass loss_reduction='mean'" in n for n in wrong.notes)
    scaled = fedleak.reconstruct(model, fedleak.GradientUpdate({k: 3.7 * g for k, g in mean.items()}, num_examples=M))
    assert scaled.num_certified >= M // 2 and any("unknown common factor" in n for n in scaled.notes)
    assert not metrics.match(scaled, x, y).false_certificate.any()
    assert not metrics.match(wrong, x, y).false_certificate.any()
    unknown = fedleak.reconstruct(model, total, loss_reduction="sum")  # a summed loss does not reveal M
    assert unknown.num_certified == 0 and unknown.batch_size is None
    assert "number of examples" in unknown.why_uncertified()


def test_bad_loss_reduction(batch):
    model, _, _, mean, _ = batch
    with pytest.raises(fedleak.FedleakError, match="loss_reduction must be 'mean' or 'sum'"):
        fedleak.reconstruct(model, mean, loss_reduction="max")


def test_samples_weighed_apart_by_a_focal_loss_are_said_to_be_so(digits):
    """A focal loss ``-(1 - p_y)^2 log p_y`` sends each sample at its own multiple of the cross-entropy's gradient:
    nothing is certified (nothing falsely either), and the reason says the samples share no common factor and why
    that may be, not that one factor would do."""
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    with torch.no_grad():
        model[-1].weight.mul_(8)  # sure of some samples' classes, not of others: their probabilities differ
    x, y = digits.batch(4, seed=0)
    log_p = F.log_softmax(model(x), 1).gather(1, y[:, None]).squeeze(1)
    loss = (-(1 - log_p.exp()) ** 2 * log_p).mean()
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    rec = fedleak.reconstruct(model, fedleak.GradientUpdate(grads, num_examples=4))
    assert metrics.match(rec, x, y).false_certificates == 0 and not rec.certified.any()
    said = " ".join(rec.notes)
    assert "share no common factor either" in said and "(a focal loss: pass focal_gamma)" in said
    assert "known_scale=False" not in said


def test_a_batch_of_blends_only_is_said_to_be_so(lfw):
    """Faces standardised inside a user's forward (``(x - 0.3) / 0.35``) fire every neuron of a default-init layer
    for several samples: the candidates are blends at several times one sample's scale, and the reason says so
    before it names weighted losses."""

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = torch.nn.Linear(625, 1024), torch.nn.Linear(1024, 2)

        def forward(self, x):
            return self.fc2(F.relu(self.fc1((x.view(x.size(0), -1) - 0.3) / 0.35)))

    torch.manual_seed(0)
    model = Net().eval()
    x, y = lfw.batch(32, seed=0)
    assert not fedleak.analyze_exclusivity(model, x, y).certifiable.any()
    rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, x, y), data_range=(0.0, 1.0))
    said = " ".join(rec.notes)
    assert not rec.certified.any() and "each is a blend of samples that share their neurons" in said
