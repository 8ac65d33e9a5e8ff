"""One audit job: run the attack on one client update, then (evaluation only) score it.

Free of Flower and picklable, so :class:`~fedleak.federation.strategy.AuditFedAvg` can run it inline,
on a thread or in worker processes (the default, :mod:`fedleak.federation.audit_pool`: the attack then
does not compete with Flower's server thread for Python's GIL, and the round does not wait for it).
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.federation.results import ClientRecord, Scores
from fedleak.federation.template import Shipped
from fedleak.model_copy import copy_model
from fedleak.reconstruction import Reconstruction
from fedleak.updates import GradientUpdate, WeightUpdate


@dataclass(frozen=True)
class AuditPlan:
    """Which attack to run on each update and how.

    ``update_kind``: ``"gradient"`` gives the attack a change the client uploaded as a gradient with
    ``num_examples``: divided by the learning rate the server set where it is declared (``learning_rate``), at the
    gradient's own scale ``1/M``; else as it is (for the exclusivity attack with ``known_scale=False``: a one-step
    change is ``lr/M`` times the mean-loss gradient); returned weights, whose difference carries their rounding, as
    the :class:`WeightUpdate` itself. ``"weights"`` always gives it the :class:`WeightUpdate`, with the local steps
    and the learning rate the server knows of (``declared``, see :func:`fedleak.update_kind.describe_update`).
    ``multi_step_attack``: the attack for updates known to come from several local steps (the exact
    route does not apply to them); it is given the :class:`WeightUpdate` and ``multi_step_options`` (e.g.
    ``{"budget": 30}``: seconds per update). ``None``: ``attack`` runs on every update.
    ``defense``: the clients' defenses; an attack that takes a ``defense`` option (a defense-aware attack) is
    given them (:func:`fedleak.audit.aware.reconstruct_aware`), and each record says whether it was.
    """

    attack: str = "exclusivity"
    options: Mapping[str, Any] = field(default_factory=lambda: {"known_scale": False})
    update_kind: str = "gradient"
    multi_step_attack: str | None = "auto"
    multi_step_options: Mapping[str, Any] = field(default_factory=lambda: {"progress": False})
    defense: DefenseStack | None = None


@dataclass(frozen=True)
class AuditInput:
    """What the attack of one (round, client) is given: the sent model and the client's update."""

    server_round: int
    node_id: int
    partition: int
    model: nn.Module
    update: WeightUpdate
    delta: Mapping[str, Any] | None = None  # the client's exact change, when it uploaded one
    declared: Mapping[str, Any] = field(default_factory=dict)  # what the server knows of the client's training


Scorer = Callable[[AuditInput, Reconstruction], Scores | None]


AUDIT_NICENESS = 10


def init_worker(niceness: int = AUDIT_NICENESS, template: Shipped | None = None) -> None:
    """Worker-process initialiser: lower CPU priority (the federation's own processes go first, the audit
    uses what is left and catches up after the last round), one torch thread, and the audit's model
    ``template`` as it arrived (each round's model is rebuilt from it, :func:`audit_reply`). Attacks are imported when
    first looked up (the attack registry is lazy)."""
    import os

    import torch

    global _TEMPLATE
    if niceness and hasattr(os, "nice"):
        try:
            os.nice(int(niceness))
        except OSError:  # pragma: no cover - not permitted
            pass
    torch.set_num_threads(1)
    _TEMPLATE = None if template is None else template.arrived()


def worker_ready() -> bool:
    """A no-op job: submitting it makes a process pool start a worker."""
    return True


