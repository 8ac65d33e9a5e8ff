"""The dense head's condition at a batch size, estimated by drawing batches from the measured samples.

A sample is reconstructable by the exact route when it has at least 2 effective exclusively activated neurons
(ExANs) at the head's last ReLU layer and at least 1 at every other (Pan et al.; :func:`fedleak.analyze_exclusivity`
counts the same). Whether a neuron is exclusive depends on the other samples of the batch, so the condition at
batch size M is estimated by drawing batches of M distinct measured samples and counting, in every drawn batch,
each sample's ExANs exactly as the analysis does. The draws are seeded per batch size, so the estimate is
reproducible.

A wider layer is the measured layer plus new neurons drawn like its own (:mod:`fedleak.plan.widen`), in a fixed
order: on the same drawn batches, a neuron can only add ExANs, so the fraction of samples meeting a layer's need
grows with the width and the smallest sufficient width is found by a scan.

Where the attack peels the update (an MLP's, at a pinned scale: :mod:`fedleak.attacks.exact.peeling`), the whole
condition is the peeling closure: in every drawn batch, the samples meeting it are peeled off and the ExANs of the
others counted again among the samples left, round after round, as :func:`fedleak.analyze_exclusivity` does. A
neuron then serves several samples in turn, so the pigeonhole bound no longer caps the batch. The per-layer counts
and the width scan stay those of the update as sent.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets.shares import heard_alone
from fedleak.plan.activity import DenseActivity
from fedleak.plan.widen import CHUNK

MIN_DRAWS = 4096  # samples drawn per batch size (over all drawn batches)
MIN_TRIALS, MAX_TRIALS = 16, 256
BUDGET = 1 << 24  # booleans per chunk of drawn batches
MAX_WIDTH = 1 << 14  # the widest layer a proposed change may ask for
HOPELESS_AFTER = 4  # chunks of added neurons scanned before a hopeless search may stop


@dataclass(frozen=True)
class LayerCount:
    """One layer at one batch size and width: per drawn sample (T x M) whether it has the ExANs it needs, and
    the mean number of ExANs per sample."""

    ok: torch.Tensor
    mean_exans: float

    @property
    def fraction(self) -> float:
        return float(self.ok.double().mean())


def _exclusive(active: torch.Tensor, effective: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """On the drawn batches ``idx`` (T x M): per sample and neuron (T x M x width, bool), whether the neuron is an
    effective ExAN of the sample (it fires for that sample alone)."""
    step = max(1, BUDGET // max(1, idx.shape[1] * active.shape[1]))
    parts = []
    for start in range(0, idx.shape[0], step):
        b = idx[start:start + step]
        single = active[b].sum(1, dtype=torch.int32) == 1
        parts.append(effective[b] & single[:, None, :])
    return torch.cat(parts)


def _exclusive_counts(active: torch.Tensor, effective: torch.Tensor, idx: torch.Tensor,
                      members: torch.Tensor | None = None) -> torch.Tensor:
    """What ``_exclusive(...).sum(2)`` gives (T x M), by two matrix products: how many samples of each drawn
    batch a neuron fires for, then each sample's neurons that fire for it alone; with ``members`` (T x M bool),
    counted among those samples of each drawn batch only (a non-member's count then means nothing)."""
    onehot = torch.zeros(idx.shape[0], active.shape[0])
    onehot.scatter_(1, idx, 1.0 if members is None else members.to(torch.float32))
    single = ((onehot @ active.to(torch.float32)) == 1).to(torch.float32)  # T x width
    per = effective.to(torch.float32) @ single.T  # n x T: ExANs of sample i if it were in batch t
    return per.T.gather(1, idx).round().to(torch.int64)


def _heard_counts(shares: torch.Tensor, effective: torch.Tensor, idx: torch.Tensor,
                  members: torch.Tensor | None = None) -> torch.Tensor:
    """What :func:`_exclusive_counts` gives on neurons where a batch hears a sample's share or not as the others
    come and go (:mod:`fedleak.nets.shares`): a neuron is a sample's ExAN when that sample is the only one of the
    drawn batch (of its ``members``) heard on the neuron's row."""
    step = max(1, BUDGET // max(1, idx.shape[1] * shares.shape[1]))
    parts = []
    for start in range(0, idx.shape[0], step):
        b = idx[start:start + step]
        s = shares[b] if members is None else shares[b] * members[start:start + step, :, None].to(shares.dtype)
        parts.append((heard_alone(s) & effective[b]).sum(2, dtype=torch.int64))
    return torch.cat(parts)


def _measured_counts(layer: DenseActivity, idx: torch.Tensor, members: torch.Tensor | None = None) -> torch.Tensor:
    """ExANs per drawn sample (T x M) among a layer's measured neurons (of ``members`` of each drawn batch): by
    matrix products over the firing every batch hears alike, sample by sample on the other neurons' rows."""
    heard = layer.audible
    k = _exclusive_counts(heard.firing, layer.effective, idx, members)
    if len(heard.columns):
        k = k + _heard_counts(heard.shares, layer.effective[:, heard.columns], idx, members)
    return k


class HeadModel:
    """The head's measured activity, and the condition estimated at any batch size and widths."""

    def __init__(self, layers: Sequence[DenseActivity], conv_ok: np.ndarray, seed: int = 0, peel: bool = False
                 ) -> None:
        self.layers = tuple(layers)
        self.peel = peel  # the attack peels the update: the whole condition is the peeling closure
        self.need = tuple(2 if h == len(layers) - 1 else 1 for h in range(len(layers)))
        self.conv_ok = torch.from_numpy(np.asarray(conv_ok, dtype=bool))
        self.samples = int(self.conv_ok.shape[0])
        self.seed = seed
        self._batches: dict[int, torch.Tensor] = {}
        self._own: dict[tuple[int, int], torch.Tensor] = {}  # (h, M) -> T x M measured ExANs
        self._added: dict[tuple[int, int], list[torch.Tensor]] = {}  # (h, M) -> cumulative ExANs per added chunk

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(layer.width for layer in self.layers)

    def counting_bound(self, widths: Sequence[int] | None = None) -> int:
        """The largest batch the widths allow at all: every sample needs its own ExANs (pigeonhole)."""
        widths = self.widths if widths is None else widths
        return min(w // n for w, n in zip(widths, self.need))

    def trials(self, batch_size: int) -> int:
        return int(min(MAX_TRIALS, max(MIN_TRIALS, math.ceil(MIN_DRAWS / batch_size))))

    def batches(self, batch_size: int) -> torch.Tensor:
        """The drawn batches (T x M indices of distinct samples), seeded by the batch size."""
        if batch_size > self.samples:
            raise ValueError(f"batch size {batch_size} exceeds the {self.samples} samples measured")
        if batch_size not in self._batches:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + batch_size)
            keys = torch.rand(self.trials(batch_size), self.samples, generator=gen)
            self._batches[batch_size] = keys.argsort(1)[:, :batch_size]
        return self._batches[batch_size]

    # ---- counts -------------------------------------------------------------------------------------------

    def _own_counts(self, h: int, batch_size: int) -> torch.Tensor:
        key = (h, batch_size)
        if key not in self._own:
            layer = self.layers[h]
            self._own[key] = _measured_counts(layer, self.batches(batch_size))
        return self._own[key]

    def _chunk_exclusive(self, h: int, batch_size: int, c: int, *, per_neuron: bool = False) -> torch.Tensor:
        """Added chunk ``c`` of layer ``h`` on the drawn batches: ExANs per drawn sample (T x M), or per sample
        and neuron (T x M x CHUNK). A new neuron's backward signal is taken to be non-zero wherever it fires."""
        act = self.layers[h].widening.chunk(c)
        idx = self.batches(batch_size)
        return _exclusive(act, act, idx) if per_neuron else _exclusive_counts(act, act, idx)

    def _added_counts(self, h: int, batch_size: int, extra: int) -> torch.Tensor:
        """ExANs per drawn sample (T x M) among the first ``extra`` added neurons of layer ``h``."""
        key = (h, batch_size)
        snaps = self._added.setdefault(key, [torch.zeros_like(self._own_counts(h, batch_size))])
        full, rem = divmod(extra, CHUNK)
        while len(snaps) <= full:
            snaps.append(snaps[-1] + self._chunk_exclusive(h, batch_size, len(snaps) - 1))
        if rem == 0:
            return snaps[full]
        return snaps[full] + self._chunk_exclusive(h, batch_size, full, per_neuron=True)[:, :, :rem].sum(2)

    def layer(self, h: int, batch_size: int, width: int | None = None) -> LayerCount:
        """Layer ``h`` on the drawn batches of ``batch_size``, widened to ``width`` neurons if given."""
        own = self.layers[h].width
        k = self._own_counts(h, batch_size)
        if width is not None and width > own:
            k = k + self._added_counts(h, batch_size, int(width) - own)
        return LayerCount(k >= self.need[h], float(k.double().mean()))

    def joint(self, batch_size: int, widths: Sequence[int] | None = None, conv_ok: torch.Tensor | None = None,
              layers: Sequence[int] | None = None, peel: bool | None = None) -> torch.Tensor:
        """Per drawn sample (T x M): the whole condition (every layer, or those in ``layers``, and the conv blocks'
        per-sample verdict ``conv_ok``, n bools; default: as measured), with the samples peeling adds where
        ``peel`` (default: where the attack peels)."""
        widths = self.widths if widths is None else widths
        conv = self.conv_ok if conv_ok is None else conv_ok
        ok = conv[self.batches(batch_size)].clone()
        picked = range(len(self.layers)) if layers is None else layers
        for h in picked:
            ok &= self.layer(h, batch_size, widths[h]).ok
        return self._peeled(batch_size, widths, conv, picked, ok) if (self.peel if peel is None else peel) else ok

    def _peeled(self, batch_size: int, widths: Sequence[int], conv: torch.Tensor, picked: Sequence[int],
                ok: torch.Tensor) -> torch.Tensor:
        """``ok`` (T x M) with the samples peeling adds, round after round (module docstring)."""
        idx = self.batches(batch_size)
        done, can = ok.clone(), conv[idx]
        while not bool(done.all()):
            left = ~done
            new = left & can
            for h in picked:
                new &= self._counts_among(h, idx, widths[h], left) >= self.need[h]
            if not bool(new.any()):
                break
            done |= new
        return done

    def _counts_among(self, h: int, idx: torch.Tensor, width: int, members: torch.Tensor) -> torch.Tensor:
        """ExANs per drawn sample (T x M) of layer ``h`` widened to ``width``, counted among ``members``."""
        layer = self.layers[h]
        k = _measured_counts(layer, idx, members)
        extra = max(0, int(width) - layer.width)
        for c in range(math.ceil(extra / CHUNK)):
            act = layer.widening.chunk(c)[:, :min(CHUNK, extra - c * CHUNK)]
            k = k + _exclusive_counts(act, act, idx, members)
        return k

    def fraction(self, batch_size: int, widths: Sequence[int] | None = None, conv_ok: torch.Tensor | None = None,
                 layers: Sequence[int] | None = None, peel: bool | None = None) -> float:
        """The fraction of samples meeting the whole condition (or that of ``layers``) at ``batch_size``."""
        return float(self.joint(batch_size, widths, conv_ok, layers, peel).double().mean())

    def whole_batch(self, batch_size: int, widths: Sequence[int] | None = None) -> float:
        """The fraction of drawn batches in which every sample meets the whole condition."""
        return float(self.joint(batch_size, widths).all(1).double().mean())

    # ---- searches -----------------------------------------------------------------------------------------

    def largest_batch(self, target: float, widths: Sequence[int] | None = None, conv_ok: torch.Tensor | None = None,
                      layers: Sequence[int] | None = None, peel: bool | None = None) -> tuple[int, bool]:
        """The largest batch size at which at least ``target`` of the samples meet the condition (or that of
        ``layers``; 0: none; with peeling as :meth:`joint`), and whether the search stopped at its cap (the samples
        measured, or, without peeling, the counting bound) rather than at a failing batch size."""
        widths = self.widths if widths is None else widths
        picked = range(len(self.layers)) if layers is None else layers
        peel = self.peel if peel is None else peel
        cap = min([self.samples] + ([] if peel else [widths[h] // self.need[h] for h in picked]))
        if cap < 1:
            return 0, False

        def good(m: int) -> bool:
            return self.fraction(m, widths, conv_ok, layers, peel) >= target

        if not good(1):
            return 0, False
        lo, hi = 1, 2
        while hi <= cap and good(hi):
            lo, hi = hi, hi * 2
        if hi > cap:
            if lo == cap or good(cap):
                return cap, True
            hi = cap
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if good(mid) else (lo, mid)
        return lo, False

    def smallest_width(self, h: int, batch_size: int, target: float) -> int | None:
        """The fewest neurons layer ``h`` needs so that at least ``target`` of the samples have its ExANs at
        ``batch_size`` (its own width if that is enough; None beyond :data:`MAX_WIDTH`).

        The added neurons are scanned in order. The scan stops early, with None, when even an optimistic
        extrapolation says :data:`MAX_WIDTH` neurons cannot do: every drawn sample's rate of ExANs per added
        neuron so far, plus half an ExAN, as a Poisson mean at :data:`MAX_WIDTH`."""
        own = self.layers[h].width
        need = self.need[h]
        k = self._own_counts(h, batch_size)
        if float((k >= need).double().mean()) >= target:
            return own
        last = (MAX_WIDTH - own) // CHUNK
        for c in range(last + 1):
            base = self._added_counts(h, batch_size, c * CHUNK)
            if c >= HOPELESS_AFTER and _poisson_fraction(k, base, c * CHUNK, MAX_WIDTH - own, need) < target:
                return None
            if float(((k + self._added_counts(h, batch_size, (c + 1) * CHUNK)) >= need).double().mean()) < target:
                continue
            excl = self._chunk_exclusive(h, batch_size, c, per_neuron=True)
            running = (k + base)[:, :, None] + excl.cumsum(2)  # T x M x CHUNK: ExANs after each added neuron
            frac = (running >= need).double().mean((0, 1))
            first = int(torch.nonzero(frac >= target)[0, 0])
            width = own + c * CHUNK + first + 1
            return width if width <= MAX_WIDTH else None
        return None


def _poisson_fraction(own: torch.Tensor, added: torch.Tensor, scanned: int, extra: int, need: int) -> float:
    """An optimistic fraction of samples with ``need`` ExANs after ``extra`` added neurons: each drawn sample's
    added ExANs so far (plus 0.5) per scanned neuron, times ``extra``, as a Poisson mean."""
    lam = (added.to(torch.float64) + 0.5) * (extra / scanned)
    missing = (need - own).clamp_min(0)
    p_short = torch.zeros_like(lam)
    term = torch.exp(-lam)
    for j in range(need):  # P(Poisson(lam) < missing) = sum_{j < missing} e^-lam lam^j / j!
        p_short += torch.where(missing > j, term, torch.zeros_like(term))
        term = term * lam / (j + 1)
    return float((1.0 - p_short).mean())
