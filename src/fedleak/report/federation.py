"""The federation report's view model: a verdict, rounds and clients as tables, labelled figures (one panel per
client), and each audited client's images with the reason of every frame.

:func:`build_federation_view` turns a :class:`~fedleak.federation.results.FederationResult` into a
:class:`FederationView`; :func:`render_federation` renders it with ``federation.html``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedleak.federation.results import ClientRecord, FederationResult
from fedleak.metrics import EXACT_TOL
from fedleak.report.figures import Panel, Series, line_plot_uri, panels_uri
from fedleak.report.grid import image_grid
from fedleak.report.render import percent, plural, psnr_text, render
from fedleak.report.views import (
    STATUS_TEXT,
    Column,
    Figure,
    Finding,
    ImageGrid,
    Provenance,
    Setting,
    Verdict,
    provenance,
)


@dataclass(frozen=True)
class RoundRow:
    round: int
    test_accuracy: float | None
    test_loss: float | None
    audited: int
    skipped: int
    recovered_fraction: float | None  # mean over the round's audited clients
    seconds: float | None


@dataclass(frozen=True)
class ClientRow:
    round: int
    client: str  # ClientRecord.client_label
    status: str
    update_kind: str
    route: str
    nominal: int | None  # samples the client's training drew (None: not known from the settings)
    sent: int | None  # samples its update covers (scored)
    recovered: int | None
    recovered_fraction: float | None
    uncertified: int | None  # rebuilt without a certificate
    false_certificates: int | None
    psnr: float | None
    label_accuracy: float | None
    estimated: bool  # psnr / label accuracy include uncertified samples
    attack_seconds: float | None
    detail: str

    @property
    def withheld(self) -> int:
        if self.nominal is None or self.sent is None:
            return 0
        return max(self.nominal - self.sent, 0)


@dataclass(frozen=True)
class FederationView:
    title: str
    subtitle: str
    verdict: Verdict
    certificate_note: str
    round_columns: tuple[Column, ...]
    rounds: tuple[RoundRow, ...]
    client_columns: tuple[Column, ...]
    clients: tuple[ClientRow, ...]
    figures: tuple[Figure, ...]
    grids: tuple[ImageGrid, ...]
    settings: tuple[Setting, ...]
    provenance: Provenance
    status_text: dict[str, str]


ROUND_COLUMNS = (
    Column("round", "federated round (0: the initial model, before any training)", left=True),
    Column("test accuracy", "the global model's accuracy on the server's held-out test set"),
    Column("test loss", "its mean cross-entropy on that set"),
    Column("clients audited", "client updates the server's attack ran on"),
    Column("clients skipped", "updates that failed or were malformed (left out of the model, not attacked)"),
    Column("mean certified & exact", "mean over the audited clients of the share of their batch the attack "
                                     "certified and that equals the client's sample"),
    Column("round s", "wall time of the round"),
)
CLIENT_COLUMNS = (
    Column("round", "federated round", left=True),
    Column("client", "the client's partition id when it sends one, else Flower's node id", left=True),
    Column("status", "ok; failed (client error); malformed (bad update, skipped); attack-error; not-audited (the "
                     "audit was behind its backlog bound: a seeded sample of the round's updates was audited)",
           left=True),
    Column("update", "what the client's update is, as the server sees it", left=True),
    Column("route", "the attack (and route) that ran on it", left=True),
    Column("samples sent", "samples the update covers; withheld: those the client's defense left out"),
    Column("certified & exact", "samples the attack certified that equal the client's samples (max abs error "
                                f"≤ {EXACT_TOL:g} of the data range, right label); % of the samples sent"),
    Column("uncertified", "samples rebuilt without a certificate: estimates the server cannot check"),
    Column("false cert.", "certified samples that are not samples of the client's batch; must be 0"),
    Column("PSNR dB", "mean PSNR of every rebuilt sample against its original; “est.”: it includes uncertified "
                      "samples (estimated, uncertified); blank when nothing was rebuilt"),
    Column("label acc.", "share of the client's labels among the rebuilt labels; “est.” as for PSNR"),
    Column("attack s", "time of the server's attack"),
    Column("why not certified", "the attack's reason for the uncertified samples, or the failure", left=True),
)


def _nominal(settings: dict, record: ClientRecord) -> int | None:
    """Samples a client's training drew (batch size x steps), when the settings say so."""
    try:
        if int(settings.get("local_epochs", 0)) == 0 and "batch_size" in settings:
            return int(settings["batch_size"]) * int(settings.get("local_steps", 1))
    except (TypeError, ValueError):
        pass
    return None


