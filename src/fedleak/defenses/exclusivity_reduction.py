"""Exclusivity reduction (Pan et al. 2022; algorithms spec §3, D3 with a D1 fallback): the client removes
the exclusively activated neurons (ExANs) of its batch before it computes its update.

The exclusivity attack starts from gradient rows of the last ReLU layer that belong to one sample only; without them
it has nothing to divide. Below it, a row of the first ReLU layer that one sample alone moves is that sample's input
by itself (the first-layer attack divides it by its bias entry), at any depth: the defense treats an MLP's first and
last ReLU layer alike (one layer where it has one). A CNN's head reads the conv blocks' features, not the input, and
only its last ReLU layer is held. A row belongs to one sample when no other sample fires there, and also when the
others that fire add less than ``share`` of its term (``|delta| ||[a, 1]||``, the backward signal times the layer's
input): after training, a confidently classified sample's loss gradient is about zero, and the neurons it fires are
its partners' rows all the same. Such samples add almost nothing to the update and are dropped first (with
``drop_unprotected``). For every ExAN ``j`` of sample ``m`` at either layer the defense takes the cheaper of two
linearised moves (spec §3 D3), priced like the fishing targets:

* switch it **off** for its owner: ``z_mj <= -kappa``, or
* switch it **on** for the other sample closest to firing whose term covers ``m``'s: ``z_m'j >= kappa``,

and solves one small LP per affected sample (the same machinery as fishing: minimal L-infinity radius by
dual Newton, L1 polish, lazy rows, float32 check). A perturbation can itself create new ExANs (a
neuron no other sample uses starts firing, or the partner of a two-sample neuron switches off); those
become lazy "stay off" rows or requirements of the next round. A sample whose LP fails is removed from
the batch (batch composition, D1) if ``drop_unprotected`` is set, else left as it is and reported.

The default ``max_exans=0`` leaves no exclusive row at all at either layer, which is stronger
than defeating the certificate (``max_exans=1``: a single pure row still lets the attack rebuild that
sample, just without a certificate).

Any network :func:`fedleak.nets.as_network` reads works: the last ReLU layer is that of the fully
connected head, and the LPs run on each sample's linearised network through the conv blocks, if any
(:class:`~fedleak.fishing.sample_net.SampleNet`). Perturbed values stay in the data range
(``data_range``, see :class:`ReductionOptions`); a model that normalises its input inside ``forward`` is
perturbed in its own inputs (:mod:`fedleak.fishing.through_map`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fedleak.analysis.batch import read_batch
from fedleak.client_loss import hard_labels, is_soft
from fedleak.clients.mode import client_mode
from fedleak.data.normalize import Normalization
from fedleak.defenses.base import BatchDefense, register_defense
from fedleak.defenses.reduction_results import ReducedSample, ReductionOptions, ReductionResult
from fedleak.errors import FedleakError, OptionError, SolverError
from fedleak.fishing.head_arrays import HeadArrays
from fedleak.fishing.kappa import kappa_at
from fedleak.fishing.lp import LPSettings, Requirement, SampleOutcome, single_threaded_blas
from fedleak.fishing.perturb import resolve_data_range
from fedleak.fishing.sample_lp import solve_sample
from fedleak.fishing.sample_net import SampleNet
from fedleak.fishing.targets import sensitivities
from fedleak.fishing.through_map import first_layer_batch, in_pixels, normalised_back
from fedleak.image_metrics import sample_psnr


def _terms(head: HeadArrays, pre: list[np.ndarray], feats: np.ndarray, labels: np.ndarray, layer: int
           ) -> tuple[np.ndarray, np.ndarray]:
    """(M x d) each sample's term in each gradient row of the head's ReLU layer ``layer``, ``|delta_mj| ||[a_m, 1]||``
    (``delta``: the cross-entropy's backward signal at the neuron's pre-activation, ``a_m``: the layer's input), and
    the term it would have where it does not fire. ``pre``: the float32 pre-activations, as the client's pass has
    them; the loss's signal ``softmax - onehot`` is taken in float32 too, as the client's autograd takes it: a
    confident sample's is then about zero (exactly zero at its label once its probability rounds to 1), and its
    terms are lost in every row it shares. Below the last ReLU layer the signal comes down through the layers above,
    each masked by the sample's own pattern there."""
    a = (head.first_layer_input(feats) if layer == 0 else np.maximum(pre[layer - 1], 0)).astype(np.float64)
    logits = np.maximum(pre[-1], 0).astype(np.float32) @ head.W32[-1].T
    if head.b32[-1] is not None:
        logits = logits + head.b32[-1]
    e = torch.log_softmax(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), 1).exp().numpy()
    e[np.arange(len(e)), labels] -= np.float32(1.0)
    delta = e.astype(np.float64) @ head.W[-1]
    for upper in range(len(pre) - 1, layer, -1):
        delta = (delta * (pre[upper] > 0)) @ head.W[upper]
    potential = np.abs(delta) * np.sqrt((a**2).sum(1) + 1.0)[:, None]
    return np.where(pre[layer] > 0, potential, 0.0), potential


