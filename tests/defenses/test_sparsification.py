"""Global top-k sparsification and per-tensor gradient pruning."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.defenses import defend_update, make_defense, parse_defense
from fedleak.errors import OptionError


def run(name: str, update: dict[str, torch.Tensor], **params) -> dict[str, torch.Tensor]:
    return make_defense(name, **params).apply(update, None, torch.Generator())


def test_top_k_keeps_the_largest_entries_of_the_whole_update():
    update = {"a": torch.tensor([0.1, -5.0, 0.3]), "b": torch.tensor([[2.0, -0.2], [0.0, 1.0]])}
    out = run("top-k", update, ratio=0.4)  # ceil(0.4 * 7) = 3 entries: -5, 2, 1
    torch.testing.assert_close(out["a"], torch.tensor([0.0, -5.0, 0.0]))
    torch.testing.assert_close(out["b"], torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    assert update["a"][0] == 0.1  # the input is untouched
    # global, not per tensor: a tensor of small entries loses all of them
    out = run("top-k", {"big": torch.tensor([5.0, 4.0, 3.0]), "small": torch.tensor([0.1, 0.2])}, ratio=0.6)
    assert torch.equal(out["small"], torch.zeros(2)) and torch.equal(out["big"], torch.tensor([5.0, 4.0, 3.0]))
    assert torch.equal(run("top-k", update, ratio=1.0)["b"], update["b"])
    assert int(torch.count_nonzero(run("top-k", update, ratio=1e-6)["a"])) == 1  # at least one entry


def test_top_k_breaks_ties_by_position():
    out = run("top-k", {"a": torch.tensor([1.0, -1.0]), "b": torch.tensor([1.0, 1.0, 0.5])}, ratio=0.6)
    torch.testing.assert_close(out["a"], torch.tensor([1.0, -1.0]))  # 3 of 5 kept: the first three 1's
    torch.testing.assert_close(out["b"], torch.tensor([1.0, 0.0, 0.0]))


def test_gradient_pruning_zeroes_the_smallest_entries_of_every_tensor():
    t = torch.tensor([[0.1, -5.0, 0.3], [2.0, -0.2, 0.0]])
    out = run("gradient-pruning", {"w": t, "b": torch.tensor([1.0, -3.0])}, ratio=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([[0.0, -5.0, 0.3], [2.0, 0.0, 0.0]]))
    torch.testing.assert_close(out["b"], torch.tensor([0.0, -3.0]))  # per tensor: floor(0.5 * 2) = 1 dropped
    assert torch.equal(run("gradient-pruning", {"w": t}, ratio=0.0)["w"], t)
    wide = torch.arange(1.0, 101.0)
    assert int((run("gradient-pruning", {"w": wide}, ratio=0.29)["w"] == 0).sum()) == 29  # 0.29 * 100 exactly


@pytest.mark.parametrize("name, params", [("top-k", dict(ratio=0.4)), ("gradient-pruning", dict(ratio=0.5))])
def test_observe_matches_sent_entries_and_penalises_dropped_ones_only_beyond_the_threshold(name, params):
    d = make_defense(name, **params)
    observed = d.apply({"w": torch.tensor([0.1, -5.0, 0.3, 2.0])}, None, torch.Generator())
    assert observed["w"].tolist() == [0.0, -5.0, 0.0, 2.0]  # the threshold (smallest sent magnitude) is 2
    sim = torch.tensor([1.0, 2.0, -3.0, 4.0], requires_grad=True)
    out = d.observe({"w": sim}, observed)
    # sent entries: the simulated value; dropped: only the part beyond +-2 (1.0 -> 0, -3.0 -> -1)
    torch.testing.assert_close(out["w"].detach(), torch.tensor([0.0, 2.0, -1.0, 4.0]))
    out["w"].sum().backward()
    torch.testing.assert_close(sim.grad, torch.tensor([0.0, 1.0, 1.0, 1.0]))
    # on the update itself the forward model gives back what was sent
    torch.testing.assert_close(d.observe({"w": torch.tensor([0.1, -5.0, 0.3, 2.0])}, observed)["w"], observed["w"])


def test_encoded_bytes():
    topk = make_defense("top-k", ratio=0.01)
    update = {"w": torch.randn(1000, generator=torch.Generator().manual_seed(0)), "b": torch.randn(100)}
    sent = topk.apply(update, None, torch.Generator())
    assert topk.encoded_bytes(sent) == 11 * 8  # ceil(0.01 * 1100) = 11 kept, (4-byte index, 4-byte value) each
    prune = make_defense("gradient-pruning", ratio=0.9)
    sent = prune.apply(update, None, torch.Generator())
    assert prune.encoded_bytes(sent) == (100 + 10) * 8  # 10 % of each tensor kept
    light = make_defense("gradient-pruning", ratio=0.1)
    assert light.encoded_bytes(light.apply(update, None, torch.Generator())) == 1100 * 4  # dense is cheaper


@pytest.mark.parametrize("name, ratio", [("top-k", 0.0), ("top-k", 1.5), ("top-k", -0.1),
                                         ("gradient-pruning", 1.0), ("gradient-pruning", -0.1)])
def test_bad_ratios(name, ratio):
    with pytest.raises(OptionError, match="ratio"):
        make_defense(name, ratio=ratio)


def test_bad_ratios_from_a_spec():
    with pytest.raises(OptionError, match="ratio"):
        parse_defense("top-k:ratio=0")
    with pytest.raises(OptionError, match="ratio"):
        parse_defense("gradient-pruning:ratio=1")


def test_defend_update_sparsifies_a_gradient_update(digits):
    x, y = digits.batch(4, seed=3)
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    upd = fedleak.compute_gradient_update(model, x, y)
    sent = defend_update(upd, "top-k:ratio=0.05", seed=0)
    assert isinstance(sent, fedleak.GradientUpdate) and sent.num_examples == 4
    n = sum(t.numel() for t in upd.gradients.values())
    kept = sum(int(torch.count_nonzero(t)) for t in sent.gradients.values())
    assert kept == -(-n * 5 // 100)
    threshold = min(float(t[t != 0].abs().min()) for t in sent.gradients.values() if t.any())
    for k, t in upd.gradients.items():
        dropped = t[sent.gradients[k] == 0]
        assert dropped.numel() == 0 or float(dropped.abs().max()) <= threshold
        assert torch.equal(sent.gradients[k][sent.gradients[k] != 0], t[sent.gradients[k] != 0])
