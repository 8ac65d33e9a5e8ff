"""One sample's LP: its requirements, rows written lazily, the region it walks through, the forward check.

:func:`solve_sample` perturbs one input so that a set of sign requirements (:class:`~fedleak.fishing.lp.Requirement`)
hold in the real network, in float64 *and* float32. The rows are exact only inside an activation *region* of the
lower layers (the ``pattern``), so every LP solution is checked by a forward pass:

* a requirement the LP did not hold (not yet written) is written and the LP re-solved from its last basis
  (lazy rows);
* a written row that fails means the solution left the region below it. For the first ``walk_rounds`` rounds
  the region *moves*: lower units that changed side keep their new side (unless a requirement pins them) and
  every row is rewritten in the new region; this is how a sample reaches a neuron of layer 2 through layer
  1's region. After that, units that change side are *held* on their side of the region (by
  ``region_margin``, so that no unit is left at zero, where float32 and float64 may disagree on its sign),
  which converges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import numpy as np

from fedleak.fishing.lp import POLISH_SLACK, LPSettings, RadiusLP, Requirement, SampleOutcome
from fedleak.fishing.sample_net import SampleNet


def _key(r: Requirement) -> tuple[int, int]:
    return (r.layer, r.neuron)


class RequirementTable:
    """Requirements as one array (a row ``layer, neuron, sign, margin`` each), for the vectorised checks of every
    LP round: a few thousand per sample on a CNN (the lower conv units kept clear of zero), checked after every
    solve. :class:`~fedleak.fishing.lp.Requirement` objects are made only for the rows read."""

    def __init__(self, fields: np.ndarray | None = None):
        self.fields = np.zeros((0, 4)) if fields is None else fields

    @classmethod
    def of(cls, *parts: Iterable[Requirement] | RequirementTable) -> RequirementTable:
        """The requirements of every part, in order (lists of requirements or tables)."""
        return cls(np.concatenate([p.fields if isinstance(p, RequirementTable) else cls.table(list(p))
                                   for p in parts] or [np.zeros((0, 4))]))

    @classmethod
    def units(cls, layer: int, neurons: np.ndarray, signs: np.ndarray, margin: float) -> RequirementTable:
        """``signs[i] * z[layer][neurons[i]] >= margin`` for every ``i``."""
        return cls(np.column_stack([np.full(len(neurons), layer), neurons, signs, np.full(len(neurons), margin)])
                   .astype(np.float64).reshape(-1, 4))

    @staticmethod
    def table(reqs: list[Requirement]) -> np.ndarray:
        return np.array([(r.layer, r.neuron, r.sign, r.margin) for r in reqs], dtype=np.float64).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.fields)

    def __getitem__(self, i: int) -> Requirement:
        layer, neuron, sign, margin = self.fields[i]
        return Requirement(int(layer), int(neuron), int(sign), float(margin))

    def __iter__(self) -> Iterator[Requirement]:
        return (self[i] for i in range(len(self.fields)))

    def extend(self, reqs: list[Requirement]) -> None:
        self.fields = np.concatenate([self.fields, self.table(reqs)])

    def levels(self, layer: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
        """The neurons of ``layer`` that requirements name and the levels :meth:`short` compares their
        pre-activations with (``sign * fraction * margin``)."""
        f = self.fields[self.fields[:, 0] == layer]
        return f[:, 1].astype(np.int64), f[:, 2] * (fraction * f[:, 3])

    def short(self, zs: list[list[np.ndarray]], fraction: float, start: int = 0) -> list[Requirement]:
        """The requirements (from the ``start``-th on) with ``min_z sign * z[layer][neuron] < fraction * margin``
        over the pre-activations ``zs`` (e.g. the float64 and float32 passes), in order; one vectorised pass
        per layer."""
        fields = self.fields[start:]
        layer, neuron, sign = fields[:, 0].astype(np.int64), fields[:, 1].astype(np.int64), fields[:, 2]
        need = fraction * fields[:, 3]
        short = np.zeros(len(fields), dtype=bool)
        for h in np.unique(layer):
            at = layer == h
            v = np.min([sign[at] * np.asarray(z[h], dtype=np.float64)[neuron[at]] for z in zs], axis=0)
            short[at] = v < need[at]
        return [self[start + i] for i in np.nonzero(short)[0]]


HOLD_FLOOR = 1e-5  # a held unit's least margin, relative to its layer's largest pre-activation at the sample,
HOLD_FLOOR_LP = 10 * POLISH_SLACK  # and in the row's own units: ten times what the L1 polish may fall short of it


class SampleLP:
    """The rows of one sample's LP, in the region ``pattern``; rebuilt when the region moves."""

    def __init__(self, net: SampleNet, x: np.ndarray, pattern: list[np.ndarray], settings: LPSettings):
        self.net, self.x, self.s = net, x, settings
        self.pattern = [p.copy() for p in pattern]
        # how far clear of zero a held unit is kept at least: beyond the solver's tolerance on its row and the
        # client's float32 rounding of it, a fraction of its layer's largest value at the sample (the gaps of a
        # max-pooled layer over a flat patch of image: 0.025 at most, so 2.5e-7, which the polish took back)
        self.floor = [max(HOLD_FLOOR * float(np.abs(z).max(initial=0.0)), HOLD_FLOOR_LP)
                      for z in net.clean_preacts(x)]
        self.written: dict[tuple[int, int], Requirement] = {}  # the strongest requirement written per unit
        self.checked = RequirementTable()
        self.solves, self.lp_seconds = 0, 0.0
        self.reopen()

    def reopen(self) -> None:
        """(Re)build the LP: every written requirement's row in the current region."""
        if hasattr(self, "problem"):
            self.solves += self.problem.solves
            self.lp_seconds += self.problem.lp_seconds
        self.problem = RadiusLP(self.x, self.s)
        self.offsets = self.net.offsets(self.pattern)
        self._rows(list(self.written.values()))

    def is_written(self, r: Requirement) -> bool:
        w = self.written.get(_key(r))
        return w is not None and w.sign == r.sign and w.margin >= r.margin

    def _rows(self, reqs: list[Requirement]) -> None:
        by_layer: dict[int, list[Requirement]] = {}
        for r in reqs:
            by_layer.setdefault(r.layer, []).append(r)
        for layer, rs in by_layer.items():
            idx = np.array([r.neuron for r in rs])
            sign = np.array([r.sign for r in rs], dtype=np.float64)
            marg = np.array([r.margin for r in rs])
            J = self.net.rows(layer, idx, self.pattern)
            self.problem.add(sign[:, None] * J, marg - sign * self.offsets[layer][idx])

    def write(self, reqs: list[Requirement]) -> int:
        """Write the requirements not yet written (or written with a smaller margin); returns how many."""
        new = [r for r in reqs if not self.is_written(r)]
        moved = False
        for r in new:
            old = self.written.get(_key(r))
            if old is not None and old.sign != r.sign:  # a unit held on one side is now required on the other
                f = self.checked.fields  # drop the unit's requirements of the other sign
                other = (f[:, 0] == r.layer) & (f[:, 1] == r.neuron) & (f[:, 2] != r.sign)
                self.checked = RequirementTable(f[~other])
                moved = True  # its old row must go: rewrite them all
            self.written[_key(r)] = r
            side = 1.0 if r.sign > 0 else 0.0
            if self.pattern[r.layer][r.neuron] != side:  # a walk took it to the other side: the rows above change
                self.pattern[r.layer][r.neuron] = side
                moved = True
        if moved:
            self.reopen()
        else:
            self._rows(new)
        return len(new)

    def hold(self, layer: int, units: np.ndarray, z: np.ndarray | None = None) -> int:
        """Keep these units on their side of the region (or, given their pre-activations ``z``, on the side
        they are on), ``region_margin`` clear of zero, and at least the layer's floor: a unit held at zero itself
        comes back a rounding short of it, on the other side."""
        side = self.pattern[layer] > 0 if z is None else z > 0
        margin = max(self.s.region_margin, self.floor[layer])
        reqs = [Requirement(layer, int(j), 1 if side[j] else -1, margin)
                for j in units if (layer, int(j)) not in self.written]
        self.checked.extend(reqs)
        return self.write(reqs)

    def walk(self, layer: int, units: np.ndarray, z: np.ndarray) -> int:
        """Move the region: these units take the side they have at the point whose pre-activations at
        ``layer`` are ``z`` (units a requirement pins are left); returns how many moved. Rows are rewritten
        by :meth:`reopen`."""
        free = [int(j) for j in units if (layer, int(j)) not in self.written]
        self.pattern[layer][free] = (z[free] > 0).astype(np.float64)
        return len(free)

    def totals(self) -> tuple[int, float]:
        return self.solves + self.problem.solves, self.lp_seconds + self.problem.lp_seconds