def _client_row(settings: dict, c: ClientRecord) -> ClientRow:
    s = c.scores
    unc = max(c.rebuilt - c.certified, 0) if c.status == "ok" else None
    reason = getattr(c, "reason", "") or ("" if c.status == "ok" else c.detail)
    return ClientRow(
        round=c.round, client=c.client_label, status=c.status, update_kind=getattr(c, "update_kind", "") or "",
        route=getattr(c, "route", "") or (c.attack or ""), nominal=_nominal(settings, c),
        sent=s.batch_size if s else None, recovered=s.recovered if s else None,
        recovered_fraction=s.recovered_fraction if s else None, uncertified=unc,
        false_certificates=s.false_certificates if s else None, psnr=s.psnr if s else None,
        label_accuracy=s.label_accuracy if s else None, estimated=bool(unc),
        attack_seconds=c.attack_seconds, detail=reason[:400],
    )


def _grid(c: ClientRecord) -> ImageGrid | None:
    s = c.scores
    if s is None or not s.preview:
        return None
    entries = list(s.preview)
    shape = next(np.asarray(img).shape for e in entries for img in e[:2] if img is not None)
    blank = np.full(shape, np.nan, dtype=np.float32)
    originals = np.stack([np.asarray(e[0], dtype=np.float32) if e[0] is not None else blank for e in entries])
    rebuilt = np.stack([np.asarray(e[1], dtype=np.float32) if e[1] is not None else blank for e in entries])
    status = [(e[2] or ("missing" if e[1] is None else "uncertified")) for e in entries]
    default = {"missing": "not rebuilt by the attack", "uncertified": "rebuilt without a certificate"}
    reasons = [e[3] if len(e) > 3 and e[3] else default.get(st, "") for e, st in zip(entries, status)]
    in_batch = sum(e[0] is not None for e in entries)
    shown = f"the first {in_batch} of {s.batch_size} samples" if s.batch_size > in_batch else f"all {in_batch} samples"
    title = (f"Round {c.round}, {c.client_label}: {s.recovered} of {s.batch_size} certified & exact "
             f"({percent(s.recovered_fraction)}); {shown}")
    return image_grid(title, [("client's sample", originals), ("rebuilt by the server", rebuilt)], status, reasons,
                      ["" for _ in entries], batch_size=in_batch, value_range=tuple(s.value_range or (0.0, 1.0)),
                      label_text="")


def _figures(result: FederationResult, records: list[ClientRecord]) -> tuple[Figure, ...]:
    figures = []
    rounds = [r.round for r in result.rounds]
    if result.rounds:
        acc = Series("global model", tuple(rounds), tuple(r.test_accuracy for r in result.rounds))
        uri = line_plot_uri([acc], "round", "test accuracy", logx=False, ylim=(0.0, 1.0), size=(4.2, 2.6))
        figures.append(Figure(uri, "test accuracy by round", "The global model's test accuracy after each round "
                                                             "(round 0: before training)."))
    clients = sorted({c.client_id: c.client_label for c in records if c.scores is not None}.items())
    if clients:
        panels = []
        for cid, label in clients:
            mine = [c for c in records if c.client_id == cid and c.scores is not None]
            xs = tuple(c.round for c in mine)
            panels.append(Panel(label, (
                Series("certified & exact", xs, tuple(c.scores.recovered_fraction for c in mine)),
                Series("rebuilt (incl. uncertified)", xs,
                       tuple(min(c.rebuilt / max(c.scores.batch_size, 1), 1.0) for c in mine), style="predicted"),
            )))
        uri = panels_uri(panels, "round", "fraction of the client's batch", ylim=(-0.04, 1.04),
                         xticks=[r for r in rounds if r > 0])
        figures.append(Figure(uri, "leakage per client by round", "One panel per client: the share of its batch "
                                                                   "the server certified (solid) and rebuilt at all "
                                                                   "(dashed, uncertified included)."))
    if result.membership:  # the server's membership inference: one ROC figure per round
        from fedleak.federation.membership import membership_roc_uris

        figures.extend(Figure(uri, "membership ROC", caption)
                       for caption, uri in membership_roc_uris(result.membership))
    return tuple(figures)


def _defense_label(result: FederationResult) -> str:
    """The clients' defense stack ("none" without one; results of older runs name theirs in the settings)."""
    return " + ".join(d.stack for d in result.defenses) or str(result.settings.get("defense", "none"))


