"""The span screen of the last ReLU layer's groups: it drops only groups the exact check rejects, so the attack's
results are the same with it and without it, and it drops most of them where the groups outnumber the batch."""

from __future__ import annotations

import math

import pytest
import torch

import fedleak
import fedleak.attacks.exact.candidates as candidates
import fedleak.attacks.exact.span_screen as span
from fedleak.attacks.exact.span_screen import upper_row_norms

F64 = torch.float64


def outcome(result):
    return ([(s.certified, s.reason, s.label, s.witnesses) for s in result.samples], result.batch_certified,
            result.inputs.double())


def with_and_without_screen(monkeypatch, attack, every_group: bool = True):
    """The attack's outcome with the screen, the groups it saw and kept, and the outcome without it; with
    ``every_group`` the screen looks at every group, whatever its probe dropped."""
    seen = []
    screen = candidates.span_screen

    def counted(*args):
        keep = screen(*args)
        seen.append((len(keep), int(keep.sum())))
        return keep

    monkeypatch.setattr(candidates, "span_screen", counted)
    monkeypatch.setattr(span, "MIN_SAVING", 0)  # these layers are small: the screen runs wherever 2 r <= n
    if every_group:
        monkeypatch.setattr(span, "SCREEN_COST", 0)
    screened = outcome(attack())
    monkeypatch.setattr(span, "MIN_SAVING", 10**30)  # the screen never runs: every group is forwarded
    mark = len(seen)
    plain = outcome(attack())
    assert all(groups == kept for groups, kept in seen[mark:])
    return screened, seen[:mark], plain


@pytest.mark.parametrize("widths,batch,bias,step", [
    ((1024,), 16, True, None),
    ((256, 256), 8, True, None),
    ((512,), 8, False, None),
    ((1024,), 8, True, 0.5),  # a one-step weight delta: rounding noise in the update, an unknown scale
])
def test_the_screen_changes_no_result_and_drops_most_groups(monkeypatch, widths, batch, bias, step):
    data = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(data.input_shape, list(widths), data.num_classes, seed=3)
    if not bias:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.bias = None
    x, y = data.batch(batch, seed=5)
    if step is None:
        names = [n for n, _ in model.named_parameters()]
        loss = torch.nn.functional.cross_entropy(model(x), y)
        update = fedleak.GradientUpdate(dict(zip(names, torch.autograd.grad(loss, list(model.parameters())))),
                                        num_examples=batch)
    else:
        update = fedleak.fedavg_update(model, x, y, lr=step, local_steps=1)
    screened, seen, plain = with_and_without_screen(monkeypatch, lambda: fedleak.reconstruct(model, update))
    assert screened[:2] == plain[:2]
    assert torch.equal(screened[2], plain[2])
    assert sum(s[0] for s in screened[0]) > 0  # something was certified, so the comparison has teeth
    groups, kept = seen[0]
    assert groups >= 2 * batch and kept <= groups // 2, seen


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_upper_row_norms_bound_the_exact_norms(dtype):
    gen = torch.Generator().manual_seed(1)
    W = (torch.randn(50, 3000, generator=gen, dtype=F64) * torch.logspace(-3, 3, 3000, dtype=F64)).to(dtype)
    W[-1] = torch.full((3000,), 1e-22 if dtype == torch.float32 else 1e-170, dtype=dtype)  # squares underflow
    exact = torch.tensor([math.hypot(*row.double().tolist()) for row in W], dtype=F64)  # scaled: no underflow
    upper = upper_row_norms(W)
    assert bool((upper >= exact).all())
    assert bool((upper[:-1] <= exact[:-1] * 1.01).all())  # tight where nothing underflows


@pytest.mark.parametrize("top_tol", [0.003, 0.01, 0.03, 0.1, 0.3])
def test_groups_near_a_looser_tolerance_are_kept(monkeypatch, top_tol):
    """With the check's tolerance among the blends' residuals (1e-3 to 0.3 here), some groups pass or fail by a
    little; the screen's bound must keep every group that passes."""
    data = fedleak.load_dataset("digits")
    model = fedleak.make_mlp(data.input_shape, [1024], data.num_classes, seed=3)
    x, y = data.batch(16, seed=5)
    names = [n for n, _ in model.named_parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    update = dict(zip(names, torch.autograd.grad(loss, list(model.parameters()))))
    screened, seen, plain = with_and_without_screen(
        monkeypatch, lambda: fedleak.reconstruct(model, update, top_tol=top_tol))
    assert screened[:2] == plain[:2]
    assert torch.equal(screened[2], plain[2])
    assert seen and seen[0][1] < seen[0][0]  # the screen ran and dropped some


@pytest.mark.parametrize("dataset,width,more", [("lfw", 512, False), ("fashion-mnist", 4096, True)])
def test_the_screen_goes_on_only_where_its_probe_dropped_enough(monkeypatch, dataset, width, more):
    """Two classes put every loss vector on one line, so most blends of samples pass the check and the screen
    stops after its probe; where it drops most groups of a wide input it screens them all. The results are the
    same as without it either way."""
    data = fedleak.load_dataset(dataset)
    model = fedleak.make_mlp(data.input_shape, [width], data.num_classes, seed=3)
    x, y = data.batch(16, seed=5)
    names = [n for n, _ in model.named_parameters()]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    update = fedleak.GradientUpdate(dict(zip(names, torch.autograd.grad(loss, list(model.parameters())))),
                                    num_examples=16)  # two classes certify at a reported batch size only
    pieces = []
    screen = span.Basis.screen

    def recorded(self, attack, part, *args):
        keep = screen(self, attack, part, *args)
        pieces.append((part.tolist(), int(keep.sum())))
        return keep

    monkeypatch.setattr(span.Basis, "screen", recorded)
    screened, seen, plain = with_and_without_screen(  # one reading: peeling would screen its residuals too
        monkeypatch, lambda: fedleak.reconstruct(model, update, peel=False), every_group=False)
    assert screened[:2] == plain[:2]
    assert torch.equal(screened[2], plain[2])
    assert sum(s[0] for s in screened[0]) > 0
    (groups, kept), = seen
    probe, probe_kept = pieces[0]
    assert groups > span.PROBE and len(probe) == span.PROBE
    assert probe[0] == 0 and probe[-1] == groups - 1  # spread over all the groups
    first = next(m for m in model.modules() if isinstance(m, torch.nn.Linear))
    needed = span.SCREEN_COST / first.in_features * span.PROBE  # dropped groups that pay for the rest
    if more:  # every group screened, most dropped
        assert sorted(r for part, _ in pieces for r in part) == list(range(groups)) and kept <= groups // 2
    else:  # the probe dropped too few to pay for screening the rest, which are kept unscreened
        assert len(pieces) == 1 and kept == groups - (span.PROBE - probe_kept)
    assert (span.PROBE - probe_kept >= needed) == more