def _least_l2(problem: RadiusLP, settings: LPSettings) -> tuple[str, float, np.ndarray | None]:
    status, xp = problem.l2()
    if status != "optimal":  # the dual did not reach the rows: the LP proves infeasibility or finds a point
        status, _, xp = problem.radius()
    return status, _linf(problem, xp), xp


def _least_l1(problem: RadiusLP, settings: LPSettings) -> tuple[str, float, np.ndarray | None]:
    status, xp = problem.l1(problem.cap)
    return status, _linf(problem, xp), xp


def _least_linf(problem: RadiusLP, settings: LPSettings) -> tuple[str, float, np.ndarray | None]:
    status, radius, xp = problem.radius()
    if status == "optimal" and settings.polish:
        polished, xpol = problem.l1(radius * (1 + settings.polish_slack) + 1e-9)
        if polished == "optimal":
            xp = xpol
    return status, radius, xp


def _linf(problem: RadiusLP, xp: np.ndarray | None) -> float:
    return float(np.abs(xp - problem.x).max()) if xp is not None else np.inf


# The point each norm asks for, given the rows written so far: (status, L-infinity radius, point or None).
POINT: dict[str, Callable[[RadiusLP, LPSettings], tuple[str, float, np.ndarray | None]]] = {
    "l2": _least_l2,
    "l1": _least_l1,
    "linf": _least_linf,
}


