"""What an audit says in words: the verdict (what leaked, at which batch sizes, under which threat, how sure)
and "What to do", both from the audit's own measurements (:class:`AuditRow`, one per scenario and batch size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fedleak.image_metrics import PSNR_CAP
from fedleak.report.render import percent, plural, psnr_text
from fedleak.report.views import Advice, Finding, Verdict

# who attacks in each built-in scenario (a registered scenario without an entry is shown by its name)
THREATS = {"plain": "Honest server", "fished": "Fishing server"}


def threat_of(name: str, defenses: Sequence[str] = ()) -> str:
    """Who the scenario ``name`` is about: a registered scenario's entry of :data:`THREATS` (else its name), or
    the defended client for a defense scenario (one of ``defenses``, named by its stack's label)."""
    return f"Client with {name}" if name in defenses else THREATS.get(name, name)
SAFE_FRACTION = 0.01  # a batch size "stays outside the exact route" below this certifiable fraction


@dataclass(frozen=True)
class AuditRow:
    """One scenario at one batch size, summed over its trials."""

    batch_size: int
    trials: int
    total: int  # samples drawn: batch size x trials
    sent: int  # samples the client's updates cover
    certifiable: int | None  # None: not counted (the exclusivity analysis does not read the model)
    recovered: int  # certified, and verified equal to the sample sent (label too)
    uncertified: int  # rebuilt and matched, without a certificate
    uncertified_exact: int  # of those, within the exactness tolerance of their original
    uncertified_psnr: float | None
    missing: int  # sent, but nothing rebuilt for them
    false_certificates: int
    label_accuracy: float | None
    perturbation_psnr: float | None  # what was sent vs the client's data
    attack_ms: float | None
    transform_ms: float | None

    @property
    def withheld(self) -> int:
        return self.total - self.sent

    @property
    def recovered_fraction(self) -> float:
        return self.recovered / self.total

    @property
    def certifiable_fraction(self) -> float | None:
        return None if self.certifiable is None else self.certifiable / self.total

    @property
    def state(self) -> str:
        """"withheld" (nothing sent), "full" (every sample recovered), "partial" or "none"."""
        if self.sent == 0:
            return "withheld"
        return "full" if self.recovered == self.total else ("partial" if self.recovered else "none")


@dataclass(frozen=True)
class ScenarioRows:
    name: str
    threat: str
    rows: tuple[AuditRow, ...]
    defense: bool = False  # a client defense (fedleak.defenses), not a registered scenario

    def having(self, *states: str) -> list[AuditRow]:
        return [r for r in self.rows if r.state in states]

    @property
    def leaks(self) -> bool:
        return any(r.recovered for r in self.rows)


def sizes_text(rows: Sequence[AuditRow], audited: Sequence[int]) -> str:
    """Batch sizes as "1–8" (a run of consecutive audited sizes) or "1, 4 and 16"."""
    index = {size: k for k, size in enumerate(audited)}
    runs: list[list[int]] = []
    for size in sorted(r.batch_size for r in rows):
        if runs and index[size] == index[runs[-1][-1]] + 1:
            runs[-1].append(size)
        else:
            runs.append([size])
    parts = [p for run in runs for p in ([f"{run[0]}–{run[-1]}"] if len(run) > 2 else [str(v) for v in run])]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _share(r: AuditRow, count: int | None = None) -> str:
    count = r.recovered if count is None else count
    return f"{percent(count / r.total)} ({count} of {r.total})"


def _perturbation(sc: ScenarioRows, audited: list[int]) -> str:
    rows = [r for r in sc.rows if r.sent and r.perturbation_psnr is not None]
    changed = [r for r in rows if r.perturbation_psnr < PSNR_CAP]
    same = [r for r in rows if r.perturbation_psnr >= PSNR_CAP]
    if not changed:
        return ""
    items = [f"{psnr_text(r.perturbation_psnr)} dB at batch {r.batch_size}" if k == 0 else
             f"{psnr_text(r.perturbation_psnr)} dB at {r.batch_size}" for k, r in enumerate(changed[:6])]
    text = ", ".join(items) + " PSNR from the client's data"
    if same:
        text += f" (unchanged at {sizes_text(same, audited)})"
    return text


def _withheld(sc: ScenarioRows, audited: list[int]) -> str:
    whole = sc.having("withheld")
    some = [r for r in sc.rows if r.sent and r.withheld]
    parts = ([f"whole batches of {sizes_text(whole, audited)} (no update sent)"] if whole else [])
    parts += [f"{r.withheld} of {r.total} at batch {r.batch_size}" for r in some]
    return ("The client withheld " + "; ".join(parts) + ".") if parts else ""


def finding(sc: ScenarioRows, audited: list[int]) -> Finding:
    """One verdict line: what the server certifies at which batch sizes, what it only estimates, what the
    client withheld and (for a transformed batch) how far what was sent is from the client's data."""
    full, partial, none = sc.having("full"), sc.having("partial"), sc.having("none")
    parts = []
    if full:
        parts.append(f"rebuilds and certifies every sample of batches of {sizes_text(full, audited)}")
    if len(partial) == 1:
        parts.append(f"certifies {_share(partial[0])} of the batch of {partial[0].batch_size}")
    elif partial:
        a, b = partial[0], partial[-1]
        parts.append(f"certifies part of batches of {sizes_text(partial, audited)}: from {_share(a)} at "
                     f"{a.batch_size} to {_share(b)} at {b.batch_size}")
    if none:
        sent = sum(r.sent for r in none)
        parts.append(f"certifies nothing of the {plural(sent, 'sample')} sent at batches of "
                     f"{sizes_text(none, audited)}")
    text = ("The server " + "; ".join(parts) + ".") if parts else "The client sent nothing."
    estimated = [r for r in sc.rows if r.uncertified]
    if estimated:
        top = max(estimated, key=lambda r: r.uncertified)
        text += (f" Without a certificate it also rebuilds {plural(top.uncertified, 'sample')} at batch "
                 f"{top.batch_size} ({top.uncertified_exact} in fact exact): estimates it cannot check.")
    perturbation = _perturbation(sc, audited)
    if perturbation:
        text += (" What it rebuilds is what the client sent after its transform: " if sc.leaks else
                 " Cost to the client: what it sent is ") + perturbation + "."
    text += (" " + _withheld(sc, audited)) if _withheld(sc, audited) else ""
    if sc.leaks:
        return Finding(sc.threat, text, "certified", "bad")
    if estimated:
        return Finding(sc.threat, text, "estimated, uncertified", "warn")
    return Finding(sc.threat, text, "nothing rebuilt" if any(r.sent for r in sc.rows) else "nothing sent", "good")


def verdict(stories: Sequence[ScenarioRows], false_certificates: Sequence[str], model: str) -> Verdict:
    """The verdict; ``model`` is a phrase such as "at width 1024" or "with your model"."""
    audited = sorted({r.batch_size for sc in stories for r in sc.rows})
    findings = tuple(finding(sc, audited) for sc in stories)
    alarm = (f"{len(false_certificates)} FALSE CERTIFICATE(S): certified samples that are not samples of the batch "
             "(listed under “False certificates”).") if false_certificates else ""
    leaking = [sc for sc in stories if sc.leaks]
    if not leaking:
        estimated = any(r.uncertified for sc in stories for r in sc.rows)
        headline = (f"No sample was certified {model} in any audited batch"
                    + (" — the server only has uncertified estimates." if estimated else "."))
        return Verdict(headline, findings, "warn" if estimated else "good", alarm)
    sc = leaking[0]
    full, partial = sc.having("full"), sc.having("partial")
    own = [r.batch_size for r in sc.rows]
    bits = []
    if full:
        prefix = own[: len(full)] == [r.batch_size for r in full]
        which = f"up to {full[-1].batch_size}" if prefix else f"of {sizes_text(full, audited)}"
        bits.append(f"every sample of batches {which}")
    if partial:
        last = partial[-1]
        bits.append(f"part of each batch up to {last.batch_size} "
                    f"({percent(last.recovered_fraction)} at {last.batch_size})")
    headline = f"Leaks {model}: {sc.threat.lower()} rebuilds, with a certificate, " + " and ".join(bits) + "."
    return Verdict(headline, findings, "bad", alarm)


def _uncounted(plain: ScenarioRows, model: str) -> str:
    """The batch-size advice where the ExAN condition was not counted (a model the exclusivity analysis does not
    read): what the attack certified, which proves no batch size safe."""
    rows = [r for r in plain.rows if r.sent and r.certifiable is None]
    if not rows:
        return ""
    text = (f"The ExAN condition was not counted {model} (the exclusivity analysis does not read it), so no batch "
            "size is shown to stay outside the exact route. ")
    leaked = [r for r in rows if r.recovered]
    if leaked:
        return text + "The attack certified " + "; ".join(
            f"{_share(r, r.recovered)} at batch {r.batch_size}" for r in leaked) + "."
    return text + ("The attack certified none at the audited batch sizes: a measurement of this attack, not a "
                   "proof that nothing leaks.")


def advice(stories: Sequence[ScenarioRows], model: str) -> tuple[Advice, ...]:
    """What to do, from the audit's own measurements: the batch size from which the exact route stops at this
    model, the measured defense and its cost (or that it was not measured), and what fishing means for both."""
    by = {sc.name: sc for sc in stories}
    out = []
    plain = by.get("plain")
    if plain is not None:
        sent = [r for r in plain.rows if r.sent and r.certifiable is not None]  # where the condition was counted
        safe = next((r for r in sent if r.certifiable_fraction < SAFE_FRACTION), None)
        if sent and safe is sent[0] and all(r.certifiable_fraction < SAFE_FRACTION for r in sent):
            # the exact route never applied: no batch size to advise; say what the estimates show instead
            est = [f"{psnr_text(r.uncertified_psnr)} dB at batch {r.batch_size}" for r in sent
                   if r.uncertified and psnr_text(r.uncertified_psnr)]
            text = (f"The exact route certified nothing {model} at any audited batch size (fewer than 1% "
                    "certifiable, even alone): batch size is not what protects these samples.")
            if est:
                text += (" What an optimisation attack rebuilt without a certificate is estimated at "
                         + ", ".join(est) + " PSNR from the originals: look at the images below to judge it.")
        elif safe is not None:
            later = [r for r in sent if r.batch_size > safe.batch_size and r.certifiable_fraction >= SAFE_FRACTION]
            text = (f"From batch {safe.batch_size} on, fewer than 1% of the samples were certifiable {model} "
                    f"({_share(safe, safe.certifiable)} at {safe.batch_size}); train with batches of "
                    f"{safe.batch_size} or more.")
            if later:
                text += f" Caution: batch {later[0].batch_size} had {_share(later[0], later[0].certifiable)} again."
        elif sent:
            last = sent[-1]
            text = (f"No audited batch size stays outside the exact route {model}: "
                    f"{_share(last, last.certifiable)} of the batch of {last.batch_size} were still certifiable. "
                    "Audit larger batch sizes to find where it stops.")
        else:
            text = _uncounted(plain, model)
        if text:
            out.append(Advice("Batch size", text))
    defended = [sc for sc in stories if sc.defense]
    for sc in defended:
        sent = [r for r in sc.rows if r.sent]
        got = sum(r.recovered for r in sent)
        total = sum(r.sent for r in sent)
        if sent and got == 0:
            text = (f"{sc.name} (the client's defense) stopped the exact attack: 0 of {total} samples "
                    f"sent were certified (batches of {sizes_text(sent, [r.batch_size for r in sc.rows])}).")
        elif sent:
            text = f"{sc.name} did not stop the exact attack: {got} of {total} samples sent were certified."
        else:
            text = f"{sc.name} protected no audited batch: the client withheld every one."
        cost = _perturbation(sc, [r.batch_size for r in sc.rows])
        if cost:
            text += f" Its measured cost: what the client sent is {cost} (higher is closer to the data)."
        withheld = _withheld(sc, [r.batch_size for r in sc.rows])
        if withheld:
            text += f" {withheld} Those samples do not train the model."
        out.append(Advice("Defense", text))
    if not defended and plain is not None and plain.leaks:
        out.append(Advice("Defense", "Not measured in this audit: audit a client defense as well (e.g. "
                                     "--defense exclusivity-reduction, --defense top-k:ratio=0.1; 'fedleak info' "
                                     "lists them) to measure what stopping the attack costs."))
    fished = by.get("fished")
    if fished is not None and fished.leaks:
        top = max(fished.having("full", "partial"), key=lambda r: r.batch_size)
        out.append(Advice("Client code", f"A server that ships the client's code can fish: it certified "
                                         f"{_share(top)} of the batch of {top.batch_size}, so a large batch does "
                                         "not protect against it. Run only client code you have checked."))
    return tuple(out)