def _verdict(result: FederationResult, rows: list[ClientRow]) -> Verdict:
    s = result.settings
    threat, defense = str(s.get("threat", "?")), _defense_label(result)
    scored = [r for r in rows if r.recovered_fraction is not None]
    skipped = [r for r in rows if r.status != "ok"]
    findings = []
    who = f"{threat.capitalize()} server" + (f" vs. defense {defense}" if defense != "none" else "")
    if scored:
        fr = [r.recovered_fraction for r in scored]
        leaked = sum(1 for r in scored if r.recovered)
        sizes = sorted({r.sent for r in scored})
        batch = f"batch of {sizes[0]}" if len(sizes) == 1 and not any(r.withheld for r in rows) else "update"
        span = percent(min(fr)) if min(fr) == max(fr) else f"{percent(min(fr))}–{percent(max(fr))}"
        headline = (f"{who} certified {span} of the samples in each client's {batch} (mean "
                    f"{percent(float(np.mean(fr)))}) in {leaked} of {plural(len(scored), 'audited update')}.")
        findings.append(Finding(who, f"certified and exact: {span} of the samples in each client's {batch}; "
                                     f"{sum(r.recovered for r in scored)} of {sum(r.sent for r in scored)} samples "
                                     "over all audited updates.", "certified" if leaked else "nothing certified",
                                "bad" if leaked else "good"))
        est = [r for r in scored if r.estimated]
        if est:
            psnr = [r.psnr for r in est if r.psnr is not None]
            acc = [r.label_accuracy for r in est if r.label_accuracy is not None]
            text = f"{sum(r.uncertified for r in est)} more samples rebuilt without a certificate"
            if psnr and acc:
                text += (f" in {plural(len(est), 'update')}; PSNR of all rebuilt samples "
                         f"{psnr_text(float(np.mean(psnr)))} dB, label accuracy {percent(float(np.mean(acc)))}")
            findings.append(Finding("Uncertified", text + ".", "estimated, uncertified", "warn"))
        level = "bad" if leaked else ("warn" if est else "good")
    else:
        headline, level = f"{who}: no client update was scored.", "warn"
    withheld = [r for r in rows if r.withheld]
    if withheld:
        findings.append(Finding("Withheld", f"the client's defense withheld {sum(r.withheld for r in withheld)} of "
                                            f"{sum(r.nominal for r in withheld)} samples in "
                                            f"{plural(len(withheld), 'update')} (not sent, so not leaked).", "", ""))
    for d in result.defenses:
        aware = sorted({c.defense_aware for c in result.records if c.defense_aware is not None})
        modelled = {(True,): " The server's attack modelled the defense.",
                    (False,): " The server's attack did not model the defense."}.get(tuple(aware), "")
        findings.append(Finding("Privacy", f"{d.stack}: {d.privacy_text()}." + modelled, "", ""))
    if skipped:
        findings.append(Finding("Skipped", f"{plural(len(skipped), 'client update')} not attacked: "
                                           + ", ".join(sorted({r.status for r in skipped})) + ".", "", "warn"))
    findings.extend(_load_findings(result))
    if len(result.rounds) >= 2:
        a, b = result.rounds[0], result.rounds[-1]
        findings.append(Finding("Utility", f"test accuracy {percent(a.test_accuracy)} (round {a.round}) → "
                                           f"{percent(b.test_accuracy)} (round {b.round}).", "", ""))
    false_total = sum(r.false_certificates or 0 for r in rows)
    alarm = (f"{false_total} FALSE CERTIFICATE(S): certified samples that are not samples of the client's batch."
             if false_total else "")
    if result.membership:  # the server's membership inference, per round and mode
        from fedleak.federation.membership import membership_lines

        findings.extend(Finding("Membership", line, "measured", "warn") for line in membership_lines(result.membership))
    return Verdict(headline, tuple(findings), level, alarm)


def _load_findings(result: FederationResult) -> list[Finding]:
    """Client sampling and an audit that fell behind its backlog bound, in numbers (nothing when neither)."""
    out = []
    trained = [r for r in result.rounds if r.round]
    clients = result.settings.get("clients")
    if isinstance(clients, int) and any(r.sampled and len(r.sampled) < clients for r in trained):
        sizes = sorted({len(r.sampled) for r in trained})
        out.append(Finding("Sampling", f"Flower sampled {'–'.join(map(str, sizes[::max(len(sizes) - 1, 1)]))} of "
                                       f"{clients} clients per round.", "", ""))
    loads = [r.audit for r in trained if r.audit is not None]
    behind = [a for a in loads if a.sampled]
    if behind:
        out.append(Finding("Audit sampled", f"the audit fell behind its backlog bound of {behind[0].bound} in "
                                            f"{plural(len(behind), 'round')}: it audited "
                                            f"{sum(a.audited for a in loads)} of {sum(a.received for a in loads)} "
                                            f"updates received (a sample drawn with seed {behind[0].seed}; the rest "
                                            "are listed as not-audited).", "", "warn"))
    return out


