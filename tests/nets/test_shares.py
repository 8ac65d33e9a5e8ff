"""Each sample's share of a neuron's gradient row, and which shares the client's sum hears."""

from __future__ import annotations

import torch

from fedleak.nets.shares import heard, heard_alone, quiet, row_shares

EPS32 = float(torch.finfo(torch.float32).eps)


def test_a_share_is_the_norm_of_the_sample_term_where_the_neuron_fires():
    z = torch.tensor([[1.0, -1.0], [2.0, 3.0]])
    delta = torch.tensor([[0.5, 7.0], [-2.0, 0.0]])
    a = torch.tensor([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    s = row_shares(z, delta, a)
    # sample 0: |0.5| * |(3, 1)|; a neuron that does not fire holds no share; a zero signal none either
    assert torch.allclose(s, torch.tensor([[0.5 * 10 ** 0.5, 0.0], [2.0, 0.0]]))


def test_a_share_below_an_epsilon_of_the_rows_largest_is_not_heard():
    s = torch.tensor([[1.0, 1.0], [0.5 * EPS32, 2 * EPS32], [0.0, 0.0]])
    assert heard(s).tolist() == [[True, True], [False, True], [False, False]]
    assert heard_alone(s).tolist() == [[True, False], [False, False], [False, False]]
    # the loud sample left out of the batch (share 0): the quiet one is heard, alone
    assert heard_alone(s * torch.tensor([0.0, 1.0, 1.0])[:, None]).tolist() == [[False, False], [True, True],
                                                                               [False, False]]


def test_batches_along_leading_axes_are_read_apart():
    s = torch.tensor([[[1.0], [1e-9]], [[1e-9], [1e-9]]])  # two batches of two samples, one neuron
    assert heard_alone(s)[..., 0].tolist() == [[True, False], [False, False]]


def test_a_share_is_quiet_where_a_batch_may_hear_it_or_not():
    s = torch.tensor([[1.0, 1.0], [0.5, 0.0], [1e-9, 0.0]])
    # a zero share is never heard, 0.5 always; 1e-9 only in a batch without the first sample
    assert quiet(s).tolist() == [[False, False], [False, False], [True, False]]
