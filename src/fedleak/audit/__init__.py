"""Leakage audits: run attacks over batch sizes, client scenarios and client defenses, write results and a report."""

from fedleak.audit.membership import (
    MembershipAudit,
    MembershipAuditSettings,
    MembershipScenario,
    run_membership_audit,
)
from fedleak.audit.report import render_html, results_payload, write_audit
from fedleak.audit.run import AuditResult, BatchResult, Showcase, run_audit
from fedleak.audit.scenarios import available_scenarios, register_scenario
from fedleak.audit.settings import AuditSettings

__all__ = [
    "AuditResult",
    "AuditSettings",
    "BatchResult",
    "MembershipAudit",
    "MembershipAuditSettings",
    "MembershipScenario",
    "Showcase",
    "available_scenarios",
    "register_scenario",
    "render_html",
    "results_payload",
    "run_audit",
    "run_membership_audit",
    "write_audit",
]
