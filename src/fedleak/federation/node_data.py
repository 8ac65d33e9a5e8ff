"""A SuperNode's own data: its partition in its own folder, named by ``--node-config data-dir=...``.

On Flower's deployment runtime each SuperNode is a separate process (usually on its own machine) that trains on
data it holds. :func:`write_node_data` puts one client's samples in a folder (``data.safetensors``: ``x``, ``y``
and, as metadata, the input shape, class count, value range, normalisation (if any) and partition id); the ClientApp
(:mod:`fedleak.federation.client_app`) finds the folder through its node config (:func:`node_data_of`) and reads
that folder only. The node also keeps there, under ``truth/``, the batches it trained on, for the evaluation-only
scoring of :mod:`fedleak.federation.score_channel` (the files never leave the node).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedleak.data.normalize import Normalization
from fedleak.errors import DataError
from fedleak.report.output import write_bytes_atomic

DATA_DIR_KEY = "data-dir"  # the node-config key naming the node's folder
DATA_FILE = "data.safetensors"
TRUTH_DIR = "truth"


@dataclass(frozen=True)
class NodeData:
    """One node's samples ``x`` (N x input shape) and labels ``y``, with what a model and the defenses need to know
    of the data (the attribute names of :class:`~fedleak.federation.settings.DataSplit`), and its folder."""

    x: torch.Tensor
    y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    value_range: tuple[float, float]
    partition: int
    folder: Path
    normalization: Normalization | None = None

    @property
    def truth_dir(self) -> Path:
        """Where the node keeps the batches it trained on (evaluation only; never sent)."""
        return self.folder / TRUTH_DIR


def write_node_data(folder: str | os.PathLike[str], x: torch.Tensor, y: torch.Tensor, *, num_classes: int,
                    value_range: tuple[float, float], partition: int,
                    normalization: Normalization | None = None) -> Path:
    """Write one node's samples to ``folder/data.safetensors`` (atomically; the folder is created)."""
    from safetensors.torch import save

    path = Path(folder) / DATA_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"input_shape": json.dumps([int(d) for d in x.shape[1:]]), "num_classes": str(int(num_classes)),
            "value_range": json.dumps([float(v) for v in value_range]), "partition": str(int(partition))}
    if normalization is not None:
        meta["normalization"] = json.dumps(normalization.to_dict())
    write_bytes_atomic(path, save({"x": x.float().contiguous(), "y": y.long().contiguous()}, metadata=meta))
    return path


def read_node_data(folder: str | os.PathLike[str]) -> NodeData:
    """The node's samples in ``folder`` (written by :func:`write_node_data`); DataError naming the folder when
    they are missing or unreadable."""
    from safetensors import SafetensorError, safe_open

    path = Path(folder) / DATA_FILE
    if not path.is_file():
        raise DataError(f"node data-dir '{folder}' holds no {DATA_FILE}: write the node's partition there first "
                        "(fedleak.federation.node_data.write_node_data)")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            x, y = fh.get_tensor("x"), fh.get_tensor("y")
        shape = tuple(int(d) for d in json.loads(meta["input_shape"]))
        lo, hi = (float(v) for v in json.loads(meta["value_range"]))
        num_classes, partition = int(meta["num_classes"]), int(meta["partition"])
        norm = Normalization(**json.loads(meta["normalization"])) if "normalization" in meta else None
    except (SafetensorError, KeyError, ValueError, TypeError, OSError, DataError) as exc:
        raise DataError(f"cannot read the node data in {path}: {exc}") from None
    if tuple(x.shape[1:]) != shape or len(x) != len(y) or len(x) == 0:
        raise DataError(f"{path}: x {tuple(x.shape)} and y {tuple(y.shape)} do not fit the input shape {shape}")
    return NodeData(x, y, shape, num_classes, (lo, hi), partition, Path(folder), norm)


def node_data_of(context) -> NodeData | None:
    """The data of the node running ``context`` (a Flower ``Context``) when its node config names a
    ``data-dir``; None on the simulation engine, whose clients take their split of the shared data set."""
    folder = context.node_config.get(DATA_DIR_KEY)
    return None if folder is None else read_node_data(str(folder))
