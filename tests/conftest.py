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


RAY_HEAD = """
import sys, ray
ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, _temp_dir=sys.argv[1], logging_level="ERROR")
print(ray.get_runtime_context().gcs_address, flush=True)
sys.stdin.read()  # until the session closes stdin
ray.shutdown()
"""


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (2 CPUs) for the whole session, in a process of its own: federations that join it
    (``ray_address``) skip Ray's start-up, which costs more than a small federation's rounds. The tests of fedleak's
    own Ray lifecycle start their own. Yields ``(address, head process)``."""
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
