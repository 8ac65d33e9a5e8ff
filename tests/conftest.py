"""Shared fixtures: real data sets, small seeded models, a fixed thread count."""

from __future__ import annotations

import pytest
import torch
from bad_input import SHAPE

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
def model() -> fedleak.MLP:
    """The bad-input tests' small model (``test_bad_*.py``): an MLP on inputs of shape :data:`bad_input.SHAPE`."""
    return fedleak.make_mlp(SHAPE, [16], 3, seed=0)


@pytest.fixture
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of 4 inputs for :func:`model`, with labels."""
    return torch.rand(4, *SHAPE, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2, 0])


@pytest.fixture
def update(model, batch) -> fedleak.GradientUpdate:
    """:func:`model`'s gradient on :func:`batch`."""
    return fedleak.compute_gradient_update(model, *batch)


@pytest.fixture
def one_thread():
    """Optimisation attacks run many tiny second-order ops: one thread is several times faster on a busy CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def private_tempdir(monkeypatch):
    """A temp folder of this test's own as :mod:`tempfile`'s default, short enough for Ray's socket paths: what a run
    leaves behind in it is this test's, whatever else runs at the same time (another test process included)."""
    import multiprocessing.util
    import shutil
    import tempfile

    multiprocessing.util.get_temp_dir()  # multiprocessing keeps its first temp folder for good: not this one
    folder = tempfile.mkdtemp(prefix="fl-t-", dir="/tmp")
    monkeypatch.setattr(tempfile, "tempdir", folder)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


RAY_HEAD = """
import sys, ray
ray.init(num_cpus=1, num_gpus=0, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the session closes stdin
ray.shutdown()
"""


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster for the whole session, in a process of its own: federations that join it
    (``ray_address``) skip Ray's start-up, which costs more than a small federation's rounds. The tests of fedleak's
    own Ray lifecycle start their own. One CPU, as fedleak's own Ray has by default (``ray_cpus=1``): Flower runs the
    clients on one actor, and each run starts one actor process (torch and all) instead of two. Yields
    ``(address, head process)``."""
    import os
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile

    pytest.importorskip("ray")
    folder = tempfile.mkdtemp(prefix="fl-ray-", dir="/tmp")  # Ray's socket paths must stay short
    head = subprocess.Popen([sys.executable, "-c", RAY_HEAD, folder], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        address = head.stdout.readline().strip()
        if not address:
            pytest.fail("the session's Ray head did not start")
        yield address, head
    finally:
        head.stdin.close()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the process group started above
            head.wait()
        shutil.rmtree(folder, ignore_errors=True)
