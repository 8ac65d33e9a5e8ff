"""The head attack's state reads the model's own weights and the client's gradient as they are (no float64 copy
of a layer, the walk-down's included)."""

from __future__ import annotations

import pytest
import torch

import fedleak
from fedleak.attacks.exact import ExclusivityOptions, HeadAttack
from fedleak.nets import as_network


def test_the_weights_and_gradient_are_the_clients_own_tensors(digits):
    model = fedleak.make_mlp(digits.input_shape, [128, 64], 10, seed=0)
    x, y = digits.batch(4, seed=0)
    update = fedleak.compute_gradient_update(model, x, y)
    head = as_network(model).head
    attack = HeadAttack(head, dict(update.gradients), ExclusivityOptions(), torch.float32)
    for d, W, G in zip(head.dense, attack.W, attack.G):
        assert W.dtype == torch.float32 and W.data_ptr() == d.weight.data_ptr()
        assert G.dtype == torch.float32 and G.data_ptr() == update.gradients[d.weight_name].data_ptr()

    # the walk-down reads the weights a piece at a time too: no float64 copy of a layer is made
    made = []
    real_to = torch.Tensor.to

    def watch(tensor, *args, **kwargs):
        out = real_to(tensor, *args, **kwargs)
        if out.dtype == torch.float64 and out.numel() >= head.dense[1].weight.numel():
            made.append(out.shape)
        return out

    cands = attack.top_candidates()
    assert cands
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "to", watch)
        attack.walk_down(cands)
    assert any(0 in c.acts for c in cands)
    assert made == []


def test_a_float64_model_is_read_without_conversion(digits):
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0).double()
    x, y = digits.batch(2, seed=1)
    update = fedleak.compute_gradient_update(model, x.double(), y)
    rec = fedleak.reconstruct(model, update)
    assert int(rec.certified.sum()) >= 1
    matched = fedleak.metrics.match(rec, x.double(), y)
    assert matched.false_certificates == 0


def test_the_top_layer_check_hands_its_forward_pass_to_the_certificate(digits):
    """A head of one hidden layer: each candidate keeps the first layer's float64 pre-activations of its input,
    equal to a fresh forward pass; they are dropped once its input is replaced (a CNN's rebuilt features)."""
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0)
    x, y = digits.batch(4, seed=2)
    update = fedleak.compute_gradient_update(model, x, y)
    head = as_network(model).head
    attack = HeadAttack(head, dict(update.gradients), ExclusivityOptions(), torch.float32)
    cands = attack.top_candidates()
    assert cands
    X = torch.stack([c.acts[0] for c in cands])
    fresh = fedleak.nets.forward_trace(head, X, dtype=torch.float64, params=(attack.W, attack.b)).preactivations[0]
    kept = torch.stack([c.first_pre for c in cands])
    assert torch.allclose(kept, fresh, rtol=1e-13, atol=1e-13)
    reused = fedleak.nets.forward_trace(head, X, dtype=torch.float64, params=(attack.W, attack.b), first=kept)
    assert torch.equal(reused.preactivations[0], kept)
    assert torch.allclose(reused.logits, fedleak.nets.forward_trace(head, X).logits, rtol=1e-12, atol=1e-12)
    for c in cands:  # each holds its own input and pre-activations, not views of a chunk of groups
        assert c.acts[0].untyped_storage().nbytes() == c.acts[0].numel() * c.acts[0].element_size()
        assert c.first_pre.untyped_storage().nbytes() == c.first_pre.numel() * c.first_pre.element_size()
    cands[0].acts[0] = cands[0].acts[0].clone()  # a replaced input: its pre-activations are no longer its own
    assert cands[0].first_pre is None and cands[1].first_pre is not None


def test_a_weight_updates_noise_norms_are_those_of_its_rows(digits):
    """A weight delta's noise row norms (float64, a piece of rows at a time) are the norms of the rows of
    ``[N | n_b]``, from which the grouping's tolerance floor is read."""
    model = fedleak.make_mlp(digits.input_shape, [64], 10, seed=0)
    x, y = digits.batch(4, seed=0)
    update = fedleak.fedavg_update(model, x, y, lr=0.1)
    from fedleak.attacks.exact.noise import RoundingNoise

    noise = {k: RoundingNoise.of(v, 1) for k, v in update.after.items()}
    head = as_network(model).head
    delta = update.delta()
    attack = HeadAttack(head, dict(delta), ExclusivityOptions(known_scale=False), torch.float32, noise)
    d = head.dense[0]
    eps = float(torch.finfo(torch.float32).eps)
    after = update.after
    whole = eps * torch.cat([after[d.weight_name].double(), after[d.bias_name].double()[:, None]], 1).abs()
    assert torch.allclose(attack.noise_norms(0), whole.norm(dim=1), rtol=1e-14, atol=0)
    rows = [3, 0]
    top = attack.noise_vectors(0, rows)  # the top layer's rows: weight row, bias entry, output-layer column
    column = eps * update.after[head.dense[1].weight_name].double().abs()[:, rows].T
    assert torch.equal(top, torch.cat([whole[rows], column], 1))
    assert attack.tol_floor > 0
