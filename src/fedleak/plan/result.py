"""What :func:`fedleak.plan` returns: typed parts, a JSON-ready dict and the text ``fedleak check`` prints."""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedleak.update_kind import UpdateKind

ROUTE_APPLIES, ROUTE_PARTIAL, ROUTE_UNPROVEN, ROUTE_CANNOT = "applies", "partial", "unproven", "cannot"
STATUS_DETERMINED, STATUS_UNPROVEN, STATUS_UNDERDETERMINED = "determined", "unproven", "underdetermined"


def _shape(shape: tuple[int, ...]) -> str:
    return " x ".join(str(s) for s in shape)


def layer_label(name: str) -> str:
    """A layer's name as text: the user's own (``fc1``), or ``layer 1`` for an ``nn.Sequential`` index."""
    return f"layer {name}" if name.isdigit() else name


@dataclass(frozen=True)
class Evidence:
    """Where the plan's counts come from: ``measured`` on the user's inputs (``samples`` of them), or on synthetic
    inputs under the assumption ``description`` states."""

    measured: bool
    samples: int
    description: str


@dataclass(frozen=True)
class ConvBlockPlan:
    """One conv block: equations the attack reads per sample vs the unknowns it must find.

    ``equations_median`` / ``equations_min``: non-zero output units per sample (after pooling when the block pools);
    ``fraction``: samples with at least ``needed``; ``unpooled_median``: active conv units per sample before
    pooling (the equations without the pooling; None for a block that does not pool); ``channels_keeping_pool``:
    the channels a pooled block needs for its count alone (its uniqueness proof still unproven; None when no
    channel count suffices). ``proven`` of ``proof_samples`` inputs: the attack's proof of the block succeeded
    (``proof_samples`` 0: not tried, ``proof_note`` says why). ``status``: ``"underdetermined"`` (too few
    equations), ``"unproven"`` (enough, but the proof failed or was not tried) or ``"determined"`` (proven).
    """

    name: str
    in_shape: tuple[int, int, int]
    conv_shape: tuple[int, int, int]
    out_shape: tuple[int, int, int]
    pooling: str
    unknowns: int
    max_equations: int
    needed: int
    equations_median: float
    equations_min: int
    fraction: float
    unpooled_median: float | None
    channels_keeping_pool: int | None
    status: str
    proof_samples: int = 0
    proven: int = 0
    proof_note: str = ""

    @property
    def applies(self) -> bool:
        return self.status == STATUS_DETERMINED

    def reason(self) -> str:
        after = f" after {self.pooling}" if self.pooling else ""
        c, h, w = self.out_shape
        text = (f"{layer_label(self.name)}: {c} channels x {h} x {w}{after} give at most {self.max_equations} "
                f"equations "
                f"(median {self.equations_median:g}, min {self.equations_min} non-zero per sample) for "
                f"{self.unknowns} unknowns ({_shape(self.in_shape)})")
        if self.status == STATUS_UNDERDETERMINED:
            more = "more than" if self.pooling else "at least"
            return text + f": underdetermined (the attack needs {more} {self.unknowns})"
        tried = f"the attack proved it for {self.proven} of {self.proof_samples} inputs"
        if self.status == STATUS_UNPROVEN:
            why = tried if self.proof_samples else f"its proof was {self.proof_note}"
            pooled = "; a pooled block's uniqueness proof rarely succeeds" if self.pooling else ""
            return text + f": enough equations, unproven ({why}{pooled})"
        return text + f": determined ({tried})"


@dataclass(frozen=True)
class DenseAtBatch:
    """One dense layer at one batch size: ExANs the batch needs in it (``needed`` = per-sample need x batch),
    mean ExANs per sample, and the fraction of samples with their need."""

    batch_size: int
    needed: int
    mean_exans: float
    fraction: float


@dataclass(frozen=True)
class DenseLayerPlan:
    """One hidden ReLU layer of the dense head: ``need`` ExANs per sample (2 at the last ReLU layer, else 1),
    its width, how active it is, and up to which batch size it alone allows the route (``max_batch_size``;
    ``counting_bound``: width // need, the most any data could reach)."""

    name: str
    width: int
    last: bool
    need: int
    active_fraction: float
    dead_fraction: float
    counting_bound: int
    max_batch_size: int
    capped: bool
    at: tuple[DenseAtBatch, ...]

    def reason(self) -> str:
        where = "the last ReLU layer" if self.last else "a hidden ReLU layer"
        up_to = f"{'at least ' if self.capped else ''}{self.max_batch_size}"
        plural = "s" if self.need > 1 else ""
        text = (f"{layer_label(self.name)} ({where}): every sample needs {self.need} ExAN{plural} of its own, "
                f"so a batch of M needs {self.need} x M of its {self.width} neurons (M <= {self.counting_bound}); "
                f"a sample activates {100 * self.active_fraction:.0f}% of them")
        if self.dead_fraction:
            text += f" ({100 * self.dead_fraction:.0f}% fire for no input measured)"
        at = "; ".join(f"batch {a.batch_size}: {a.mean_exans:.1f} ExANs per sample, {100 * a.fraction:.0f}% have "
                       f"{self.need}" for a in self.at)
        return text + (f"; {at}" if at else "") + f"; alone it allows batches up to {up_to}"


