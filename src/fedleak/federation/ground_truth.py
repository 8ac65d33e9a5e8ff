"""EVALUATION-ONLY side channel: the clients' true batches, for scoring the audit.

A client in an audited federation writes the batch its update was computed on to the run's private
temp folder (``<dir>/r<round>-n<node>.safetensors``). Only the *scorer* reads these files, after the
attack has run; the attack itself (:class:`~fedleak.federation.strategy.AuditFedAvg`'s call of
:func:`fedleak.reconstruct`) sees nothing but the update the server received and its ``num-examples``.
Nothing here travels through Flower messages.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fedleak.data.normalize import Normalization
from fedleak.report.output import write_bytes_atomic


@dataclass(frozen=True)
class TrueBatch:
    """What a client trained on in one round: ``inputs`` as used for the update (after any client-side
    transform), ``original`` before it, and the ``labels``. ``value_range`` is the data's (lo, hi)
    (``Dataset.value_range``); the scorer measures errors in its units (None: the batch's min and max)."""

    inputs: torch.Tensor
    original: torch.Tensor
    labels: torch.Tensor
    partition: int
    value_range: tuple[float, float] | None = None


def _path(folder: str | os.PathLike[str], server_round: int, node_id: int) -> Path:
    return Path(folder) / f"r{int(server_round)}-n{int(node_id)}.safetensors"


def write_true_batch(folder: str | os.PathLike[str], server_round: int, node_id: int, batch: TrueBatch) -> None:
    """Client side: store the batch atomically (a scorer never reads a half-written file)."""
    from safetensors.torch import save

    path = _path(folder, server_round, node_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"partition": str(batch.partition)}
    if batch.value_range is not None:
        meta["value_range"] = json.dumps([float(v) for v in batch.value_range])
    # clones: safetensors refuses tensors that share memory (``original`` may be ``inputs`` itself)
    data = save({"inputs": batch.inputs.float().clone(), "original": batch.original.float().clone(),
                 "labels": batch.labels.contiguous().long()}, metadata=meta)
    write_bytes_atomic(path, data)


def read_true_batch(folder: str | os.PathLike[str], server_round: int, node_id: int) -> TrueBatch | None:
    """Scorer side: the batch a client reported, or None if it wrote none."""
    from safetensors import safe_open

    path = _path(folder, server_round, node_id)
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata() or {}
        value_range = tuple(json.loads(meta["value_range"])) if "value_range" in meta else None
        return TrueBatch(fh.get_tensor("inputs"), fh.get_tensor("original"), fh.get_tensor("labels"),
                         int(meta.get("partition", -1)), value_range)


class GroundTruthScorer:
    """Evaluation-only scorer (picklable, so it can run in the audit worker process): reads the client's
    true batch from the side channel *after* the attack and matches the reconstruction against it.

    :func:`fedleak.metrics.match` pairs certified samples first and checks every one of them, so
    "recovered" (certified, exact, right label) and the false-certificate count (every certified sample
    that is not a distinct sample of the batch, including any beyond the batch size) come from one
    call. Errors are measured on the data's range: the batch's ``value_range``, else ``data_range``,
    else the batch's min and max; for data the model sees normalised (``normalization``), in pixels on the
    pixels' range, both sides mapped back, as ``fedleak audit`` scores it (the normalised values' range, the
    union of the channels', would loosen "exact" and raise PSNR by its width). The preview is in the same units.
    PSNR, SSIM and label accuracy are those of the full reconstruction, uncertified samples included (estimates
    of what an optimisation attack recovered).
    """

    def __init__(self, folder: str | os.PathLike[str], preview: int = 8,
                 data_range: tuple[float, float] | None = None,
                 normalization: Normalization | None = None) -> None:
        self.folder = str(folder)
        self.preview = int(preview)
        self.data_range = tuple(data_range) if data_range is not None else None
        self.normalization = normalization

    def __call__(self, job, rec):
        from fedleak.federation.results import Scores
        from fedleak.metrics import match

        truth = read_true_batch(self.folder, job.server_round, job.node_id)
        if truth is None:
            return None
        norm = self.normalization
        data_range = None if norm is not None else truth.value_range if truth.value_range is not None \
            else self.data_range
        m = match(rec, truth.inputs, truth.labels, data_range=data_range, normalization=norm)
        psnr_orig = m.mean_psnr()
        if truth.original.shape == truth.inputs.shape and not bool((truth.original == truth.inputs).all()):
            psnr_orig = match(rec, truth.original, truth.labels, data_range=m.data_range,
                              normalization=norm).mean_psnr()
        false_reason = dict(m.false_reasons())
        shape = truth.inputs.shape[1:]
        reasons = [s.reason for s in rec.samples] if len(rec.samples) == len(rec) else [""] * len(rec)
        pairs = []
        for i in range(min(self.preview, len(truth.inputs))):
            j = int(m.matched[i])
            if j < 0:
                pairs.append((self._shown(truth.inputs[i]), None, "", ""))
                continue
            # the sample paired with it, unclamped: certified (sound or false) or an uncertified estimate
            status = ("false" if j in false_reason else "certified") if bool(rec.certified[j]) else "uncertified"
            reason = false_reason.get(j, "") if status != "uncertified" else reasons[j]
            pairs.append((self._shown(truth.inputs[i]), self._shown(rec.inputs[j].reshape(shape)), status, reason))
        paired = {int(j) for j in m.matched if j >= 0}
        for j, reason in false_reason.items():  # certified beyond the batch: no original to pair with
            if j not in paired:
                pairs.append((None, self._shown(rec.inputs[j].reshape(shape)), "false", reason))
        return Scores(len(truth.inputs), int(m.recovered.sum()), m.recovered_fraction, m.mean_psnr(), psnr_orig,
                      m.label_accuracy, m.false_certificates, tuple(pairs),
                      false_certificate_reasons=tuple(false_reason.values()), value_range=m.data_range,
                      ssim=_mean_matched(m.ssim, m.matched))

    def _shown(self, sample: torch.Tensor):
        """One sample as the preview shows it: in pixels where the data is normalised (unclamped)."""
        sample = sample.detach()
        if self.normalization is not None:
            sample = self.normalization.invert(sample[None].double())[0].to(sample.dtype)
        return sample.numpy()


def _mean_matched(values, matched) -> float | None:
    """Mean of per-original ``values`` over matched originals (None when nothing matched)."""
    sel = matched >= 0
    return float(values[sel].mean()) if sel.any() else None
