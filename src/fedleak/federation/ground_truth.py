"""EVALUATION-ONLY side channel: the clients' true batches, for scoring the audit.

A client in an audited federation writes the batch its update was computed on to the run's private
temp folder (``<dir>/r<round>-n<node>.safetensors``). Only the *scorer* reads these files, after the
attack has run; the attack itself (:class:`~fedleak.federation.strategy.AuditFedAvg`'s call of
:func:`fedleak.reconstruct`) sees nothing but the update the server received and its ``num-examples``.
Nothing here travels through Flower messages.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class TrueBatch:
    """What a client trained on in one round: ``inputs`` as used for the update (after any client-side
    transform), ``original`` before it, and the ``labels``."""

    inputs: torch.Tensor
    original: torch.Tensor
    labels: torch.Tensor
    partition: int


def _path(folder: str | os.PathLike[str], server_round: int, node_id: int) -> Path:
    return Path(folder) / f"r{int(server_round)}-n{int(node_id)}.safetensors"


def write_true_batch(folder: str | os.PathLike[str], server_round: int, node_id: int, batch: TrueBatch) -> None:
    """Client side: store the batch atomically (a scorer never reads a half-written file)."""
    from safetensors.torch import save_file

    path = _path(folder, server_round, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"inputs": batch.inputs.contiguous().float(), "original": batch.original.contiguous().float(),
               "labels": batch.labels.contiguous().long()}, str(tmp), metadata={"partition": str(batch.partition)})
    os.replace(tmp, path)


def read_true_batch(folder: str | os.PathLike[str], server_round: int, node_id: int) -> TrueBatch | None:
    """Scorer side: the batch a client reported, or None if it wrote none."""
    from safetensors import safe_open

    path = _path(folder, server_round, node_id)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        return TrueBatch(fh.get_tensor("inputs"), fh.get_tensor("original"), fh.get_tensor("labels"),
                         int(meta.get("partition", -1)))


class GroundTruthScorer:
    """Evaluation-only scorer (picklable, so it can run in the audit worker process): reads the client's
    true batch from the side channel *after* the attack and matches the reconstruction against it.

    "Recovered" counts certified samples only, so those are matched on their own: the global Hungarian
    assignment of :func:`fedleak.metrics.match` could otherwise pair an exact certified sample with
    another original to make room for an uncertified candidate. PSNR and label accuracy are those of
    the full reconstruction.
    """

    def __init__(self, folder: str | os.PathLike[str], preview: int = 8) -> None:
        self.folder = str(folder)
        self.preview = int(preview)

    def __call__(self, job, rec):
        from dataclasses import replace

        from fedleak.federation.results import Scores
        from fedleak.metrics import match

        truth = read_true_batch(self.folder, job.server_round, job.node_id)
        if truth is None:
            return None
        m = match(rec, truth.inputs, truth.labels)
        keep = rec.certified.bool()
        certified = replace(rec, inputs=rec.inputs[keep], labels=rec.labels[keep], certified=rec.certified[keep])
        mc = match(certified, truth.inputs, truth.labels)
        psnr_orig = m.mean_psnr()
        if truth.original.shape == truth.inputs.shape and not bool((truth.original == truth.inputs).all()):
            psnr_orig = match(rec, truth.original, truth.labels).mean_psnr()
        pairs = []
        for i in range(min(self.preview, len(truth.inputs))):
            j = int(mc.matched[i])
            rebuilt = certified.inputs[j].reshape(truth.inputs[i].shape).clamp(0, 1).numpy() if j >= 0 else None
            pairs.append((truth.inputs[i].numpy(), rebuilt))
        return Scores(len(truth.inputs), int(mc.recovered.sum()), mc.recovered_fraction, m.mean_psnr(), psnr_orig,
                      m.label_accuracy, int(mc.false_certificate.sum()), tuple(pairs))