LayerPlan = ConvBlockPlan | DenseLayerPlan


@dataclass(frozen=True)
class BatchEstimate:
    """At ``batch_size``: the fraction of samples meeting the whole condition, the fraction of batches in which
    every sample does, and the layer that fails most often (None when none fails). ``one_reading``: where the
    attack peels the update, the fraction meeting the condition on the update as sent (what its first reading
    certifies; ``fraction`` then counts the peeling closure, an upper bound its later rounds reach less of); else
    None."""

    batch_size: int
    fraction: float
    whole_batch: float
    limited_by: str | None
    one_reading: float | None = None


def peeling_clause(one_reading: float | None) -> str:
    """Said after an estimate where it counts the peeling closure (an upper bound; the plan's note says why): the
    first reading's share beside it (:attr:`BatchEstimate.one_reading`); empty where the attack does not peel."""
    if one_reading is None:
        return ""
    return f" by peeling, an upper bound ({100 * one_reading:.0f}% in its first reading)"


@dataclass(frozen=True)
class Change:
    """One change of the model: ``kind`` ``"width"`` (neurons of a dense layer), ``"channels"`` (of a conv) or
    ``"pooling"`` (``before``: the window side, ``after`` 1: no pooling). :meth:`text` says it without the layer."""

    layer: str
    kind: str
    before: int
    after: int

    def text(self) -> str:
        if self.kind == "pooling":
            return f"remove the {self.before}x{self.before} pooling after it"
        noun = "neurons" if self.kind == "width" else "channels"
        return f"use {self.after:,} {noun} ({self.before:,} now)"


@dataclass(frozen=True)
class Proposal:
    """The smallest change found that lets the route apply at ``batch_size``; ``fraction``: the samples meeting the
    whole condition with it, by the plan's own counting (``checked``: at least the target); ``max_batch_size``: the
    largest batch at which the changed model meets the target (``batch_size`` when checked). ``blocked``: why no
    sufficient change was found, one entry per layer (empty when one was)."""

    batch_size: int
    changes: tuple[Change, ...]
    fraction: float
    checked: bool
    max_batch_size: int
    parameters_before: int
    parameters_after: int
    assumption: str
    blocked: tuple[str, ...] = ()

    def lines(self) -> tuple[str, ...]:
        """One line per changed layer, its changes together."""
        by_layer: dict[str, list[str]] = {}
        for change in self.changes:
            by_layer.setdefault(change.layer, []).append(change.text())
        return tuple(f"{layer_label(layer)}: {' and '.join(texts)}" for layer, texts in by_layer.items())


@dataclass(frozen=True)
class AttackAdvice:
    """Whether an attack is worth running on this model and update, and why in one line; ``certified``: its
    reconstructions come with a certificate."""

    name: str
    recommended: bool
    certified: bool
    why: str


@dataclass(frozen=True)
class Plan:
    """Which attacks apply to a model and update, and why, before any attack runs (:func:`fedleak.plan`).

    ``route`` is the exact route's verdict at ``batch_size`` (the largest batch size judged): ``"applies"`` (at least
    ``target`` of the samples meet its condition), ``"partial"`` (some do), ``"unproven"`` (enough would, but a pooled
    block's uniqueness proof is uncertain) or ``"cannot"``; ``max_batch_size`` is the largest batch at which at least
    ``target`` of the samples meet the condition (``capped``: the search stopped at the samples measured or the
    counting bound).
    """

    model: str
    input_shape: tuple[int, ...]
    parameters: int
    verdict: str
    route: str
    target: float
    batch_size: int
    max_batch_size: int
    capped: bool
    evidence: Evidence
    update: UpdateKind | None
    blocks: tuple[ConvBlockPlan, ...]
    dense: tuple[DenseLayerPlan, ...]
    estimates: tuple[BatchEstimate, ...]
    proposal: Proposal | None
    attacks: tuple[AttackAdvice, ...]
    notes: tuple[str, ...] = ()

    @property
    def layers(self) -> tuple[LayerPlan, ...]:
        """Every layer the route reads, from the input up: conv blocks, then the dense ReLU layers."""
        return (*self.blocks, *self.dense)

    @property
    def recommended(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.attacks if a.recommended)

    def to_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready values (tuples as lists, every typed part as a dict)."""
        out = _plain(self)
        out["update"] = None if self.update is None else self.update.to_dict()
        out["layers"] = [{"kind": "conv" if isinstance(layer, ConvBlockPlan) else "dense", "name": layer.name,
                          "reason": layer.reason()} for layer in self.layers]
        return out

    def to_text(self) -> str:
        from fedleak.plan.text import render

        return render(self)


def _plain(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (tuple, list)):
        return [_plain(v) for v in obj]
    return obj