def _settings(settings: dict) -> tuple[Setting, ...]:
    def text(v) -> str:
        if isinstance(v, (list, tuple)):
            return ", ".join(map(str, v)) or "none"
        if isinstance(v, dict):
            return ", ".join(f"{k}: {x}" for k, x in v.items()) or "none"
        return "none" if v is None else str(v)

    return tuple(Setting(str(k).replace("_", " "), text(v)) for k, v in settings.items())


def _aggregate_text(result: FederationResult) -> str:
    """Under secure aggregation: what the audit of each round's aggregate got (empty otherwise)."""
    if not result.aggregates:
        return ""
    lines = [" Secure aggregation (Flower's SecAgg+): the server received no individual update, only each round's "
             "aggregate, so one audit of the aggregate (as one update of the union of the clients' batches) replaces "
             "the per-client audit; it is scored against every contributing client's samples."]
    for a in result.aggregates:
        if a.status != "ok":
            lines.append(f" Round {a.round}: {a.status}: {a.detail}")
            continue
        q = a.quantization
        quant = f"; SecAgg+ quantization bound {q.bound:.2g} per entry" if q is not None else ""
        if q is not None and q.max_error is not None:
            quant += f", measured max error {q.max_error:.2g}, {q.clipped} clipped entries"
        if a.scores is None:
            lines.append(f" Round {a.round}: {a.certified} of {a.num_examples} samples certified (not scored){quant}.")
            continue
        per = ", ".join(f"{s.recovered}/{s.num_examples}" for s in a.shares)
        lines.append(f" Round {a.round}: {a.scores.recovered} of {a.num_examples} samples of the round certified & "
                     f"exact ({percent(a.scores.recovered_fraction)}), from {a.clients_touched} of {len(a.shares)} "
                     f"clients (per client {per}); {a.scores.false_certificates} false certificate(s){quant}.")
    return "".join(lines)


def build_federation_view(result: FederationResult) -> FederationView:
    s = result.settings
    records = sorted(result.records, key=lambda c: (c.round, c.client_id))
    rows = [_client_row(s, c) for c in records]
    round_rows = []
    for r in result.rounds:
        fr = [c.scores.recovered_fraction for c in records if c.round == r.round and c.scores is not None]
        audited = r.audit.audited if r.audit is not None else r.clients_ok
        round_rows.append(RoundRow(r.round, r.test_accuracy, r.test_loss, audited, r.clients_skipped,
                                   float(np.mean(fr)) if fr else None, r.seconds))
    ranges = sorted({tuple(c.scores.value_range) for c in records if c.scores and c.scores.value_range})
    range_text = "; ".join(f"[{lo:g}, {hi:g}]" for lo, hi in ranges) or "the batch's own range"
    note = (f"Certified & exact: the server's attack certified the sample and it equals the client's sample (max abs "
            f"error ≤ {EXACT_TOL:g} of the data range, {range_text}; right label). Every certified sample is checked; "
            "one that is not a distinct sample of the client's batch is a false certificate. Scores come from an "
            "evaluation-only side channel the attack never reads.") + _aggregate_text(result)
    widths = s.get("widths", s.get("hidden"))
    parts = [str(s["data"]) if "data" in s else "",
             f"{s['clients']} clients × {s['rounds']} rounds" if "clients" in s and "rounds" in s else "",
             f"batch {s['batch_size']}" if "batch_size" in s else "",
             f"model {s['model']}" if s.get("model") else
             f"hidden widths {', '.join(map(str, widths))}" if isinstance(widths, (list, tuple)) else "",
             f"upload {s['upload']}" if "upload" in s else "", f"seed {s['seed']}" if "seed" in s else ""]
    subtitle = ", ".join(p for p in parts if p)
    base = provenance(result.seconds, s.get("seed") if isinstance(s.get("seed"), int) else None)
    packages = ", ".join(f"{k} {v}" for k, v in result.versions.items()) or base.packages
    return FederationView(
        title=f"Federation audit: {s.get('threat', '?')} server, defense {_defense_label(result)}",
        subtitle=subtitle, verdict=_verdict(result, rows), certificate_note=note, round_columns=ROUND_COLUMNS,
        rounds=tuple(round_rows), client_columns=CLIENT_COLUMNS, clients=tuple(rows),
        figures=_figures(result, records), grids=tuple(g for g in (_grid(c) for c in records) if g is not None),
        settings=_settings(s), provenance=Provenance(base.python, base.platform, packages, base.seconds, base.seed),
        status_text=STATUS_TEXT)


def render_federation(result: FederationResult) -> str:
    return render("federation.html", view=build_federation_view(result))
