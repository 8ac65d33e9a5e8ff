"""The head attack's state reads the model's own weights and the client's gradient as they are (no float64 copy
of a layer), converting one hidden layer at a time only while the walk-down needs it."""

from __future__ import annotations

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
        assert W.dtype == torch.float32 and W.data_ptr() == d.module.weight.data_ptr()
        assert G.dtype == torch.float32 and G.data_ptr() == update.gradients[d.weight_name].data_ptr()
    W64 = attack.layer64(1)
    assert W64.dtype == torch.float64 and torch.equal(W64, head.dense[1].module.weight.double())
    assert attack.layer64(1) is W64  # held while the walk-down reads it
    attack.release_layer64()
    assert attack.layer64(1) is not W64


def test_a_float64_model_is_read_without_conversion(digits):
    model = fedleak.make_mlp(digits.input_shape, [256], 10, seed=0).double()
    x, y = digits.batch(2, seed=1)
    update = fedleak.compute_gradient_update(model, x.double(), y)
    rec = fedleak.reconstruct(model, update)
    assert int(rec.certified.sum()) >= 1
    matched = fedleak.metrics.match(rec, x.double(), y)
    assert matched.false_certificates == 0
