"""Audit a real federation: Flower (Message API) apps whose server attacks every client update.

Importing this package does not import Flower; the names below load it on first use (``pip install
'fedleak[flower]'``). See docs/federation.md.

* :class:`FederationSettings`, :func:`run_federation` -- ``fedleak federate`` as a function.
* :class:`AuditFedAvg`, :class:`AuditPlan` -- the strategy, usable in your own ServerApp.
* :func:`make_client_app`, :func:`make_server_app`, :func:`build_strategy` -- the apps.
* :func:`write_report` -- the self-contained HTML report.
"""

from __future__ import annotations

from importlib import import_module

from fedleak.federation.partition import partition_indices
from fedleak.federation.results import ClientRecord, FederationResult, RoundAudit, RoundRecord, Scores
from fedleak.federation.settings import FederationSettings

_LAZY = {
    "AuditFedAvg": "fedleak.federation.strategy",
    "AuditPlan": "fedleak.federation.strategy",
    "make_client_app": "fedleak.federation.client_app",
    "make_server_app": "fedleak.federation.server_app",
    "build_strategy": "fedleak.federation.server_app",
    "run_federation": "fedleak.federation.run",
    "run_deployment": "fedleak.federation.deployment",
    "DeploymentOptions": "fedleak.federation.deployment",
    "available_runtimes": "fedleak.federation.runtimes",
    "write_report": "fedleak.federation.report",
    "available_threats": "fedleak.federation.hooks",
    "available_defenses": "fedleak.defenses",
    "SecAggAudit": "fedleak.federation.secagg",
    "make_secagg_server_app": "fedleak.federation.secagg",
    "AggregateRecord": "fedleak.federation.aggregate_record",
    "SecAggConfig": "fedleak.federation.secagg_config",
}

__all__ = ["ClientRecord", "FederationResult", "FederationSettings", "RoundAudit", "RoundRecord", "Scores",
           "partition_indices", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fedleak.federation' has no attribute '{name}'")
