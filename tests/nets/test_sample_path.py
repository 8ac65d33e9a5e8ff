"""What the traced forward does to the sample before a layer reads it."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fedleak.nets.sample_path import changed_before


class Pre(nn.Module):
    def __init__(self, pre) -> None:
        super().__init__()
        self.pre = pre
        self.fc1, self.fc2 = nn.Linear(64, 16), nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.pre(x))))


def test_reshapes_identities_casts_and_dropout_pass_the_sample_on():
    for pre in (lambda x: x.view(x.size(0), -1), lambda x: torch.flatten(x, 1).float(), nn.Sequential(
            nn.Flatten(), nn.Dropout(0.5), nn.Identity()), lambda x: x.reshape(len(x), 64).contiguous()):
        assert changed_before(Pre(pre), "fc1", (1, 8, 8)) == ""


def test_an_op_that_may_map_two_samples_to_one_is_named():
    why = changed_before(Pre(lambda x: x.flatten(1).clamp(0, 1)), "fc1", (1, 8, 8))
    assert "'clamp' (clamp) from the sample before 'fc1'" in why
    assert "'abs_1'" in changed_before(Pre(lambda x: x.abs().flatten(1)), "fc1", (1, 8, 8))
    assert "'mul'" in changed_before(Pre(lambda x: (x * x).flatten(1)), "fc1", (1, 8, 8))
    # a cast to a coarser dtype and back rounds every value: many samples give one input
    assert "'half'" in changed_before(Pre(lambda x: x.flatten(1).half().float()), "fc1", (1, 8, 8))


def test_a_forward_that_does_not_trace_shows_nothing():
    def branch(x):
        return x.flatten(1) if x.sum() > 0 else -x.flatten(1)

    why = changed_before(Pre(branch), "fc1", (1, 8, 8))
    assert why.startswith("what the forward does to the sample before 'fc1' is not known")


def test_a_later_layer_reads_what_the_layers_before_it_computed():
    assert "'fc1' (Linear)" in changed_before(Pre(lambda x: x.flatten(1)), "fc2", (1, 8, 8))
