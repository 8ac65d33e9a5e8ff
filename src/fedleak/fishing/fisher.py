"""``fedleak.fish``: perturb a batch so that every sample becomes exactly reconstructable (spec §4).

The curious server's client code calls this on each local batch before the update is computed. One loop
serves MLPs and CNNs (an MLP is a network without conv blocks):

* **targets** are chosen on the fully connected head, from the batch's real features (the flattened input
  of the first Linear layer; the input itself for an MLP): :func:`~fedleak.fishing.targets.choose_targets`;
* **one LP per sample** on its linearised network (:class:`~fedleak.fishing.sample_net.SampleNet`: conv
  layers first, then the head's hidden layers), :func:`~fedleak.fishing.lp.solve_sample`: the sample's own
  targets on, the other samples' targets off, the conv region kept where the forward pass shows it
  matters, and the units of the lower conv blocks kept clear of zero so the attack can still prove those
  blocks (see :meth:`Fisher.solvability`);
* **repairs**: samples whose LP fails are left unperturbed, and other samples' targets that such a sample
  activates are re-chosen.

The perturbed batch is checked by a float32 forward pass, the precision the client computes in.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from fedleak.analysis.batch import Batch, predictions, read_batch
from fedleak.analysis.exclusivity import batch_exclusivity
from fedleak.autograd_mode import with_autograd
from fedleak.errors import FedleakError
from fedleak.fishing.clearance import clearances
from fedleak.fishing.head_arrays import HeadArrays
from fedleak.fishing.kappa import kappa_at
from fedleak.fishing.lp import Requirement, SampleOutcome, single_threaded_blas
from fedleak.fishing.perturb import FishingOptions, FishingResult, resolve_data_range, sample_records
from fedleak.fishing.pool import parallel_map, resolve_workers
from fedleak.fishing.sample_lp import RequirementTable, solve_sample
from fedleak.fishing.sample_net import ConvStack, SampleNet
from fedleak.fishing.solvers import solves_in_process
from fedleak.fishing.targets import choose_targets, retarget
from fedleak.fishing.through_map import first_layer_batch, in_pixels, normalised_back
from fedleak.nets import NO_HIDDEN_RELU
from fedleak.nets.cast import unchanged
from fedleak.nets.forward import SATURATED_SAMPLE

CLEAR_FRACTION = 0.2  # units of lower conv blocks stay at least margin*CLEAR_FRACTION away from zero, or more
# where the attack's propagated error needs it (:mod:`fedleak.fishing.clearance`)
CLEAR_WATCH = 0.5  # ... watched when their clean pre-activation is within this of zero


class Fisher:
    """The batch loop: targets on the head, one LP per sample on its :class:`SampleNet`, then repairs."""

    def __init__(self, stack: ConvStack, head: HeadArrays, X: np.ndarray, y: np.ndarray, opts: FishingOptions,
                 data_range: tuple[float, float], saturated: np.ndarray | None = None):
        self.stack, self.head, self.X, self.y = stack, head, X, y
        self.M = X.shape[0]
        # samples classified with probability 1 (:attr:`fedleak.ExclusivityReport.saturated`): no ExAN makes them
        # readable, so they own no targets and only stay off the others'
        self.saturated = np.zeros(self.M, dtype=bool) if saturated is None else saturated
        self.k = [opts.targets_other] * (head.depth - 1) + [opts.targets_last]
        self.nets = [SampleNet(stack, head, X[m]) for m in range(self.M)]
        self.features = stack.features(X)  # the head inputs of the clean batch
        self.clean = head.preacts(self.features)  # one pass over the head for the whole batch, not one per sample
        # the margin in the layer's own units (``opts.margin`` is a fraction of its scale), everywhere below
        self.o = opts = replace(opts, margin=kappa_at(self.clean[-1], opts.margin))
        self.settings = opts.lp_settings(data_range)
        for m, net in enumerate(self.nets):
            net.clean_head = [z[m] for z in self.clean]
        self.clear = clearances(stack.net, self.features, opts.margin * CLEAR_FRACTION)  # (M, lower blocks)
        self.Xp = X.copy()
        self.fixed = np.zeros(self.M, dtype=bool)  # sent unperturbed
        self.owner = np.ones(self.M, dtype=bool)  # may own targets
        self.aside = np.zeros(self.M, dtype=bool)  # owns nothing, moved only to stay off the others' targets
        self.why: list[tuple[str, str]] = [("", "")] * self.M  # why a sample stopped owning targets
        self.outcomes: list[SampleOutcome | None] = [None] * self.M
        self.targets: list[list[np.ndarray]] = []  # per sample, per head layer
        self.patterns: list[list[np.ndarray]] = []  # per sample, per head layer
        self.status = ["pending"] * self.M
        self.messages = [""] * self.M

    def head_preacts(self, X: np.ndarray, f32: bool = False) -> list[np.ndarray]:
        """Pre-activations of the head's hidden layers for a batch of flat inputs."""
        return self.head.preacts(self.stack.features(X, f32), f32=f32)

    # --- requirements of one sample given everyone's targets ---------------------------------------------
    def requirements(self, m: int) -> tuple[list[Requirement], RequirementTable]:
        kap, s = self.o.margin, self.nets[m].shift
        own = [Requirement(s + h, int(j), +1, kap) for h, T in enumerate(self.targets[m]) for j in T if j >= 0]
        lazy = [
            Requirement(s + h, int(j), -1, kap)
            for n in range(self.M) if n != m and not self.fixed[n]
            for h, T in enumerate(self.targets[n]) for j in T if j >= 0
        ]
        return own, RequirementTable.of(lazy, self.solvability(m))

    def solvability(self, m: int) -> RequirementTable:
        """Rows that keep the lower conv blocks provably invertible: the attack solves a block from the
        units of its output that are active *beyond the error propagated from the block above*, and all
        units it uses must be proven active. A unit barely above zero breaks that proof, so every unit of
        a lower block (a max-pooled block: every window max) must stay clear of zero on its current side, by
        a multiple of the error the attack will propagate into the block and at least ``margin * CLEAR_FRACTION``
        (:func:`~fedleak.fishing.clearance.clearances`; lazy rows: written only near zero or when a forward pass
        shows a violation)."""
        net = self.nets[m]
        parts = []
        for i in range(len(self.stack.blocks) - 1):
            z = net.clean[i]
            near = np.nonzero((np.abs(z) < CLEAR_WATCH) & net.watched(net.conv_layer[i]))[0]
            parts.append(RequirementTable.units(net.conv_layer[i], near, np.where(z[near] > 0, 1, -1),
                                                 float(self.clear[m, i])))
        return RequirementTable.of(*parts)

    def solve(self, m: int) -> SampleOutcome:
        if any((T < 0).any() for T in self.targets[m]):
            return SampleOutcome("no_target", self.X[m].copy(), message="no neuron left that this sample could own")
        own, lazy = self.requirements(m)
        net = self.nets[m]
        pattern = net.stack_pattern() + list(self.patterns[m])
        try:
            return solve_sample(net, self.X[m], pattern, own, lazy, self.settings)
        except Exception as exc:  # a solver crash must not take the batch down; the sample stays clean
            return SampleOutcome(f"error:{type(exc).__name__}", self.X[m].copy(), message=str(exc))

    def solve_many(self, ms: list[int]) -> None:
        workers = resolve_workers(self.o.workers) if solves_in_process(self.o.solver) else 1
        results = parallel_map(self.solve, ms, workers)
        for m, out in zip(ms, results):
            prev = self.outcomes[m]
            if prev is not None:  # accumulate LP effort over repairs
                out.lp_solves += prev.lp_solves
                out.lp_seconds += prev.lp_seconds
            self.outcomes[m] = out
            self.Xp[m] = out.x
            if self.owner[m]:
                self.status[m] = "fished" if out.ok else out.status
                self.messages[m] = out.message
            else:
                self.aside[m] = out.ok
                self.status[m], message = self.why[m]
                if not out.ok:
                    tail = f"; it could not stay off the other samples' targets either ({out.message or out.status})"
                elif np.array_equal(out.x, self.X[m]):
                    tail = "; it already stays off the other samples' targets and is sent as it is"
                else:
                    tail = "; moved only to keep the other samples' target neurons off"
                self.messages[m] = message + tail

    def others_state(self, m: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """The other samples' current head pre-activations and, per layer, the neurons they already target."""
        others = [n for n in range(self.M) if n != m]
        zs = self.head_preacts(self.Xp[others]) if others else [np.zeros((0, w)) for w in self.head.widths]
        used = []
        for h, w in enumerate(self.head.widths):
            u = np.zeros(w, dtype=bool)
            for n in others:
                if not self.fixed[n]:
                    t = self.targets[n][h]
                    u[t[t >= 0]] = True
            used.append(u)
        return zs, used

    def retarget(self, m: int, banned: list[set[int]] | None = None) -> None:
        zs, used = self.others_state(m)
        f = self.stack.features(self.X[m][None, :])[0]
        T, P = retarget(self.head, f, int(self.y[m]), zs, used, self.k, self.o.margin, gamma=self.o.gamma,
                        banned=banned)
        self.targets[m] = T
        self.patterns[m] = P

    def freeze(self, m: int) -> None:
        self.fixed[m] = True
        self.Xp[m] = self.X[m]

    def give_up(self, m: int) -> None:
        """``m`` owns nothing from now on; its targets go back to their clean side."""
        self.owner[m] = False
        self.why[m] = (self.status[m], self.messages[m])
        z = self.head_preacts(self.X[m][None, :])
        for h, T in enumerate(self.targets[m]):
            T = T[T >= 0]
            self.patterns[m][h] = self.patterns[m][h].copy()
            self.patterns[m][h][T] = (z[h][0, T] > 0).astype(np.float64)
        self.targets[m] = [np.zeros(0, dtype=np.int64) for _ in self.targets[m]]

    def failed(self) -> list[int]:
        """Movable samples whose LP failed: owners not fished, and samples that could not stand aside."""
        return [m for m in range(self.M) if not self.fixed[m]
                and (self.status[m] != "fished" if self.owner[m] else not self.aside[m])]

    def assign(self) -> None:
        """Choose every sample's targets jointly and solve the LPs from the clean batch."""
        asg = choose_targets(self.head, self.features, self.y, self.k, self.o.margin,
                             gamma=self.o.gamma, burden=self.o.burden, norm=self.o.norm, preacts=self.clean)
        self.targets = [[T[m] for T in asg.targets] for m in range(self.M)]
        self.patterns = [[P[m] for P in asg.patterns] for m in range(self.M)]
        for m in np.nonzero(self.saturated)[0]:
            self.status[m], self.messages[m] = "saturated", f"{SATURATED_SAMPLE}, whatever exclusive neurons it gets"
            self.give_up(m)
        self.solve_many(list(range(self.M)))

    def repair(self) -> bool:
        """One round of repairs; False when nothing failed. A failed owner gets one retry with fresh targets
        (neurons every other sample is already well below), then gives its targets up and only stays off the
        others' (*stands aside*), so that its failure costs no other sample its targets. A sample that owns
        nothing and still cannot stay off the targets (within the budget) gets relief: owners whose targets it
        fires on most give theirs up (:meth:`relieve`). Targets are never re-chosen for samples that hold them,
        so a round only ever removes rows from the LPs it re-solves."""
        failed = self.failed()
        if not failed:
            return False
        retry = []
        for m in failed:
            if self.owner[m] and not self.outcomes[m].extra.get("retried"):
                banned = [set(int(j) for j in T if j >= 0) for T in self.targets[m]]
                self.retarget(m, banned)
                if all((T >= 0).all() for T in self.targets[m]):
                    retry.append(m)
        self.solve_many(retry)
        for m in retry:
            self.outcomes[m].extra["retried"] = True
        todo, stuck = [], []
        for m in self.failed():
            if self.owner[m]:
                self.give_up(m)
                todo.append(m)
            else:
                stuck.append(m)
        if stuck:
            todo += stuck + self.relieve(stuck)
        self.solve_many(sorted(set(todo)))
        return True

    def relieve(self, stuck: list[int]) -> list[int]:
        """For each ``stuck`` sample, the owner whose targets it fires on most gives its targets up; returns
        them. With no owner left, the stuck samples are sent unperturbed."""
        owners = np.nonzero(self.owner & ~self.fixed)[0]
        if len(owners) == 0:
            for m in stuck:
                self.freeze(m)
            return []
        Z = self.head_preacts(self.X[stuck])
        need = self.o.gamma * self.o.margin
        load = np.zeros((len(stuck), len(owners)))  # the push-down each stuck sample owes each owner
        for k, m in enumerate(owners):
            for h, T in enumerate(self.targets[m]):
                load[:, k] += (np.maximum(Z[h][:, T[T >= 0]] + need, 0.0) ** 2).sum(1)
        relieved: list[int] = []
        for row in load:
            row = row.copy()
            row[[k for k, m in enumerate(owners) if m in relieved]] = -1.0
            k = int(np.argmax(row))
            if row[k] > 0:
                relieved.append(int(owners[k]))
        for m in relieved:
            self.status[m] = "budget"
            self.messages[m] = ("gave its targets up so that samples that own nothing can stay off them within the "
                                "budget")
            self.give_up(m)
        return relieved

    def run(self) -> None:
        """Choose the targets, solve every sample's LP, then repair the failures (:meth:`repair`, at most
        ``repair_rounds`` rounds); a sample still failing then is sent unperturbed, and owners whose targets it
        fires on are marked blocked."""
        self.assign()
        for _ in range(self.o.repair_rounds):
            if not self.repair():
                break
        for m in self.failed():
            self.freeze(m)
        self.mark_blocked()

    def mark_blocked(self) -> None:
        """Owners one of whose targets a sample sent unperturbed fires on (float32) are not exclusive: say so."""
        if not self.fixed.any():
            return
        Z = self.head_preacts(self.X[self.fixed].astype(np.float32), f32=True)
        cf = self.o.check_fraction * self.o.margin
        for m in range(self.M):
            hit = any((Z[h][:, T[T >= 0]] > -cf).any() for h, T in enumerate(self.targets[m]))
            if self.status[m] == "fished" and hit:
                self.status[m] = "blocked"
                self.messages[m] = "a sample sent unperturbed fires on one of its target neurons"


@with_autograd
def fish(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None, **options) -> FishingResult:
    """Perturb ``inputs`` (a batch, M x ...) so that every sample can be rebuilt exactly from the update.

    ``model`` is any ``nn.Module`` :func:`fedleak.nets.as_network` reads (MLP or CNN; its input shape comes
    from ``inputs``). Options are the fields of :class:`FishingOptions`. ``labels`` default to the model's
    predictions (they decide which neurons carry a backward signal). Returns a :class:`FishingResult` whose
    ``inputs`` is the perturbed batch (same shape and dtype, on the CPU, inside ``data_range``); samples
    whose LP failed are unchanged and say why. Works for any depth, with or without biases; conv blocks
    may pool by max, by average or not at all. A model that normalises its input inside ``forward`` (one number,
    per channel or per value) is fished through that map, in its own inputs (:mod:`fedleak.fishing.through_map`).
    """
    start = time.perf_counter()
    opts = options.pop("options", None) or FishingOptions.from_kwargs(**options)
    # many small products: a threaded BLAS only spins (far worse on a busy machine); the model is read, never
    # changed, so its float64 copies are checked for changes once
    with single_threaded_blas(), unchanged():
        norm = opts.normalization
        if norm is None:
            return fish_batch(model, inputs, labels, opts, start)
        inner = replace(opts, normalization=None, data_range=opts.data_range or norm.pixel_range)
        result, pixels = in_pixels(model, inputs, norm, lambda reading, x: fish_batch(reading, x, labels, inner, start))
        return replace(result, inputs=normalised_back(result.inputs, pixels, inputs, norm), options=opts)


def _undetermined(net, report, k: int) -> str:
    """Why sample ``k``, its head's targets met, is still not certifiable: the first conv block whose output does
    not determine its input for it (fishing moves the head's neurons, not a block's active units)."""
    for blk, layer in zip(net.blocks, report.conv_layers):
        if not layer.solvable[k]:
            return (f"its head's targets are met, but conv layer '{blk.name}' is not proven to determine its input "
                    f"({int(layer.active_units[k])} active outputs, the equations, for {blk.in_dim} unknowns); "
                    "fishing moves the head's neurons, not a conv layer's (more channels in that layer give it more "
                    "equations: fedleak.plan(model))")
    return ""


def fish_batch(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None, opts: FishingOptions,
               start: float) -> FishingResult:
    """:func:`fish` with its options read (``start``: when the call began, for the result's time)."""
    first = first_layer_batch(model, inputs)  # a normalisation inside forward is read, and fished through
    inputs = first.inputs
    batch = read_batch(first.model, first.first, labels)
    net = batch.net
    if net.head.depth == 0:
        raise FedleakError(f"fishing: {NO_HIDDEN_RELU}")
    if opts.solve_check and net.uncertifiable:  # no perturbation can give a block the equations it lacks
        raise FedleakError(f"fishing cannot make any sample of this model certifiable: {net.uncertifiable}; "
                           "fedleak.plan(model) shows which changes would give enough (fewer pooling layers, more "
                           "channels); solve_check=False fishes the dense head's condition alone (the images are "
                           "then rebuilt uncertified)")
    data_range = resolve_data_range(inputs, opts.data_range, "fishing")
    M = batch.size
    certified = (lambda r: r.certifiable) if opts.solve_check else (lambda r: r.head_certifiable)
    min_other = min(1, opts.targets_other)
    # the condition fishing sets, on the batch as sent (the attack's peeling may certify more)
    before = batch_exclusivity(batch, min_last=opts.targets_last, min_other=min_other, solve=opts.solve_check,
                               peel=False)
    X = inputs.detach().reshape(M, -1).to(torch.float64).cpu().numpy().copy()
    fisher = Fisher(*first.arrays(net), X, batch.labels.numpy(), opts, data_range, before.saturated)
    fisher.run()
    lo, hi = data_range
    Xp = np.clip(fisher.Xp, lo, hi)
    out = torch.from_numpy(Xp).to(inputs.dtype).reshape(inputs.shape).clamp(lo, hi)
    sent = Batch(net, first.first_layer(out).reshape(M, *net.input_shape).to(device=net.device, dtype=batch.dtype),
                 batch.labels)
    after = batch_exclusivity(sent, min_last=opts.targets_last, min_other=min_other, solve=opts.solve_check,
                              peel=False)
    samples = sample_records(fisher, X, Xp, out, certified(before), certified(after), predictions(net, batch.x),
                             predictions(net, sent.x), peak=hi - lo)
    if opts.solve_check and net.blocks:  # the head's targets met, a conv block still short of equations
        samples = tuple(replace(s, message=_undetermined(net, after, s.index)) if s.status == "fished"
                        and not s.certifiable_after and not s.message else s for s in samples)
    return FishingResult(out, batch.labels, samples, opts, time.perf_counter() - start, data_range, fisher.o.margin)
