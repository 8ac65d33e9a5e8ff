"""Conv blocks of a traced network: the unrolled conv/pool matrices match torch; make_convnet."""

import numpy as np
import pytest
import torch
from torch import nn

import fedleak
from fedleak.errors import ModelError
from fedleak.models.convnet import make_convnet
from fedleak.nets import as_network


@pytest.mark.parametrize("pool", [None, "avg", "max"])
def test_unrolled_blocks_match_torch(pool):
    x, _ = fedleak.load_dataset("lfw").batch(3, seed=0)
    model = make_convnet((1, 25, 25), 2, channels=(3, 5), padding=1, pool=pool, fc_widths=(16,), batch_norm=True)
    net = as_network(model)
    a = x.double()
    for blk in net.blocks:
        A, c = blk.affine
        z = (A @ a.reshape(3, -1).numpy().T).T + c
        assert np.abs(z - blk.preact(a).reshape(3, -1).numpy()).max() < 1e-12
        if pool == "avg":
            pooled = (blk.pool_matrix @ np.maximum(z, 0).T).T
        elif pool == "max":
            pooled = np.maximum(z, 0)[:, blk.pool_windows].max(-1)
        else:
            pooled = np.maximum(z, 0)
        a = blk.forward(a)
        assert np.abs(pooled - a.reshape(3, -1).numpy()).max() < 1e-12
    # the parsed features are the real model's Linear input
    feats = nn.Sequential(*list(model)[: list(model).index(next(m for m in model if isinstance(m, nn.Flatten))) + 1])(x)
    assert torch.allclose(net.features(x).float(), feats, atol=1e-5)
    assert net.head.depth == 1 and net.num_classes == 2 and net.is_conv


@pytest.mark.parametrize("conv", [dict(kernel_size=5, stride=2, padding=2), dict(kernel_size=3, stride=2, padding=0),
                                  dict(kernel_size=(3, 5), stride=(1, 2), padding=(0, 2))])
def test_unrolled_conv_matches_torch_for_strides_and_paddings(conv):
    """The unrolled conv, built row by row, is the conv for any stride and padding: ``A x + c`` is torch's output,
    and each row holds exactly the taps inside the input, in increasing column order."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, **conv), nn.ReLU(), nn.Flatten(), nn.LazyLinear(8), nn.ReLU(),
                          nn.Linear(8, 2))
    x = torch.rand(2, 3, 13, 11, dtype=torch.float64)
    model(x.float())
    blk = as_network(model, input_shape=(3, 13, 11)).blocks[0]
    A, c = blk.affine
    z = (A @ x.reshape(2, -1).numpy().T).T + c
    assert np.abs(z - blk.preact(x).reshape(2, -1).numpy()).max() < 1e-12
    assert A.has_sorted_indices and A.nnz == int((torch.nn.functional.conv2d(
        torch.ones(1, 3, 13, 11), torch.ones(4, 3, *model[0].kernel_size), None, model[0].stride,
        model[0].padding)).sum())  # every tap inside the input, once


def test_users_sequential_with_names():
    model = nn.Sequential(
        nn.Sequential(nn.Conv2d(1, 4, 3, padding="same"), nn.ReLU(), nn.AvgPool2d(2)),
        nn.Flatten(), nn.Linear(4 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3),
    )
    net = as_network(model, input_shape=(1, 8, 8))
    assert net.blocks[0].conv.weight_name == "0.0.weight"
    assert net.head.dense[0].weight_name == "2.weight"
    assert set(net.parameter_names()) == {n for n, _ in model.named_parameters()}


@pytest.mark.parametrize("layers, needle", [
    ([nn.Conv2d(1, 2, 3), nn.Sigmoid(), nn.Flatten(), nn.Linear(72, 4), nn.ReLU(), nn.Linear(4, 2)], "'1' (Sigmoid)"),
    ([nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Dropout(), nn.Flatten(), nn.Linear(72, 4), nn.ReLU(), nn.Linear(4, 2)],
     "'2' (Dropout): dropout in training mode"),
    ([nn.Conv2d(1, 2, 3, groups=1, dilation=2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 2)], "dilation"),
    ([nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(3, stride=1), nn.Flatten(), nn.Linear(32, 4), nn.ReLU(), nn.Linear(4, 2)], "'2' (MaxPool2d)"),
    ([nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(70, 4), nn.ReLU(), nn.Linear(4, 2)], "does not run"),
    ([nn.Conv2d(1, 2, 3), nn.MaxPool2d(2), nn.AvgPool2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)], "'2'"),
])
def test_refuses_unsupported_layers(layers, needle):
    with pytest.raises(ModelError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        as_network(nn.Sequential(*layers), input_shape=(1, 8, 8))


def test_train_mode_batch_norm_is_refused():
    model = make_convnet((1, 8, 8), 2, channels=(2,), fc_widths=(4,), batch_norm=True).train()
    with pytest.raises(ModelError, match="BatchNorm2d.*training mode"):
        as_network(model)


def test_make_convnet_is_seeded_and_checks_arguments():
    a = make_convnet((1, 12, 12), 3, channels=(2, 4), fc_widths=(8,), seed=3)
    b = make_convnet((1, 12, 12), 3, channels=(2, 4), fc_widths=(8,), seed=3)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ModelError, match="pool"):
        make_convnet((1, 12, 12), 3, pool="median")
    with pytest.raises(ModelError, match="too small"):
        make_convnet((1, 4, 4), 3, channels=(2, 2, 2), kernel=3)


def test_reading_a_network_does_not_load_scipy():
    """An MLP attack (reading the model, the head's attack and certificate) loads no scipy: only conv blocks'
    sparse matrices and the conv walk-down need it (0.3 s to import)."""
    import subprocess
    import sys

    code = ("import sys, torch, fedleak\n"
            "m = fedleak.make_mlp((20,), [32], 3, seed=0)\n"
            "x, y = torch.rand(2, 20), torch.tensor([0, 2])\n"
            "fedleak.reconstruct(m, fedleak.compute_gradient_update(m, x, y))\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'scipy'))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("channels,pool,short", [
    ((6, 16), "max", ("3",)),  # 1 x 28 x 28 -> 6 x 14 x 14 (1176 >= 785), -> 16 x 7 x 7 = 784 < 1177
    ((4,), "max", ("0",)),     # 784 unknowns, 4 x 14 x 14 = 784 outputs: one short of what pooling needs
    ((4,), "avg", ("0",)),
    ((4,), None, ()),          # 4 x 28 x 28 outputs for 784 unknowns: enough (proofs decide the rest)
    ((1,), None, ()),          # exactly as many outputs as unknowns
])
def test_blocks_whose_outputs_can_never_determine_their_inputs(channels, pool, short):
    model = make_convnet((1, 28, 28), 10, channels=channels, kernel=3, padding=1, pool=pool, fc_widths=(32,))
    net = as_network(model)
    assert [b.name for b in net.blocks if b.never_determined] == list(short)
    assert bool(net.uncertifiable) == bool(short)
    for name in short:
        assert f"conv layer '{name}' gives at most" in net.uncertifiable