def solve_sample(
    net: SampleNet,
    x: np.ndarray,
    pattern: list[np.ndarray],
    required: list[Requirement],
    lazy: list[Requirement] | RequirementTable,
    settings: LPSettings,
) -> SampleOutcome:
    """Perturb ``x`` so that every requirement holds (``required`` are written up front, ``lazy`` only
    when close to violation or violated), starting in the region ``pattern`` of the lower layers.

    ``net`` is the sample's linearised network (:class:`~fedleak.fishing.sample_net.SampleNet`: its layers
    are the conv layers, if any, then the head's hidden layers). ``pattern`` is the intended activation
    pattern per layer (0/1 float arrays); it must already agree with every requirement. Returns the
    outcome with the perturbed input, or the unchanged input and the reason when the LP fails.
    """
    lp = SampleLP(net, x, pattern, settings)
    lp.checked = RequirementTable.of(required, lazy)
    z_clean = net.clean_preacts(x)
    near = lp.checked.short([z_clean], settings.screen, start=len(required))
    lp.write(list(required) + near)
    last = net.shift + net.head.depth - 1  # the head's last hidden layer
    status, xp, radius, rounds, message = "error:no round", None, 0.0, 0, ""
    met = False
    for rounds in range(1, settings.max_rounds + 1):
        status, radius, xp = POINT[settings.norm](lp.problem, settings)
        if status != "optimal" or xp is None:
            break
        xp = np.clip(xp, settings.lo, settings.hi)
        # float64 and the client's float32 pass; the float64 head's last layer only where a check reads it
        z64, z32 = net.checked_preacts(xp, *lp.checked.levels(last, settings.check_fraction),
                                       settings.check_fraction * settings.region_margin)
        new: list[Requirement] = []
        broken: set[int] = set()
        for r in lp.checked.short([z64, z32], settings.check_fraction):
            if lp.is_written(r):
                broken.add(r.layer)
            else:
                new.append(r)
        # hidden units left (by chance) so close to zero that float32 and float64 may disagree on their sign:
        # the client's update and the attack's recomputation would then differ; hold them clear of zero
        near = 0
        if not broken and settings.region_margin > 0:
            for h in range(net.shift, len(z64)):
                units = np.nonzero((np.abs(z64[h]) < settings.check_fraction * settings.region_margin)
                                   | ((z64[h] > 0) != (np.asarray(z32[h]) > 0)))[0]
                near += lp.hold(h, units, z64[h])
        if not new and not broken and not near:
            met = True
            break
        if rounds == settings.max_rounds:  # no round left to use more rows in
            status, message = "unsatisfied", f"constraints still violated after {settings.max_rounds} rounds"
            break
        # a written row that fails in the real forward pass: the solution left the region below it
        changed = 0
        if broken:
            walking = rounds <= settings.walk_rounds
            for h in range(max(broken)):
                units = net.flipped(h, z64, lp.pattern)
                changed += lp.walk(h, units, z64[h]) if walking and net.walkable(h) else lp.hold(h, units)
            if walking and changed:
                lp.reopen()
        if not new and changed == 0 and not near:
            status, message = "unsatisfied", "rows hold in the LP but not in the forward pass (float noise)"
            break
        lp.write(new)
    solves, seconds = lp.totals()
    rows = len(lp.problem.C)
    if met and settings.min_psnr is not None:
        mse = float(np.mean((xp - x) ** 2))
        quality = 10 * np.log10(settings.width**2 / mse) if mse > 0 else np.inf
        if quality < settings.min_psnr:
            status, met = "budget", False
            message = (f"the targets need a perturbation of PSNR {quality:.1f} dB, below the floor "
                       f"{settings.min_psnr:g} dB")
    if status != "optimal" or not met:
        if status == "optimal":
            status = "unsatisfied"
        msg = message or {
            "infeasible": f"no perturbation in the data range [{settings.lo:g}, {settings.hi:g}] meets the targets "
                          "in the region the LP ended in (LP infeasible)",
            "budget": f"the targets need an L-infinity perturbation above the budget {settings.budget}",
            "time_limit": f"the LP hit its time limit of {settings.time_limit} s",
        }.get(status, status)
        return SampleOutcome(status, x.copy(), np.inf if status in ("infeasible", "budget") else radius,
                             solves, seconds, rows, rounds, msg, False)
    return SampleOutcome("optimal", xp, radius, solves, seconds, rows, rounds, "", True, lp.problem.last_seconds)
