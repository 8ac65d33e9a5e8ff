"""The membership audit's outputs: ``results.json`` (versions, seed, settings, per scenario the target's train and
test accuracy, ε of its defense and every attack's metrics and ROC curve) and a self-contained ``report.html``
(a table per scenario and the ROC figure, inline), written all-or-nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fedleak.audit.membership import MembershipAudit, MembershipScenario
from fedleak.membership.plots import roc_plot_uri
from fedleak.report.output import RESULTS_AND_REPORT, environment_info, write_results_and_report
from fedleak.report.render import render
from fedleak.report.views import Column, Figure, Provenance, Setting, provenance

OUTPUT_FILES = RESULTS_AND_REPORT

COLUMNS = (
    Column("attack", "the membership attack (see 'fedleak info')", left=True),
    Column("AUC", "area under the ROC curve: the chance that a random member scores above a random non-member "
                  "(0.5: the attack guesses)"),
    Column("balanced acc.", "mean of the true-positive and true-negative rates at the best threshold (0.5: chance)"),
    Column("TPR @ 1% FPR", "members found when at most 1% of non-members are wrongly called members (0.01: chance)"),
    Column("TPR @ 0.1% FPR", "the same at 0.1% of non-members (0.001: chance; needs 1,000 non-members to mean it)"),
    Column("seconds", "the attack's time, its shadow models' training included"),
)


def results_payload(audit: MembershipAudit) -> dict[str, object]:
    """Everything ``results.json`` holds."""
    return {
        "kind": "fedleak-audit-membership",
        "seed": audit.settings.seed,
        "settings": audit.settings.to_dict(),
        "environment": environment_info(),
        "model": audit.model,
        "scenarios": [{"name": s.name, "defense": s.spec, "accuracy_gap": s.accuracy_gap, **s.result.to_dict()}
                      for s in audit.scenarios],
        "timings": {"total_seconds": audit.seconds},
    }


@dataclass(frozen=True)
class AttackRow:
    name: str
    auc: float
    balanced_accuracy: float
    tpr_at_1pct_fpr: float
    tpr_at_01pct_fpr: float
    seconds: float


@dataclass(frozen=True)
class ScenarioView:
    name: str
    summary: str  # train / test accuracy, the gap, ε
    rows: tuple[AttackRow, ...]
    roc: Figure


@dataclass(frozen=True)
class MembershipView:
    title: str
    subtitle: str
    columns: tuple[Column, ...]
    scenarios: tuple[ScenarioView, ...]
    settings: tuple[Setting, ...]
    provenance: Provenance


def privacy_text(scenario: MembershipScenario) -> str:
    """``ε 2.1 at δ 1e-05 (rdp)`` for a DP defense, else that it gives no formal guarantee."""
    privacy = scenario.result.privacy
    if not privacy:
        return "no formal privacy guarantee"
    return "; ".join(f"ε {p.epsilon:.3g} at δ {p.delta:.3g} per {p.unit} ({p.accountant})" for p in privacy)


def _scenario_view(scenario: MembershipScenario) -> ScenarioView:
    r = scenario.result
    summary = (f"target train accuracy {r.train_accuracy:.3f} on its {r.settings.members} members, test accuracy "
               f"{r.test_accuracy:.3f} on {r.settings.non_members} held-out records (gap {scenario.accuracy_gap:.3f}); "
               f"{privacy_text(scenario)}")
    rows = tuple(AttackRow(o.name, o.metrics.auc, o.metrics.balanced_accuracy, o.metrics.tpr_at_1pct_fpr,
                           o.metrics.tpr_at_01pct_fpr, o.seconds) for o in r.outcomes)
    curves = {o.name: o.metrics for o in r.outcomes}
    roc = Figure(roc_plot_uri(curves, f"{scenario.name}: ROC, log-log"), f"ROC curves of the {scenario.name} target",
                 "True-positive against false-positive rate on log axes (the low false-positive end is what "
                 "matters); the dotted diagonal is chance.")
    return ScenarioView(scenario.name, summary, rows, roc)


def build_view(audit: MembershipAudit) -> MembershipView:
    s = audit.settings
    data = s.data
    settings = (
        Setting("data", data), Setting("model", audit.model),
        Setting("records", f"{s.members} members, {s.non_members} non-members, "
                           f"{audit.scenarios[0].result.settings.reference} reference (shadow models)"),
        Setting("training", f"{s.epochs} epochs of SGD, lr {s.lr:g}, batches of {s.batch_size}"),
        Setting("attacks", ", ".join(s.attacks)), Setting("seed", str(s.seed)),
    )
    return MembershipView(
        title=f"Membership audit: {data}",
        subtitle=(f"Was a record in the training data? {len(s.attacks)} attack(s) on a {audit.model} trained on "
                  f"{s.members} records of {data}, for {len(audit.scenarios)} scenario(s)."),
        columns=COLUMNS, scenarios=tuple(_scenario_view(sc) for sc in audit.scenarios), settings=settings,
        provenance=provenance(audit.seconds, s.seed),
    )


def render_membership(audit: MembershipAudit) -> str:
    return render("membership.html", view=build_view(audit))


def write_membership_audit(audit: MembershipAudit, out: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``results.json`` and ``report.html`` into ``out``, both rendered first, then all-or-nothing."""
    payload = results_payload(audit)
    page = render_membership(audit)
    return write_results_and_report(out, payload, page)
