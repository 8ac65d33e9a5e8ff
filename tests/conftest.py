"""Shared fixtures: real data sets, small seeded models, a fixed thread count."""

from __future__ import annotations

import pytest
import torch

import fedleak

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def digits() -> fedleak.Dataset:
    return fedleak.load_dataset("digits")


@pytest.fixture(scope="session")
def lfw() -> fedleak.Dataset:
    """Two-class face crops: every loss vector is a multiple of (1, -1)."""
    return fedleak.load_dataset("lfw")


@pytest.fixture(scope="session")
def fashion() -> fedleak.Dataset:
    try:
        return fedleak.load_dataset("fashion-mnist")
    except fedleak.DataError as exc:  # pragma: no cover - make setup installs it
        pytest.skip(f"Fashion-MNIST not installed: {exc}")


@pytest.fixture
def one_thread():
    """Optimisation attacks run many tiny second-order ops: one thread is several times faster on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
