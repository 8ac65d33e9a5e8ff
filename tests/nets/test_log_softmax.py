"""``torch.log(F.softmax(z, dim=1))`` read as ``F.log_softmax`` (fedleak.nets.log_softmax): a model written so for
NLLLoss is certified as its log_softmax twin is; a log of anything more stays refused."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.errors import ModelError

ENDINGS = {
    "log_softmax": lambda z, m: F.log_softmax(z, dim=1),
    "torch.log(F.softmax)": lambda z, m: torch.log(F.softmax(z, dim=1)),
    "softmax().log()": lambda z, m: z.softmax(-1).log(),
    "nn.Softmax then log": lambda z, m: torch.log(m.soft(z)),
}


class Ended(nn.Module):
    def __init__(self, ending: str) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)
        self.soft = nn.Softmax(dim=1)
        self.ending = ENDINGS[ending]

    def forward(self, x):
        return self.ending(self.fc2(F.relu(self.fc1(x.view(x.size(0), -1)))), self)


def _nll(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> fedleak.GradientUpdate:
    grads = torch.autograd.grad(F.nll_loss(model(x), y), list(model.parameters()))
    return fedleak.GradientUpdate({n: g for (n, _), g in zip(model.named_parameters(), grads)}, num_examples=len(x))


@pytest.mark.parametrize("ending", sorted(ENDINGS))
def test_the_log_of_a_softmax_is_read_as_log_softmax(digits, ending):
    x, y = digits.batch(4, seed=3)
    torch.manual_seed(0)
    model = Ended(ending).eval()
    torch.manual_seed(0)
    twin = Ended("log_softmax").eval()
    rec, twin_rec = fedleak.reconstruct(model, _nll(model, x, y)), fedleak.reconstruct(twin, _nll(twin, x, y))
    score = fedleak.metrics.match(rec, x, y)
    assert rec.num_certified == twin_rec.num_certified == 4 and score.false_certificates == 0
    assert set(score.certified_original.tolist()) == set(fedleak.metrics.match(twin_rec, x, y)
                                                         .certified_original.tolist())


def test_the_log_of_more_than_a_softmax_is_refused(digits):
    x, y = digits.batch(2, seed=3)
    torch.manual_seed(0)
    model = Ended("log_softmax").eval()
    model.ending = lambda z, m: torch.log(F.softmax(z, dim=1) + 1e-8)  # another loss: refused
    with pytest.raises(ModelError, match="softmax"):
        fedleak.reconstruct(model, _nll(model, x, y), attack="exclusivity")