def _covered(Z32: np.ndarray, alive: np.ndarray, kappa: float, terms: np.ndarray) -> np.ndarray:
    """(M x d) the other alive samples' summed terms in each sample's rows (:func:`_terms`), counting only those that
    fire by at least half the margin (a partner that barely fires may not fire on the client's machine)."""
    sure = np.where((Z32 >= 0.5 * kappa) & alive[:, None], terms, 0.0)
    return sure.sum(0)[None, :] - sure


def _exans(Z32: np.ndarray, alive: np.ndarray, kappa: float, terms: np.ndarray, share: float) -> np.ndarray:
    """(M x d) robust ExAN mask among ``alive`` samples: the sample fires (float32) and the other samples' terms in
    the row (:func:`_covered`) sum to less than ``share`` of its own: the row is the sample's alone, or nearly."""
    return (Z32 > 0) & alive[:, None] & (_covered(Z32, alive, kappa, terms) < share * terms)


def reduce_exclusivity(
    model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor, options: ReductionOptions | None = None, **kwargs
) -> ReductionResult:
    """Remove the ExANs of a batch at the last ReLU layer of the head, and at an MLP's first (see the module
    docstring)."""
    start = time.perf_counter()
    opts = options or ReductionOptions.from_kwargs(**kwargs)
    if labels is None:
        raise FedleakError("exclusivity reduction needs the batch's labels")
    norm = opts.normalization
    if norm is not None:  # data normalised before the model: its pixels are perturbed
        inner = replace(opts, normalization=None, data_range=opts.data_range or norm.pixel_range)
        result, pixels = in_pixels(model, inputs, norm,
                                   lambda reading, x: reduce_exclusivity(reading, x, labels, inner))
        kept = torch.from_numpy(result.kept)
        return replace(result, inputs=normalised_back(result.inputs, pixels[kept], inputs[kept], norm), options=opts)
    first = first_layer_batch(model, inputs)  # a normalisation inside forward is read, and perturbed through
    inputs = first.inputs
    batch = read_batch(first.model, first.first, labels)
    net, labels = batch.net, batch.labels
    if net.head.depth == 0:
        raise FedleakError("exclusivity reduction needs at least one hidden ReLU layer")
    lo, hi = data_range = resolve_data_range(inputs, opts.data_range, "exclusivity reduction")
    stack, head = first.arrays(net)
    H = head.depth - 1
    X = inputs.detach().reshape(inputs.shape[0], -1).to(torch.float64).cpu().numpy().copy()
    M = X.shape[0]
    settings = LPSettings(norm=opts.norm, budget=None if opts.budget is None else opts.budget * (hi - lo),
                          polish=opts.polish, polish_slack=opts.polish_slack, solver=opts.solver,
                          time_limit=opts.time_limit, lo=lo, hi=hi)
    nets: dict[int, SampleNet] = {}  # each sample's linearised network, built when it first needs an LP

    y = labels.cpu().numpy()
    # the last ReLU layer's rows start the exclusivity attack; an MLP's first ReLU layer's give a sample's input away
    # by themselves (the first-layer attack): both are held. A CNN's head reads conv features, not the input.
    layers = sorted({H} if net.blocks else {0, H})

    def read_layers(X: np.ndarray) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per protected layer: the pre-activations for a batch of flat inputs (float32, as the client's), the
        samples' terms in its gradient rows and the terms they would have where they do not fire (:func:`_terms`)."""
        feats = stack.features(X.astype(np.float32), True)
        pre = head.preacts(feats, f32=True)
        return {L: (pre[L].astype(np.float64), *_terms(head, pre, feats, y, L)) for L in layers}

    def counts(read: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], alive: np.ndarray) -> np.ndarray:
        """(layers x M) each alive sample's ExANs at each protected layer."""
        return np.stack([_exans(Z, alive, kap[L], terms, opts.share).sum(1) for L, (Z, terms, _) in read.items()])

    clean_pat = [(z > 0).astype(np.float64) for z in head.preacts(stack.features(X))]
    sens = sensitivities(head, [p.mean(0) for p in clean_pat])
    Xp = X.copy()
    alive = np.ones(M, dtype=bool)
    failed = np.zeros(M, dtype=bool)
    reqs: list[dict[tuple[int, int], int]] = [dict() for _ in range(M)]  # (layer, unit) -> on (+1) / off (-1)
    outcomes: list[SampleOutcome | None] = [None] * M
    lp_secs = np.zeros(M)
    lp_solves = np.zeros(M, dtype=np.int64)
    messages = [""] * M
    with single_threaded_blas():
        read = read_layers(X)
        kap = {L: kappa_at(Z, opts.margin) for L, (Z, _, _) in read.items()}
        before = counts(read, np.ones(M, dtype=bool)).sum(0)
        if opts.drop_unprotected:  # a sample whose loss is all but zero adds nothing to the update but its rows
            weight = np.linalg.norm(read[H][2], axis=1)
            for m in np.nonzero(weight < opts.share * np.median(weight))[0]:
                alive[m] = False
                messages[m] = (f"its loss gradient is {weight[m] / np.median(weight):.1e} of the batch's median "
                               "(a confidently classified sample): it adds almost nothing to the update, and the rows "
                               "where no other sample's term is as small give it away")
        for _ in range(opts.rounds):
            read = read_layers(Xp)
            changed: set[int] = set()
            for L, (Z, terms, potential) in read.items():
                ex = _exans(Z, alive, kap[L], terms, opts.share)
                for m in np.nonzero(alive & ~failed & (ex.sum(1) > opts.max_exans))[0]:
                    js = np.nonzero(ex[m])[0]
                    # keep the max_exans ExANs that are dearest to remove; remove the rest
                    off_cost = (Z[m, js] + kap[L]) / sens[L][js]
                    js = js[np.argsort(off_cost)][: len(js) - opts.max_exans]
                    for j in js:
                        # a partner switched on must share the row: its term there not lost beside m's
                        others = np.nonzero(alive & (np.arange(M) != m) & ~failed
                                            & (potential[:, j] >= opts.share * terms[m, j]))[0]
                        c_off = (Z[m, j] + kap[L]) / sens[L][j]
                        if len(others):
                            partner = others[np.argmax(Z[others, j])]
                            c_on = (kap[L] - Z[partner, j]) / sens[L][j]
                        else:
                            partner, c_on = -1, np.inf
                        if c_off <= c_on or reqs[partner].get((L, int(j))) == -1:
                            reqs[m][L, int(j)] = -1
                            changed.add(int(m))
                        else:
                            reqs[partner][L, int(j)] = +1
                            changed.add(int(partner))
            if not changed:
                break
            for m in sorted(changed):
                if m not in nets:
                    nets[m] = SampleNet(stack, head, X[m])
                net_m = nets[m]
                pattern = net_m.stack_pattern() + [p[m].copy() for p in clean_pat]
                for (L, j), sign in reqs[m].items():
                    pattern[net_m.shift + L][j] = 1.0 if sign > 0 else 0.0
                required = [Requirement(net_m.shift + L, j, sign, kap[L]) for (L, j), sign in reqs[m].items()]
                lazy = []  # no new ExAN: where the others' terms would not cover m's, m must not start firing
                for L, (Z, terms, potential) in read.items():
                    covered = _covered(Z, alive, kap[L], terms)[m] >= opts.share * potential[m]
                    quiet = np.nonzero(~covered & (pattern[net_m.shift + L] == 0))[0]
                    lazy += [Requirement(net_m.shift + L, int(j), -1, kap[L]) for j in quiet
                             if (L, int(j)) not in reqs[m]]
                try:
                    out = solve_sample(net_m, X[m], pattern, required, lazy, settings)
                except Exception as exc:  # a solver crash leaves the sample as it was and says so
                    out = SampleOutcome(f"error:{type(exc).__name__}", X[m].copy(), message=str(exc))
                lp_secs[m] += out.lp_seconds
                lp_solves[m] += out.lp_solves
                outcomes[m] = out
                if out.ok:
                    Xp[m] = out.x
                else:
                    messages[m] = out.message or out.status
                    failed[m] = True
                    Xp[m] = X[m]
                    if opts.drop_unprotected:
                        alive[m] = False
        final = read_layers(Xp)
        left = counts(final, alive)
        if opts.drop_unprotected:
            # batch composition: what still carries ExANs after the rounds is not sent
            for m in np.nonzero(alive & (left > opts.max_exans).any(0))[0]:
                alive[m] = False
                messages[m] = messages[m] or f"still {left[:, m].sum()} ExAN(s) after {opts.rounds} rounds"
            for _ in range(M):  # dropping can expose partners; repeat until stable
                left = counts(final, alive)
                bad = alive & (left > opts.max_exans).any(0)
                if not bad.any():
                    break
                alive[bad] = False
        after, unprotected = left.sum(0), (left > opts.max_exans).any(0)
    kept = np.nonzero(alive)[0]
    out_x = torch.from_numpy(np.clip(Xp[kept], lo, hi)).to(inputs.dtype).reshape(len(kept), *inputs.shape[1:])
    samples = []
    for m in range(M):
        diff = Xp[m] - X[m]
        if not alive[m]:
            status = "dropped"
        elif unprotected[m]:
            status = "unprotected"
        elif reqs[m] and np.abs(diff).max() > 0:
            status = "reduced"
        else:
            status = "clean"
        samples.append(ReducedSample(
            index=m, status=status, exans_before=int(before[m]), exans_after=int(after[m]) if alive[m] else 0,
            linf=float(np.abs(diff).max()), l2=float(np.linalg.norm(diff)),
            psnr=sample_psnr(Xp[m], X[m], hi - lo),
            lp_seconds=float(lp_secs[m]), lp_solves=int(lp_solves[m]), message=messages[m],
        ))
    return ReductionResult(out_x, labels[torch.from_numpy(kept)], kept, tuple(samples), opts,
                           time.perf_counter() - start, data_range, kap[H])


