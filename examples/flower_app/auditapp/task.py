"""Your model and your data: replace these with your own.

``Net`` is Flower's quickstart-pytorch model, unchanged (3 x 32 x 32 inputs, 10 classes). ``load_data`` is
where your own data loading goes. Here it serves Fashion-MNIST (installed locally; nothing downloads) padded
to 32 x 32 and repeated over 3 channels so that the quickstart model takes it:

* on the deployment runtime each SuperNode reads ITS OWN file, named by its node config
  (``--node-config "partition-id=0 num-partitions=4 data-dir='/data/node0'"``): ``data-dir/data.npz`` with
  arrays ``x`` (N x 3 x 32 x 32, float32 in [0, 1]) and ``y`` (N, int64), see ``write_node_files`` below;
* on the simulation engine (no ``data-dir``) a client takes partition ``partition-id`` of the shared set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    """Flower's quickstart-pytorch model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = x.view(-1, 16 * 5 * 5)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)


def run_config(context) -> dict:
    """The app's run config: ``[tool.flwr.app.config]`` of its pyproject.toml, overridden by the run's
    (``flwr run . --run-config "lr=0.1"``). Flower's ``run_simulation`` passes none, so the file gives the defaults."""
    import tomllib

    with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
        config = tomllib.load(f)["tool"]["flwr"]["app"]["config"]
    return {**config, **dict(context.run_config)}


def _fashion_mnist(limit: int) -> tuple[np.ndarray, np.ndarray]:
    import fedleak  # only for its locally installed copy of Fashion-MNIST

    data = fedleak.load_dataset("fashion-mnist")
    x = F.pad(data.x[:limit], (2, 2, 2, 2)).repeat(1, 3, 1, 1)  # 1 x 28 x 28 -> 3 x 32 x 32
    return x.numpy().astype(np.float32), data.y[:limit].numpy().astype(np.int64)


def load_data(node_config, limit: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """This client's training data: its own ``data-dir/data.npz`` if the node config names one, else partition
    ``partition-id`` of ``num-partitions`` of the first ``limit`` Fashion-MNIST samples."""
    if "data-dir" in node_config:
        with np.load(Path(str(node_config["data-dir"])) / "data.npz", allow_pickle=False) as f:
            return torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
    x, y = _fashion_mnist(limit)
    part = np.array_split(np.arange(len(y)), int(node_config.get("num-partitions", 1)))[int(node_config["partition-id"])]
    return torch.from_numpy(x[part]), torch.from_numpy(y[part])


def write_node_files(root: str, num_partitions: int, limit: int = 4000) -> list[Path]:
    """Write ``root/node<i>/data.npz`` for each partition (what you copy to each SuperNode's machine)."""
    x, y = _fashion_mnist(limit)
    out = []
    for i, part in enumerate(np.array_split(np.arange(len(y)), num_partitions)):
        folder = Path(root) / f"node{i}"
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / "data.npz", x=x[part], y=y[part])
        out.append(folder)
    return out


if __name__ == "__main__":  # python -m auditapp.task /data 4
    import sys

    for path in write_node_files(sys.argv[1], int(sys.argv[2])):
        print(path)
