"""Held-out samples hold every class (fedleak.data.holdout): a data set sorted by class is split shuffled."""

import torch

import fedleak
from fedleak.data.holdout import split_order


def test_interleaved_classes_are_split_as_they_are(digits):
    assert split_order(digits.y, 200) is None and split_order(digits.y, 200, at_end=False) is None


def test_a_data_set_sorted_by_class_is_split_in_a_fixed_shuffle():
    lfw = fedleak.load_dataset("lfw")  # faces first, then non-faces (and their mirrors in the same order)
    assert len(set(lfw.y[-50:].tolist())) == 1
    order = split_order(lfw.y, 50)
    assert sorted(order.tolist()) == list(range(len(lfw))) and torch.equal(order, split_order(lfw.y, 50))
    assert set(lfw.y[order][-50:].tolist()) == {0, 1}
    first = split_order(lfw.y, 50, at_end=False)
    assert set(lfw.y[first][:50].tolist()) == {0, 1}


def test_fewer_held_out_samples_than_classes():
    labels = torch.arange(10).repeat_interleave(5)  # sorted, 10 classes
    assert split_order(labels, 3) is not None  # the last 3 are one class
    assert split_order(torch.arange(10).repeat(5), 3) is None  # the last 3 are 3 classes