@register_defense
@dataclass(frozen=True)
class ExclusivityReduction(BatchDefense):
    """Exclusivity reduction (Pan et al. 2022, "Exploring the Security Boundary of Data Reconstruction via Neuron
    Exclusivity Analysis"; algorithms spec §3) as the batch defense ``exclusivity-reduction``:
    ``ExclusivityReduction(**knobs)(model, x, y) -> (x', y')`` runs :func:`reduce_exclusivity`.

    The fields are the user-facing knobs of :class:`ReductionOptions` (``max_exans``, ``margin``, ``budget``,
    ``rounds``, ``drop_unprotected``, ``data_range``, ``share``, with its meanings and defaults); the others (``norm``,
    ``solver``, ``time_limit``, ``polish``, ``polish_slack``) keep ReductionOptions's defaults. Bad values fail at
    construction with :class:`~fedleak.errors.OptionError`. The transform may return fewer samples than it was
    given (``drop_unprotected``). Soft labels (after MixUp, say) are kept: the ExAN analysis uses their most
    probable class, and the kept rows are returned.

    ``last_result`` (not a field: it is not a parameter, and it is set on the frozen instance with
    ``object.__setattr__``) keeps the client-side :class:`ReductionResult` of the last batch this instance
    transformed, None before the first. :meth:`~fedleak.defenses.DefenseStack.bind` returns a copy when it fills
    ``data_range`` (and, for normalised data, ``normalization``): read ``last_result`` on the instance that ran.
    """

    name: ClassVar[str] = "exclusivity-reduction"
    summary: ClassVar[str] = ("the client perturbs (or drops) samples so that no neuron of the first or the last ReLU "
                              "layer is exclusive")
    source: ClassVar[str] = "Pan et al. 2022 (exclusivity analysis), reversed as a client-side LP defense"
    strengths: ClassVar[tuple[Mapping[str, object], ...]] = ({"max_exans": 1}, {"max_exans": 0})
    last_result: ClassVar[ReductionResult | None] = None  # per instance once set, see the docstring

    max_exans: int = 0
    margin: float = 0.01
    budget: float | None = None
    rounds: int = 16
    drop_unprotected: bool = True
    data_range: tuple[float, float] | None = None
    share: float = 0.01
    normalization: Normalization | None = None

    def check(self) -> None:
        options = self.options  # ReductionOptions validates every value
        object.__setattr__(self, "data_range", options.data_range)

    @property
    def options(self) -> ReductionOptions:
        """The :class:`ReductionOptions` this defense runs with."""
        try:
            return ReductionOptions(max_exans=self.max_exans, margin=self.margin, budget=self.budget,
                                    rounds=self.rounds, drop_unprotected=self.drop_unprotected,
                                    data_range=self.data_range, share=self.share, normalization=self.normalization)
        except SolverError as exc:
            raise OptionError(f"defense '{self.name}': {exc}") from None

    def __call__(self, model: nn.Module, inputs: torch.Tensor,
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # a client that trains in training mode perturbs its batch for the eval-mode network, which the exact attack
        # reads (its Dropout the identity, its BatchNorm on the running statistics)
        with client_mode(model, "eval"):
            result = reduce_exclusivity(model, inputs, hard_labels(labels), self.options)
        object.__setattr__(self, "last_result", result)
        if is_soft(labels):
            return result.inputs, labels[torch.from_numpy(result.kept)]
        return result.inputs, result.labels
