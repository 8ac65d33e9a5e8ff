"""What the exclusivity attack's pipeline reports besides the samples: why fewer than the batch were rebuilt
(:class:`Found`), which rebuilt samples fall within the batch (:func:`within_batch`), and the whole batch's label
histogram (:func:`estimate_label_counts`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedleak.reconstruction import SampleRecovery

F64 = torch.float64


@dataclass(frozen=True)
class Found:
    """How many candidates each step of the pipeline kept: found at the head's last ReLU layer, traced down the
    head, and (CNNs) dropped as mixtures of samples before the conv blocks."""

    candidates: int
    traced: int
    mixtures: int = 0

    def missing(self, head, records: list[SampleRecovery], batch_size: int | None) -> str:
        """Why fewer samples than ``batch_size`` were rebuilt, in words (empty when none is missing)."""
        rebuilt = sum(r.rebuilt for r in records)
        layer = f"the head's last ReLU layer (after '{head.dense[-2].name}')" if head.depth else "the head"
        if self.candidates == 0:  # whether or not the batch size is known
            return (f"no exclusively activated neuron was found at {layer}: no group of its gradient rows implies one "
                    "consistent input (every neuron there fires for several samples, or the update is noised or not "
                    "the gradient of the cross-entropy it was read as: another label smoothing than the one given "
                    "or read, class weights, another loss or a regulariser)")
        if batch_size is None or rebuilt >= batch_size:
            return ""
        why = []
        if self.candidates < batch_size:
            short = batch_size - self.candidates
            own = ("has no exclusively activated neuron of its own" if short == 1 else
                   "have no exclusively activated neurons of their own")
            why.append(f"{short} of the {batch_size} samples {own} at {layer}")
        if self.traced < self.candidates:
            why.append(f"{self.candidates - self.traced} found there could not be traced down to the head's input")
        if self.mixtures:
            why.append(f"{self.mixtures} candidate(s) were mixtures of samples")
        lost = [r.reason for r in records if not r.rebuilt]
        if lost:
            why.append(f"{len(lost)} could not be rebuilt through the conv layers ({lost[0]})")
        return "; ".join(why) or f"{batch_size - rebuilt} sample(s) were not found"


def within_batch(records: list[SampleRecovery], batch_size: int | None, factor: float | None,
                 own: np.ndarray) -> list[int]:
    """Indices (in order) of the records to return: all of them, or, when there are more than the batch holds,
    the certified ones and the most plausible others (rebuilt, at the batch's common scale times their ``own``
    factor, their label's class weight, or at a whole multiple of it, as an input the batch holds several times;
    most witnesses)."""
    if batch_size is None or len(records) <= batch_size:
        return list(range(len(records)))

    def doubt(k: int) -> tuple:
        r = records[k]
        ratio = r.scale / (factor * own[k]) if factor and np.isfinite(r.scale) else float("inf")
        off = abs(ratio / max(round(ratio), 1) - 1) if np.isfinite(ratio) else float("inf")
        return (not r.certified, not r.rebuilt, off, -sum(r.witnesses))

    return sorted(sorted(range(len(records)), key=doubt)[:batch_size])


def estimate_label_counts(num_classes: int, out_bias_grad: torch.Tensor | None, batch_size: int | None,
                          scale: float | None, recovered_probs: torch.Tensor,
                          labels: torch.Tensor, smoothing: float = 0.0) -> np.ndarray | None:
    """The whole batch's label histogram from the output layer's bias gradient (None without one or without
    the batch size and every sample's ``scale`` in it); ``recovered_probs`` / ``labels``: predicted probabilities
    and labels of the samples known; ``smoothing``: the loss's label smoothing ``s``, whose targets add ``s / K``
    to every class and weigh the label by ``1 - s``."""
    if out_bias_grad is None or batch_size is None or scale is None:
        return None
    K = num_classes
    known = torch.bincount(labels, minlength=K).to(F64) if len(labels) else torch.zeros(K, dtype=F64)
    n_rec = len(labels)
    p_sum = recovered_probs.sum(0) if n_rec else torch.zeros(K, dtype=F64)
    p_rest = (recovered_probs.mean(0) if n_rec else torch.full((K,), 1.0 / K, dtype=F64)) * (batch_size - n_rec)
    counts = ((p_sum + p_rest) - out_bias_grad.cpu() / scale - smoothing * batch_size / K) / (1 - smoothing)
    est = torch.clamp(torch.round(counts), min=0)
    est = torch.maximum(est, known)
    return est.to(torch.int64).numpy()
