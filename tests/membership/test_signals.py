"""The membership signals of a binary classifier with one logit: read as its two-class twin, whose cross-entropy
is the binary cross-entropy the classifier trains with (its loss was a cross-entropy over one class: 0)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak.membership import Records, make_membership_attack, score_membership
from fedleak.membership.signals import per_record_gradients, record_logits, record_losses


class OneLogit(nn.Module):
    def __init__(self, sigmoid: bool = False, squeeze: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(625, 32)
        self.fc2 = nn.Linear(32, 1)
        self.sigmoid, self.squeeze = sigmoid, squeeze

    def forward(self, x):
        out = self.fc2(F.relu(self.fc1(x.flatten(1))))
        out = out.squeeze(1) if self.squeeze else out
        return torch.sigmoid(out) if self.sigmoid else out


@pytest.fixture(scope="module")
def lfw():
    return fedleak.load_dataset("lfw")


@pytest.mark.parametrize(("sigmoid", "squeeze"), [(False, False), (True, False), (False, True)])
def test_losses_and_per_record_gradients_are_the_binary_cross_entropy_s(lfw, sigmoid, squeeze):
    torch.manual_seed(0)
    model = OneLogit(sigmoid, squeeze).eval()
    x, y = lfw.batch(6, seed=2)
    records = Records(x, y)
    z = model.fc2(F.relu(model.fc1(x.flatten(1))))[:, 0].detach().double()
    assert record_logits(model, records).shape == (6, 2)
    bce = F.binary_cross_entropy_with_logits(z, y.double(), reduction="none")
    assert torch.allclose(record_losses(model, records), bce, atol=1e-6)
    grads = per_record_gradients(model, records)
    for i in range(6):
        out = model(x[i:i + 1]).reshape(1)
        loss = F.binary_cross_entropy(out, y[i:i + 1].float()) if sigmoid else \
            F.binary_cross_entropy_with_logits(out, y[i:i + 1].float())
        own = torch.autograd.grad(loss, list(model.parameters()))
        assert all(torch.allclose(grads[n][i], g, atol=1e-6) for (n, _), g in zip(model.named_parameters(), own))


def test_an_attack_scores_a_one_logit_target(lfw):
    """A loss attack on a one-logit model that memorised a few records' random labels tells them from held-out ones
    (its loss signal was 0 for every record before: a cross-entropy over one class)."""
    torch.manual_seed(0)
    model = OneLogit()
    labels = torch.randint(0, 2, (80,), generator=torch.Generator().manual_seed(1))
    members, others = Records(lfw.x[:20], labels[:20]), Records(lfw.x[200:260], labels[20:])
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(model(members.inputs)[:, 0], members.labels.float()).backward()
        opt.step()
    model.eval()
    candidates = Records(torch.cat([members.inputs, others.inputs]), torch.cat([members.labels, others.labels]))
    truth = torch.cat([torch.ones(20), torch.zeros(60)]).bool()
    scores = make_membership_attack("loss").score(fedleak.membership.Observation(model), candidates)
    assert score_membership(scores, truth).auc > 0.6
