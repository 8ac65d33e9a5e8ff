"""What :func:`fedleak.analyze_exclusivity` reports: per-sample exclusivity of every ReLU layer of a batch.

The fully connected head's ReLU layers are always reported (``layers``); a network with conv blocks also
reports each conv layer at unit and channel level (``conv_layers``) and whether each block is solvable.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LayerExclusivity:
    """ExAN statistics of one hidden ReLU layer of the head for a batch of M samples."""

    name: str
    width: int
    active: np.ndarray  # (M,) number of active neurons per sample
    exans: np.ndarray  # (M,) exclusively activated neurons per sample
    effective_exans: np.ndarray  # (M,) neurons whose gradient row is the sample's alone in the client's sum: it fires
    # them with a non-zero backward signal, and any other sample that fires one holds a share of the row too small to
    # hear (fedleak.nets.shares); of a sample whose loss vector has a negative entry (its label's probability below 1
    # in the model's dtype). Beside a sample classified with probability 1, more than its ExANs
    margin: np.ndarray  # (M,) exclusivity slack of the weakest ExAN the condition needs (0 if missing)
    dead_fraction: float  # neurons active for no sample
    shared_fraction: float  # neurons active for two or more samples

    def histogram(self, max_count: int = 10) -> np.ndarray:
        """Samples per ExAN count 0, 1, ..., ``max_count`` (the last bin holds ``>= max_count``)."""
        return np.bincount(np.minimum(self.effective_exans, max_count), minlength=max_count + 1)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "width": self.width, "active": self.active.tolist(), "exans": self.exans.tolist(),
            "effective_exans": self.effective_exans.tolist(), "margin": self.margin.tolist(),
            "dead_fraction": self.dead_fraction, "shared_fraction": self.shared_fraction,
        }


@dataclass(frozen=True)
class ConvLayerExclusivity:
    """Unit- and channel-level exclusivity of one conv layer (post-ReLU, before pooling) for M samples.

    * **Unit level:** every post-ReLU unit (channel, y, x) is a neuron.
    * **Channel level:** channel k is exclusive to sample m when m has a positive unit in k and no other
      sample has any (only then is the weight-gradient slice ``dL/dW[k]`` pure in one sample).
    """

    name: str
    units: int
    channels: int
    active_units: np.ndarray  # (M,)
    unit_exans: np.ndarray  # (M,) units active for this sample only
    effective_unit_exans: np.ndarray  # (M,) of those, with a non-zero backward signal
    active_channels: np.ndarray  # (M,) channels with any active unit
    channel_exans: np.ndarray  # (M,) channels active for this sample only
    effective_channel_exans: np.ndarray  # (M,) of those, with a non-zero backward signal somewhere
    dead_unit_fraction: float
    shared_unit_fraction: float
    solvable: np.ndarray  # (M,) this block's input is uniquely determined by its output (proven)
    bound: np.ndarray  # (M,) proven 2-norm error bound of the block's input (inf when not proven)

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name, "units": self.units, "channels": self.channels,
            "active_units": self.active_units.tolist(), "unit_exans": self.unit_exans.tolist(),
            "effective_unit_exans": self.effective_unit_exans.tolist(),
            "active_channels": self.active_channels.tolist(), "channel_exans": self.channel_exans.tolist(),
            "effective_channel_exans": self.effective_channel_exans.tolist(),
            "dead_unit_fraction": self.dead_unit_fraction, "shared_unit_fraction": self.shared_unit_fraction,
            "solvable": self.solvable.tolist(), "bound": [float(b) for b in self.bound],
        }


@dataclass(frozen=True)
class ExclusivityReport:
    """Per-sample, per-layer exclusivity of a batch, and who is certifiably reconstructable.

    ``layers`` are the head's hidden ReLU layers. ``certifiable`` is the condition the exact attack can
    prove: at least ``min_last`` effective ExANs at the head's last ReLU layer and ``min_other`` at its
    other ones, and, for a network with conv blocks, every block solvable with a proof and the chained
    error bound ``error_bound`` at most ``allowed_error`` (what the attack allows a certified input).
    ``head_certifiable`` is the head condition alone, on the update as sent. ``peeled`` (MLPs): per sample, whether
    it meets the condition only once the samples that meet it are peeled off (their terms subtracted, exclusivity
    counted among the samples left, round after round), as the attack reads an update whose batch size is
    reported; ``certifiable`` holds them.
    ``conv_layers`` is empty for an MLP. ``saturated``: per sample, whether the model classifies it with probability 1
    in its dtype (its loss vector then has no negative entry, and none of its ExANs is effective).
    """

    layers: tuple[LayerExclusivity, ...]
    labels: np.ndarray
    certifiable: np.ndarray  # (M,) bool
    min_last: int
    min_other: int
    conv_layers: tuple[ConvLayerExclusivity, ...] = ()
    head_certifiable: np.ndarray | None = None
    error_bound: np.ndarray | None = None  # (M,) chained bound on the input (inf where unsolvable); conv only
    allowed_error: float | None = None  # largest bound a certified input may have (data units); conv only
    saturated: np.ndarray | None = None  # (M,) bool: classified with probability 1
    peeled: np.ndarray | None = None  # (M,) bool: certifiable after peeling only (MLPs)

    @property
    def batch_size(self) -> int:
        return int(self.labels.shape[0])

    @property
    def exan_counts(self) -> np.ndarray:
        """(M, H) effective ExAN counts of the head's ReLU layers."""
        return np.stack([layer.effective_exans for layer in self.layers], axis=1)

    @property
    def insecure(self) -> bool:
        """True when every sample meets the condition (the batch is provably reconstructable)."""
        return bool(self.certifiable.all())

    @property
    def certifiable_fraction(self) -> float:
        return float(self.certifiable.mean())

    def _head_summary(self) -> str:
        return ", ".join(
            f"{layer.name}: min {int(c.min())} / median {float(np.median(c)):g} ExANs"
            for layer, c in zip(self.layers, self.exan_counts.T)
        )

    def summary(self) -> str:
        if self.conv_layers:
            conv = ", ".join(
                f"{c.name}: median {float(np.median(c.unit_exans)):g} unit / {float(np.median(c.channel_exans)):g} "
                f"channel ExANs, {int(c.solvable.sum())}/{len(c.solvable)} solvable"
                for c in self.conv_layers
            )
            head = int(self.head_certifiable.sum()) if self.head_certifiable is not None else 0
            return (f"{int(self.certifiable.sum())}/{self.batch_size} samples certifiable (FC head alone: {head}); "
                    f"{conv}; head: {self._head_summary()}{self._saturated_summary()}")
        verdict = "insecure (every sample reconstructable)" if self.insecure else "not fully reconstructable"
        peeled = int(self.peeled.sum()) if self.peeled is not None else 0
        after = f" ({peeled} once the others are peeled off)" if peeled else ""
        return (f"{int(self.certifiable.sum())}/{self.batch_size} samples certifiable{after}; batch {verdict}; "
                f"{self._head_summary()}{self._saturated_summary()}")

    def _saturated_summary(self) -> str:
        n = 0 if self.saturated is None else int(self.saturated.sum())
        return f"; {n} classified with probability 1 (no effective ExAN)" if n else ""

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {
            "batch_size": self.batch_size,
            "certifiable": self.certifiable.tolist(),
            "certifiable_fraction": self.certifiable_fraction,
            "insecure": self.insecure,
            "condition": {"min_exans_last_layer": self.min_last, "min_exans_other_layers": self.min_other},
            "layers": [layer.to_dict() for layer in self.layers],
            "saturated": None if self.saturated is None else self.saturated.tolist(),
            "peeled": None if self.peeled is None else self.peeled.tolist(),
        }
        if self.conv_layers:
            d["condition"] = {"min_exans_last_layer": self.min_last, "min_exans_other_layers": self.min_other,
                              "conv_blocks_solvable": True}
            d["allowed_error"] = self.allowed_error
            d["head_certifiable"] = None if self.head_certifiable is None else self.head_certifiable.tolist()
            d["error_bound"] = None if self.error_bound is None else [float(b) for b in self.error_bound]
            d["conv_layers"] = [c.to_dict() for c in self.conv_layers]
        return d