def run_audit(plan: AuditPlan, job: AuditInput, scorer: Scorer | None) -> ClientRecord:
    """Attack ``job.update`` with ``plan`` (the attack sees the sent model and the update only), then
    let ``scorer`` (evaluation only) compare with the client's true batch. Never raises."""
    from fedleak.audit.aware import reconstruct_aware
    from fedleak.nets.dense_norms import fold_dense_norms
    from fedleak.update_kind import describe_update

    start = time.perf_counter()
    kind = None
    try:
        kind = describe_update(job.update, job.model, declared=job.declared)
        attack = plan.attack
        if kind.multi_step and plan.multi_step_attack is not None:
            attack = plan.multi_step_attack
        options = dict(plan.options) if attack == plan.attack else dict(plan.multi_step_options)
        lr = job.declared.get("learning_rate")  # the learning rate the server set, where its attack takes it
        # returned weights: their difference carries their rounding, which the weight route bounds (it does not read
        # a BatchNorm1d on a Linear layer's features: such a model's difference is read as a gradient, unbounded)
        fold = fold_dense_norms(job.model) if job.delta is None else None
        returned = job.delta is None and (fold is None or not fold.weights_unread)
        if attack != plan.attack or plan.update_kind == "weights" or returned:
            attacked: Any = replace(job.update, local_steps=kind.local_steps, learning_rate=lr)
        else:  # the trainable parameters' change (uploaded: exact; a state dict also holds buffers)
            change = job.delta if job.delta is not None else job.update.delta()
            attacked, scale = uploaded_change(change, job.update.parameters_of(job.model), job.update.num_examples,
                                              lr if job.delta is not None else None)
            options.update(scale if "known_scale" in options else {})
        rec, aware = reconstruct_aware(job.model, attacked, attack=attack, defense=plan.defense, **options)
        seconds = time.perf_counter() - start
        scores = scorer(job, rec) if scorer is not None else None
        return ClientRecord.from_attack(job.server_round, job.node_id, job.partition, job.update.num_examples, rec,
                                        seconds, scores, kind.summary(), kind.multi_step, defense_aware=aware,
                                        update_norm=_norm(job))
    except Exception as exc:  # noqa: BLE001 - an attack failure must not end the federation
        detail = f"{type(exc).__name__}: {exc}"
        if not isinstance(exc, FedleakError):
            detail += " | " + traceback.format_exc(limit=3).replace("\n", " ")
        return ClientRecord.skipped(job.server_round, job.node_id, job.partition, "attack-error", detail,
                                    num_examples=job.update.num_examples,
                                    update_kind=kind.summary() if kind is not None else "",
                                    multi_step=bool(kind is not None and kind.multi_step))


def uploaded_change(change: Mapping[str, Any], names: Iterable[str], num_examples: int | None,
                    learning_rate: float | None, error: float = 0.0) -> tuple[GradientUpdate, dict[str, Any]]:
    """(the attack's input, the exact attack's scale option) for a client's exact uploaded change ``lr`` times its
    gradient (one step): the change itself, at the unknown scale ``lr/M``, where the learning rate is not known;
    else divided by it (in float64, rounded once more to the change's dtype, far inside the certificate's
    tolerance), at the gradient's own scale ``1/M``, and a known transport ``error`` with it."""
    if learning_rate is None:
        return GradientUpdate({k: change[k] for k in names}, num_examples=num_examples, error=error), {}
    grads = {k: (change[k].double() / learning_rate).to(change[k].dtype) for k in names}
    return GradientUpdate(grads, num_examples=num_examples, error=error / learning_rate), {"known_scale": True}


def _norm(job: AuditInput) -> float:
    """The L2 norm of the change the server received (``before - after``, or the uploaded change)."""
    change = job.delta if job.delta is not None else job.update.delta()
    return float(sum(float(v.double().pow(2).sum()) for v in change.values()) ** 0.5)


# ---- worker-process side: the template arrives once (initialiser); a job carries the round's sent weights
# (torch passes tensors between processes through shared memory), and each worker builds a round's model once
_TEMPLATE: nn.Module | None = None
_ROUND_MODELS: dict[int, nn.Module] = {}
_KEPT_ROUNDS = 4


def _round_model(server_round: int, sent: Mapping[str, Any]) -> nn.Module:
    """This worker's copy of the model the server sent in ``server_round`` (the last few rounds are kept)."""
    model = _ROUND_MODELS.get(int(server_round))
    if model is None:
        if _TEMPLATE is None:
            raise FedleakError("the audit worker was started without the model template (init_worker)")
        model = copy_model(_TEMPLATE)
        model.load_state_dict(dict(sent))
        _ROUND_MODELS[int(server_round)] = model
        for old in sorted(_ROUND_MODELS)[:-_KEPT_ROUNDS]:
            del _ROUND_MODELS[old]
    return model


def audit_reply(plan: AuditPlan, server_round: int, node_id: int, partition: int, sent: Mapping[str, Any],
                after: Mapping[str, Any] | None, num_examples: int, scorer: Scorer | None,
                delta: Mapping[str, Any] | None = None, declared: Mapping[str, Any] | None = None) -> ClientRecord:
    """:func:`run_audit` of one reply in a worker process: ``sent`` the round's weights, ``after`` the returned
    ones (None: ``sent - delta``, the uploaded change)."""
    try:
        model = _round_model(server_round, sent)
    except FedleakError as exc:
        return ClientRecord.skipped(server_round, node_id, partition, "attack-error", str(exc),
                                    num_examples=num_examples)
    before = model.state_dict()
    if after is None:
        after = {k: before[k] - delta[k] for k in before}
    update = WeightUpdate(before, after, num_examples=num_examples)
    return run_audit(plan, AuditInput(server_round, node_id, partition, model, update, delta, dict(declared or {})),
                     scorer)
