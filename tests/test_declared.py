"""Declared facts of a client's training (fedleak.declared)."""

import pytest

from fedleak.declared import check_declared
from fedleak.errors import UpdateError


def test_declared_facts_are_checked():
    assert check_declared({"local_epochs": "2", "batch_size": 32.0, "clip_norm": 1}) == {
        "local_epochs": 2, "batch_size": 32, "clip_norm": 1.0}
    with pytest.raises(UpdateError, match="unknown declared"):
        check_declared({"epochs": 1})
    with pytest.raises(UpdateError, match="local_steps"):
        check_declared({"local_steps": 0})


def test_the_learning_rate_is_a_positive_number():
    assert check_declared({"learning_rate": "0.25"}) == {"learning_rate": 0.25}  # as Flower configs carry it
    for bad in (0, -0.1, "fast"):
        with pytest.raises(UpdateError, match="learning_rate"):
            check_declared({"learning_rate": bad})
