"""The certificate reads the candidates' traces a block at a time where all of them would hold more than the
update's size: the results are those of reading them all at once."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import fedleak
from fedleak.attacks.exact import settle, traces
from tests.user_models import DropoutMLP


def update_of(model, x, y, fedavg: bool):
    if fedavg:
        return fedleak.fedavg_update(model, x, y, lr=0.05, local_steps=1)
    loss = F.cross_entropy(model(x), y)
    grads = dict(zip([n for n, _ in model.named_parameters()], torch.autograd.grad(loss, list(model.parameters()))))
    return fedleak.GradientUpdate(grads, num_examples=len(x))  # two classes certify at a reported size only


def reconstruct(model, update, share: float, min_block: int) -> tuple[fedleak.Reconstruction, list[list[range]]]:
    """The attack with the candidates' traces kept at once up to ``share`` times the update's size, beyond in
    blocks of no more than that but at least ``min_block``; and the block lists the certificate made."""
    real = traces.CandidateTraces.__init__
    blocks: list[list[range]] = []

    def recorded(self, *args):
        real(self, *args)
        blocks.append(self.blocks)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(traces.CandidateTraces, "__init__", recorded)
        mp.setattr(traces, "KEEP_SHARE", share)
        mp.setattr(traces, "BLOCK_SHARE", share)
        mp.setattr(traces, "MIN_BLOCK", min_block)
        mp.setattr(settle, "SETTLE", float("inf"))  # every candidate goes through the certificate
        return fedleak.reconstruct(model, update, attack="exclusivity"), blocks


@pytest.mark.parametrize("data, widths, m, fedavg, certifies", [
    ("lfw", (512,), 12, False, True), ("lfw", (512,), 12, True, False), ("digits", (512,), 12, False, True),
    ("lfw", (512, 256), 16, False, True), ("digits", (1024, 512), 32, False, True)])
def test_blocks_of_candidates_give_the_results_of_all_at_once(request, data, widths, m, fedavg, certifies):
    """Two-class faces (a gradient, and a FedAvg step, where nothing is certified; with one hidden layer, hundreds
    of blend candidates) and digits (a gradient), with one hidden layer (a user's module) and two (fedleak's MLP):
    read in blocks of 2 candidates, the certified samples, labels, inputs, scales and reasons are those of
    reading all at once."""
    dataset = request.getfixturevalue(data)
    torch.manual_seed(0)
    if len(widths) == 1:
        model = DropoutMLP(int(torch.tensor(dataset.input_shape).prod()), widths[0], dataset.num_classes).eval()
    else:
        model = fedleak.make_mlp(dataset.input_shape, list(widths), dataset.num_classes, seed=0)
    x, y = dataset.batch(m, seed=3)
    update = update_of(model, x, y, fedavg)
    whole, whole_blocks = reconstruct(model, update, 1e9, 1)
    split, split_blocks = reconstruct(model, update, 0.0, 2)
    assert all(len(b) == 1 for b in whole_blocks) and max(len(b) for b in split_blocks) >= 3
    assert (whole.num_certified > 0) == certifies
    assert torch.equal(whole.certified, split.certified) and torch.equal(whole.labels, split.labels)
    assert torch.allclose(whole.inputs, split.inputs, rtol=0, atol=1e-12)
    assert whole.batch_certified == split.batch_certified
    for a, b in zip(whole.samples, split.samples):
        assert a.reason == b.reason and a.witnesses == b.witnesses
        assert a.scale == pytest.approx(b.scale, rel=1e-12, nan_ok=True)
