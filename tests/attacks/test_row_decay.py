"""SGD's weight decay in a first layer's change over several local steps, estimated from silent units and peeled
before the rows are read (:mod:`fedleak.attacks.row_decay`)."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import fedleak
from fedleak import metrics
from fedleak.attacks.row_decay import peel_row_decay, read_row_decay


def _change(fashion, steps: int, **sgd):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 10))
    trained = copy.deepcopy(model)
    x, y = fashion.batch(8, seed=1)
    opt = torch.optim.SGD(trained.parameters(), **sgd)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(trained(x), y).backward()
        opt.step()
    update = fedleak.WeightUpdate(before=copy.deepcopy(model.state_dict()), after=trained.state_dict(),
                                  num_examples=8)
    silent = ((model[1](x.flatten(1)) <= 0) & (trained[1](x.flatten(1)) <= 0)).all(0)  # before and after the steps
    return model, x, y, update, silent


def test_decay_is_read_off_silent_rows_and_peeled(fashion):
    """Three momentum steps with weight decay: the multiple every weight moved by is read off the rows of units no
    sample activated (to within rounding of its true value, ``1 - prod(...)``, whatever the momentum did) and, peeled,
    leaves a unit exclusive to one sample moving its row by a multiple of that sample's input again."""
    model, x, y, update, silent = _change(fashion, 3, lr=0.05, momentum=0.9, weight_decay=5e-4)
    delta = update.delta()
    G, g = delta["1.weight"].double(), delta["1.bias"].double()
    W, b = update.before["1.weight"].double(), update.before["1.bias"].double()
    decay = read_row_decay(G, g, W, b)
    assert decay is not None and decay.units >= 2 and decay.weight > 0 and decay.bias > 0
    assert torch.allclose(G[silent], decay.weight * W[silent], rtol=1e-3, atol=1e-9)
    peeled, _ = peel_row_decay(decay, G, g, W, b)
    rounding = 3 * 3 * torch.finfo(torch.float32).eps * W.abs().max()  # the client's float32 rounding, 3 steps
    assert peeled[silent].abs().max() <= rounding < 1e-2 * G[silent].abs().max()
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert any("weight decay read off" in n for n in rec.notes)
    assert len(rec) >= 6 and metrics.match(rec, x, y).exact.sum() == len(rec)


def test_no_decay_is_read_where_there_is_none(fashion):
    """Plain SGD leaves silent units exactly where they were: nothing to read, and no note."""
    model, x, y, update, _ = _change(fashion, 3, lr=0.05)
    delta = update.delta()
    assert read_row_decay(delta["1.weight"].double(), delta["1.bias"].double(),
                          update.before["1.weight"].double(), update.before["1.bias"].double()) is None
    rec = fedleak.reconstruct(model, update, attack="first-layer")
    assert not any("weight decay" in n for n in rec.notes) and len(rec) >= 6
