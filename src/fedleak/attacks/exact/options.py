"""Options of the exclusivity attack: one set for the dense head and the conv blocks below it."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedleak.attacks.defense_aware import defense_stack
from fedleak.client_loss import check_class_weights, check_label_smoothing
from fedleak.errors import FedleakError
from fedleak.focal import check_focal_gamma
from fedleak.option_fields import options_from, validate_fields

FALLBACKS = ("features", "none")


@dataclass(frozen=True)
class Reduction:
    """How a client's loss reduces over its batch: every sample's scale in the gradient of a batch of ``M``,
    the same in words, and whether that scale reveals ``M``."""

    scale: Callable[[int], float]
    written: Callable[[int], str]
    reveals_batch_size: bool


NO_SIZE_FROM_SUM = ("the update reports no number of examples, which a summed loss's gradient does not reveal "
                    "(every sample has the scale 1); without the batch size the rebuilt samples cannot be checked "
                    "jointly (give the update the number of examples its client reported: num_examples)")
REDUCTIONS = {"mean": Reduction(lambda batch_size: 1.0 / batch_size, lambda batch_size: f"1/{batch_size}", True),
              "sum": Reduction(lambda batch_size: 1.0, lambda batch_size: "1", False)}


@dataclass(frozen=True)
class ExclusivityOptions:
    """Tolerances of the exclusivity attack (all relative; see docs/attacks.md and docs/cnn.md for how they
    were set).

    **Dense head** (the whole network for an MLP):

    ``group_tol``: two implied inputs closer than this (relative L2) are the same sample.
    ``core_tol``: the rows that represent a group (and witness it) lie this close to its medoid.
    ``top_tol``: a candidate's output-layer columns must match its loss vector this closely to be kept
    (a loose screen; the certificate is strict).
    ``forward_tol``: a candidate layer input must reproduce the known layer output this closely (in the head's
    walk-down, and for a CNN the rebuilt input must reproduce the features this closely, float64 and float32).
    ``check_tol``: floor of the certificate tolerance on a witness row; the tolerance grows with the
    row's measured float32 noise (``noise_factor`` times it) and a row noisier than ``max_noise`` does not
    count as a witness. ``label_eps_ulps``: how many float32 ulps the label entry of a sample's loss vector
    may be corrected by (the client computes it as ``p_y - 1``, with cancellation).
    ``forward_solve``: solve a layer's input from its active outputs when no exclusive row is left.
    ``rows_per_try`` / ``max_rows``: rows checked per batched forward pass / at most, per sample and layer.
    ``known_scale``: the update is the mean-loss gradient, so its common scale is ``1/M`` and reveals the
    batch size. Set it to False for a scaled gradient (e.g. a one-step FedAvg weight delta, scale
    ``lr/M``): the batch size then comes from ``num_examples`` and the batch certificate fits the factor.
    ``loss_reduction``: how the client's loss reduces over the batch, with ``known_scale``: ``"mean"`` (the
    default, as ``F.cross_entropy`` does: each sample's scale is ``1/M``) or ``"sum"`` (``reduction="sum"``:
    each sample's scale is 1, which does not reveal the batch size, so ``num_examples`` must be reported).
    ``label_smoothing``: the client's loss's label smoothing ``s`` in [0, 1), as in
    ``F.cross_entropy(..., label_smoothing=s)`` (its target is ``(1 - s) onehot(y) + s / K``): every loss vector
    the attack computes, the labels it reads and the gradient the certificate recomputes take it. None (the
    default): 0, unless no row passes the check of a plain cross-entropy and the rows agree on another ``s``
    (:mod:`fedleak.attacks.exact.smoothing`): the attack then runs with it and notes so.
    ``class_weights``: the client's cross-entropy's class weights (``F.cross_entropy(..., weight=w)``, one per
    class; not with a label smoothing above 0): each sample's scale is its label's weight times the batch's
    common one, ``1 / (the sum of the batch's weights)`` for a mean loss, which the batch size does not give: the
    certificate takes it from the few values the label histograms allow (two classes), or fits it; the batch size
    comes from ``num_examples``.
    ``focal_gamma``: the exponent ``γ`` of the client's focal loss ``-(1 - p_y)^γ log p_y`` (:mod:`fedleak.focal`;
    0, the default: the cross-entropy; not with label smoothing or class weights): every loss vector the attack
    computes is the cross-entropy's times the sample's factor ``s(p_y)``, so each sample's scale is ``s / M``
    recomputed from its rebuilt input, and the label smoothing is not read off the update.
    ``train_dropout``: the client ran the model's Dropout in training mode (``model.train()``, as training loops
    do), dropping random units of every sample. True: each group of rows is checked against the loss vector its
    own output-layer columns show, not the one the eval-mode forward pass computes (the dropped units are
    unknown), and the inputs are rebuilt **without a certificate** (:mod:`fedleak.attacks.exact.dropout`; MLPs
    only). None (the default): read in eval mode, and where that certifies nothing and the model has Dropout and
    more than two classes, also read so, keeping what rebuilds more samples, with a note. False: in eval mode only,
    and the client is known to run the model in eval mode: what the model does to its input only in training mode
    (a Dropout on it), which otherwise withholds every certificate (:mod:`fedleak.attacks.masked_input`), did not
    happen.
    ``min_last`` / ``min_other``: witnesses a certified sample needs at the last / other ReLU layers.
    ``batch_tol``: the joint test's tolerance: the residual of the observed gradient after the certified
    samples' terms, beyond the rank the other samples can fill, relative to the layer's gradient.
    ``min_distance``: a certified sample's input to the last ReLU layer must lie at least this far (relative)
    from the span of the inputs of the samples not certified (a blend of them lies in it).
    ``exact_tol`` / ``data_range``: a certified input must be known to within ``exact_tol`` of the data's range
    ``(lo, hi)`` (default: the rebuilt input's own min and max); checked where the update's rounding is known
    (weight deltas).
    ``clip_norm``: the per-sample clipping bound ``C`` when the client clipped each sample's gradient to norm
    ``C`` before averaging (DP-SGD without noise, Opacus-style): each sample's scale is then
    ``min(1, C / ||g_k||) / M``, which the certificate recomputes from the rebuilt sample (MLPs only: a CNN
    sample's gradient norm includes its conv layers).
    ``beyond_batch``: return every rebuilt candidate, also those beyond the batch size (blends of samples,
    uncertified, as the notes say); False: at most the batch size, the certified ones and the most plausible
    others (rebuilt, at the batch's common scale, most witnesses), as ``auto`` asks. Either way, where the
    certified samples are the whole batch (and reproduce the whole update) the other candidates are proven not to
    be samples and are dropped; the notes count them.
    ``peel``: once samples are certified, subtract their recomputed gradient and certify, on what is left, the
    samples a neuron they share with them leaves exclusive, round after round (:mod:`~fedleak.attacks.exact.peeling`;
    MLPs, the batch's scale pinned, no defense that scales the update).
    ``defense``: the client's defenses (a :class:`~fedleak.defenses.DefenseStack`, a defense, a spec
    ``"name:key=value"`` or a list; stored as a stack): where the certificate can model one it does (``dp-sgd``
    without noise sets ``clip_norm``; whole-update clipping an unknown common scale), else nothing is certified
    and every sample says why (:data:`fedleak.attacks.defense_aware.EXACT_RULES`).
    ``threads``: the thread count of torch and of numpy's and scipy's BLAS while the attack runs (restored
    after; None keeps theirs). One thread by default: the attack's products are small, and on a machine whose
    other cores are busy more threads made it several times slower. ``workers``: forked processes that share a
    CNN's per-sample conv inversion (Linux, outside daemonic processes, large batches only; None: one per core;
    1 by default: forking inside a threaded server is unsafe and on 2 shared cores it did not pay off).

    **Conv blocks** (read only when the network has some):

    ``max_error``: a sample is certified only if the proven 2-norm error bound of its rebuilt input (which
    bounds every value's error) is at most this fraction of the data range (default 1: the bound proves which
    sample it is, not that it is exact); the certificate states that bound (``SampleRecovery.error_bound``)
    and :func:`fedleak.metrics.match` holds it to it. Set e.g. ``1e-3`` to certify only samples proven
    within 0.1% of the range. ``rounding``: the client's float32 rounding of a unit is modelled as
    ``rounding * (sqrt(fan_in) + 2) * eps32 * (|A| |x| + |c|)`` (the probabilistic rounding-error model of
    Higham & Mary). ``ratio_noise``: relative noise of a feature recovered as a gradient ratio, in units of
    eps32. ``pattern_iters``: activation-pattern iterations for pooled blocks. ``gordan``: prove a pooled
    block's solution unique (an LP). ``fallback``: ``"features"`` (feature matching, uncertified) or
    ``"none"`` where a block is underdetermined; ``fallback_steps`` / ``fallback_lr`` / ``fallback_tv`` /
    ``seed``: its Adam steps, learning rate, total-variation weight and seed.
    """

    group_tol: float = 1e-5
    core_tol: float = 1e-6
    top_tol: float = 1e-3
    forward_tol: float = 1e-5
    check_tol: float = 1e-5
    noise_factor: float = 30.0
    max_noise: float = 1e-4
    scale_tol: float = 1e-4
    batch_tol: float = 1e-4
    forward_solve: bool = True
    solve_max_error: float = 1e-6
    rows_per_try: int = 32
    max_rows: int = 512
    min_last: int = 2
    min_other: int = 1
    known_scale: bool = True
    loss_reduction: str = "mean"
    label_smoothing: float | None = None
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 0.0
    train_dropout: bool | None = None
    label_eps_ulps: float = 4.0
    max_witnesses: int = 64
    clip_norm: float | None = None
    min_distance: float = 1e-3
    exact_tol: float = 1e-4
    data_range: tuple[float, float] | None = None
    beyond_batch: bool = True
    peel: bool = True
    defense: Any = None
    threads: int | None = field(default=1, metadata={"low": 1})
    workers: int | None = field(default=1, metadata={"low": 1})
    # conv blocks
    max_error: float = 1.0
    rounding: float = 1.0
    ratio_noise: float = 8.0
    pattern_iters: int = 30
    gordan: bool = True
    fallback: str = "features"
    fallback_steps: int = 300
    fallback_lr: float = 0.05
    fallback_tv: float = 1e-4
    seed: int = 0

    def range_width(self, x: torch.Tensor | np.ndarray) -> float:
        """The data range's width: ``data_range``, else the min and max of ``x`` (the rebuilt inputs)."""
        lo, hi = self.data_range if self.data_range is not None else (float(x.min()), float(x.max()))
        return max(hi - lo, 1e-300)

    def feature_error(self, features: np.ndarray, eps: float) -> np.ndarray:
        """The per-unit error bound of ``features`` recovered from the head as gradient ratios (``eps``: the
        observed gradient's machine epsilon): ``ratio_noise * eps * |features|``, what the conv blocks' inversion
        starts from."""
        return self.ratio_noise * eps * np.abs(features)

    def __post_init__(self) -> None:
        validate_fields(self)  # types and signs first, then the checks below
        object.__setattr__(self, "defense", defense_stack(self.defense))
        if not 0 < self.max_error <= 1:
            raise FedleakError(f"max_error is a fraction of the data range in (0, 1], got {self.max_error}")
        if self.fallback not in FALLBACKS:
            raise FedleakError(f"fallback must be 'features' or 'none', got {self.fallback!r}")
        if self.loss_reduction not in REDUCTIONS:
            raise FedleakError(f"loss_reduction must be 'mean' or 'sum' (how the client's loss reduces over its "
                               f"batch), got {self.loss_reduction!r}")
        if self.label_smoothing is not None:
            check_label_smoothing(self.label_smoothing)
        object.__setattr__(self, "class_weights",
                           check_class_weights(self.class_weights, label_smoothing=self.label_smoothing))
        check_focal_gamma(self.focal_gamma, label_smoothing=self.label_smoothing, class_weights=self.class_weights)

    @property
    def reduction(self) -> Reduction:
        """How the client's loss reduces over its batch (``loss_reduction``)."""
        return REDUCTIONS[self.loss_reduction]

    @property
    def smoothing(self) -> float:
        """The label smoothing the attack reads with: ``label_smoothing``, 0 where it is None (not yet read)."""
        return self.label_smoothing or 0.0

    def class_factors(self, labels: torch.Tensor) -> np.ndarray:
        """Each sample's factor from its label's class weight (``class_weights``; 1 without them): the sample's
        scale in the gradient is this times the batch's common one."""
        if self.class_weights is None:
            return np.ones(len(labels))
        return np.asarray(self.class_weights, dtype=float)[labels.cpu().numpy()]

    @property
    def weighted_mean(self) -> bool:
        """A mean loss with class weights: its common scale is ``1 / sum of the batch's weights``, which the
        batch size does not give (:func:`~fedleak.attacks.exact.certificate.batch_scale` takes it from the values
        the batch's label histograms allow, or fits it as an unknown factor)."""
        return self.class_weights is not None and self.loss_reduction == "mean"

    def common_scale(self, batch_size: int) -> float:
        """Every sample's scale in a gradient of ``batch_size`` samples whose scale is known (``known_scale``):
        ``1/M`` for a mean loss, 1 for a summed one."""
        return self.reduction.scale(batch_size)


def resolve_options(options: ExclusivityOptions | None, overrides: dict) -> ExclusivityOptions:
    """``options`` (default: the defaults) with the keyword ``overrides`` applied; unknown names are refused."""
    if options is not None and not isinstance(options, ExclusivityOptions):
        raise FedleakError(f"options must be an ExclusivityOptions, got {type(options).__name__}; or pass the "
                           "options as keywords")
    if not overrides:
        return options or default_options()  # validated when built: nothing to check again
    return options_from(ExclusivityOptions, overrides, error=FedleakError, defaults=options or default_options())


@functools.lru_cache(maxsize=1)
def default_options() -> ExclusivityOptions:
    """The default options (frozen, so one instance serves every call)."""
    return ExclusivityOptions()
