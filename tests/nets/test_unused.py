"""Parameters the forward never reads, found in the traced graph."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedleak.nets.unused import unused_parameters


class Spare(nn.Module):
    """A layer defined and never called, a tied pair of which only the second is called, a parameter read by an op."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.spare = nn.Linear(32, 32)
        self.head = nn.Linear(32, 10)
        self.tied = nn.Linear(32, 10)
        self.tied.weight = self.head.weight  # the same parameter under two names
        self.scale = nn.Parameter(torch.ones(()))
        self.frozen = nn.Linear(4, 4).requires_grad_(False)

    def forward(self, x):
        return self.tied(F.relu(self.fc1(x.flatten(1)))) * self.scale


def test_only_what_no_op_reads_is_unused():
    unused = unused_parameters(Spare())
    # head.weight is read through tied (the same tensor); head.bias is not; a frozen layer is no trainable parameter
    assert unused == {"spare.weight", "spare.bias", "head.bias"}


def test_a_forward_that_does_not_trace_has_none_found():
    class Branching(Spare):
        def forward(self, x):
            return super().forward(x) if x.sum() > 0 else super().forward(-x)

    assert unused_parameters(Branching()) == frozenset()


def test_a_sequential_reads_every_layer():
    assert unused_parameters(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))) == frozenset()
