"""A client that trains with mixup feeds blends of its samples with blended (soft) targets: a certificate rebuilds
the blend the model read, and only where its target is one label."""

import torch
from torch.nn import functional as F

import fedleak


def test_a_blend_of_two_labels_is_never_certified(digits):
    certified = one_label = 0
    for seed in range(6):
        model = fedleak.make_mlp((1, 8, 8), [1024], 10, seed=seed)
        x, y = digits.batch(8, seed=300 + seed)
        perm = torch.randperm(8, generator=torch.Generator().manual_seed(seed))
        lam = 0.3
        blends = lam * x + (1 - lam) * x[perm]
        targets = lam * F.one_hot(y, 10).float() + (1 - lam) * F.one_hot(y[perm], 10).float()
        rec = fedleak.reconstruct(model, fedleak.compute_gradient_update(model, blends, targets))
        for k in torch.nonzero(rec.certified).flatten().tolist():
            dist = (rec.inputs[k].reshape(1, -1) - blends.reshape(8, -1)).abs().amax(1)
            j = int(dist.argmin())
            assert float(dist[j]) <= 1e-4 and int(rec.labels[k]) == int(y[j])  # the blend read, its one label
            assert int(y[perm[j]]) == int(y[j])  # a blend of two labels has no label to certify
            certified += 1
        one_label += int((y == y[perm]).sum())
    assert 0 < certified <= one_label
