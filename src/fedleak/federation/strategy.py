"""``AuditFedAvg``: Flower's FedAvg that hands every client's update to fedleak's attacks.

Usable on its own in any Flower (>= 1.20, Message API) ServerApp::

    from fedleak.federation.strategy import AuditFedAvg, AuditPlan
    strategy = AuditFedAvg(model, AuditPlan(attack="exclusivity", options={"known_scale": False}),
                           min_available_nodes=4)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=3)
    for finding in strategy.findings():   # one per round and client, attack results (+ scores)
        print(finding.to_dict())

The model may be any ``nn.Module`` (Flower's quickstart ``Net``, your own class). It is checked once, when the
strategy is built (:mod:`fedleak.federation.template`): traced with ``torch.fx`` into the copy the attacks run
on, which the audit worker process can rebuild without your class, and, for the exact attacks, read with
:func:`fedleak.nets.as_network`, so an unsupported model raises :class:`~fedleak.errors.ModelError` naming
the node there rather than on every update.

Each round, :meth:`configure_train` remembers the weights it sends (after the optional ``tamper``
function of a malicious server). :meth:`aggregate_train` checks every reply: a client that failed
(error reply) or sent a malformed update (missing/extra arrays, wrong shapes, NaN/inf, no positive
``num-examples``) is reported and left out of the average; every valid update becomes a
:class:`fedleak.WeightUpdate` (sent weights, returned weights, num-examples) and is attacked, by
by default in a worker process so the next round does not wait. The attack sees only that update.

Scoring needs the clients' true data, which a server never has: pass a ``scorer`` (evaluation only)
that looks the batch up elsewhere (``fedleak federate`` uses the side channel of
:mod:`fedleak.federation.ground_truth`). Without one, findings report what the attacker itself knows
(samples rebuilt and certified).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import replace
from typing import Any

from fedleak.federation._flwr import require_flwr

require_flwr()

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from torch import nn  # noqa: E402

from fedleak.attacks.registry import get_attack  # noqa: E402
from fedleak.declared import check_declared  # noqa: E402
from fedleak.errors import FedleakError  # noqa: E402
from fedleak.federation.audit_pool import (  # noqa: E402
    AuditLedger,
    RoundAudit,
    check_pool_options,
    choose_audited,
    make_audit_executor,
    pending_jobs,
    wait_for,
)
from fedleak.federation.audit_worker import (  # noqa: E402
    AuditInput,
    AuditPlan,
    Scorer,
    audit_reply,
    run_audit,
)
from fedleak.federation.results import ClientRecord  # noqa: E402
from fedleak.federation.template import audit_template, check_shippable  # noqa: E402
from fedleak.federation.train_reply import parse_reply, partition_of, sent_rate, state_dict_of  # noqa: E402
from fedleak.model_copy import copy_model, state_copy
from fedleak.updates import WeightUpdate  # noqa: E402
from fedleak.validation import check_model  # noqa: E402

Tamper = Callable[[nn.Module, int], nn.Module]
AUDIT_MODES = ("process", "thread", "sync")
__all__ = ["AUDIT_MODES", "AuditFedAvg", "AuditInput", "AuditPlan", "Scorer", "needs_relu_network"]


def needs_relu_network(attack: str) -> bool:
    """Whether ``attack`` (a registered name) is an exact attack, which needs a ReLU network fedleak can read
    (:func:`fedleak.nets.as_network`); the optimisation attacks need only autograd. Unknown names raise
    :class:`FedleakError` listing the registered ones."""
    return bool(getattr(get_attack(attack), "needs_relu_network", False))


class AuditFedAvg(FedAvg):
    """FedAvg plus a per-client leakage audit (see the module docstring).

    ``model``: any ``nn.Module`` of the federation's architecture, e.g. the class your clients train (its
    weights are ignored: each round's sent weights are loaded into a copy). It is checked here, once: traced
    with ``torch.fx`` into :attr:`template`, the module the attacks run on (generated code and torch's own
    layers under your parameter names, so the audit worker process needs neither your class nor your script);
    for an exact attack (exclusivity, trap-weights, imprint) it must also be a network
    :func:`fedleak.nets.as_network` reads, else :class:`~fedleak.errors.ModelError` names the node that is
    not. A model ``torch.fx`` cannot trace is refused for the exact attacks; the optimisation attacks then
    run on a plain copy, which with ``"process"`` must pickle (else :class:`~fedleak.errors.FedleakError`).
    ``tamper(model, round) -> model``: a malicious server's change of the weights it sends, given a copy of
    your model with the round's weights (same architecture), or None for an honest server. ``audit_mode``:
    ``"process"`` (default: attacks run in ``audit_workers`` worker processes, so neither the GIL nor the attack's CPU
    time holds up Flower's server thread), ``"thread"`` (a background thread) or ``"sync"`` (inside
    ``aggregate_train``). ``scorer``: evaluation-only scoring (see module docstring); with
    ``"process"`` it must be picklable (e.g. :class:`~fedleak.federation.ground_truth.GroundTruthScorer`).
    ``declared``: what the server knows of the clients' local training from the run configuration it shares
    with them (keys of :data:`fedleak.declared.DECLARED_KEYS`, e.g. ``{"local_epochs": 1, "batch_size": 32}``
    for Flower's quickstart, and ``learning_rate``, the rate it sends: one-step updates are then read at the
    gradient's own scale; a rate the round's train config sends under
    :data:`~fedleak.federation.train_reply.SENT_RATE_KEYS` is read from it where ``declared`` gives none); a client
    may also report its own in its metrics (``local-steps``, ``local-epochs``,
    ``batch-size``, ``learning-rate``), which take precedence. Each record then says what kind of update it
    is (:func:`fedleak.update_kind.describe_update`): an update of several local steps goes to
    ``plan.multi_step_attack`` (``auto`` by default), not to the exact route.
    ``on_finding``: called with each :class:`ClientRecord` as it completes. ``audit_workers``: worker processes
    (``"process"`` only; results are the same for any number). ``audit_backlog``: the most audit jobs left
    pending (None: no bound); when a round's updates would exceed it, a sample drawn from ``audit_seed`` and the
    round is audited and the rest get a ``"not-audited"`` record (:mod:`fedleak.federation.audit_pool`;
    :meth:`audit_rounds` says per round how many were received and audited, and the audit's lag). Flower's
    ``fraction_train`` / ``min_train_nodes`` sample the clients; :attr:`sampled` holds each round's node ids.
    Other keywords go to FedAvg.
    """

    def __init__(self, model: nn.Module, plan: AuditPlan | None = None, *, tamper: Tamper | None = None,
                 scorer: Scorer | None = None, audit_mode: str = "process", audit: bool = True,
                 upload: str = "weights", declared: Mapping[str, Any] | None = None,
                 on_finding: Callable[[ClientRecord], None] | None = None, audit_workers: int = 1,
                 audit_backlog: int | None = None, audit_seed: int = 0,
                 on_update: Callable[[int, int, WeightUpdate], None] | None = None, **fedavg: Any) -> None:
        super().__init__(**fedavg)
        self.on_update = on_update  # called with (round, partition, update) for every valid update (membership)
        self.declared = check_declared(declared)
        self.plan = plan or AuditPlan()
        if audit_mode not in AUDIT_MODES:
            raise FedleakError(f"unknown audit mode '{audit_mode}'; use one of {', '.join(AUDIT_MODES)}")
        if upload not in ("weights", "delta"):
            raise FedleakError(f"upload must be 'weights' or 'delta', got '{upload}'")
        check_pool_options(audit_mode, audit_workers, audit_backlog)
        self.audit_workers, self.audit_backlog, self.audit_seed = audit_workers, audit_backlog, int(audit_seed)
        self._ledger = AuditLedger()
        self.sampled: dict[int, tuple[int, ...]] = {}  # per round: the node ids the strategy sent a train message
        check_model(model, binary=True)  # one logit: a binary classifier, attacked as its two-class twin
        self.model = copy_model(model).cpu()  # the user's own class: what ``tamper`` is given
        if audit:
            self.template = audit_template(model, attack=self.plan.attack,
                                           needs_relu_network=needs_relu_network(self.plan.attack),
                                           process=audit_mode == "process",
                                           input_shape=dict(self.plan.options).get("input_shape"))
            if audit_mode == "process" and scorer is not None:
                check_shippable(scorer, "the scorer")  # e.g. a lambda: it would fail on every update
        else:
            self.template = self.model
        self.tamper = tamper
        self.scorer = scorer
        self.audit = audit
        self.on_finding = on_finding
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self._sent_facts: dict[int, dict[str, Any]] = {}  # what each round's train config told the clients
        self._records: list[ClientRecord] = []
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self.audit_mode = audit_mode
        self.upload = upload
        self._pool: Executor | None = None
        self._closing = False
        self._models_round: tuple[int, nn.Module | None] = (-1, None)
        self.round_seconds: dict[int, float] = {}
        self.audit_wait_seconds = 0.0
        self._round_start: dict[int, float] = {}

    # ---- Flower hooks --------------------------------------------------------------------------------
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._round_start[server_round] = time.perf_counter()
        if self.audit and self.audit_mode == "process":
            self._executor()  # start the worker now, while the clients train
        sent = state_dict_of(arrays)
        if self.tamper is not None:
            model = self._model(sent, self.model)
            model = self.tamper(model, server_round)
            sent = state_copy(model)
            arrays = ArrayRecord(sent)
        self._sent[server_round] = sent
        self._sent_facts[server_round] = sent_rate(config)
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sampled[server_round] = tuple(int(m.metadata.dst_node_id) for m in messages)
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        sent = self._sent.get(server_round)
        valid: list[Message] = []
        jobs: list[tuple[int, int, WeightUpdate, dict[str, torch.Tensor] | None, dict[str, Any]]] = []
        for msg in replies:
            node = int(msg.metadata.src_node_id)
            if msg.has_error():
                self._add(ClientRecord.skipped(server_round, node, -1, "failed", str(msg.error.reason)))
                continue
            try:
                update, partition, delta, declared = parse_reply(msg, sent, self.weighted_by_key, self.upload,
                                                                 self.declared)
                declared = {**self._sent_facts.get(server_round, {}), **declared}  # declared and reported go first
            except FedleakError as exc:
                self._add(ClientRecord.skipped(server_round, node, partition_of(msg), "malformed", str(exc)))
                continue
            valid.append(msg)
            if self.on_update is not None:
                self.on_update(server_round, partition, update)
            jobs.append((node, partition, update, delta, declared))
        if self.audit:
            self._audit_round(server_round, sent, jobs)
        arrays, metrics = super().aggregate_train(server_round, valid) if valid else (None, None)
        out = (None if arrays is None else self._counters_as_counters(arrays), metrics)
        self._ledger.aggregated(server_round, pending_jobs(self._futures))
        if server_round in self._round_start:
            self.round_seconds[server_round] = time.perf_counter() - self._round_start[server_round]
        return out

    def _counters_as_counters(self, arrays: ArrayRecord) -> ArrayRecord:
        """The average with the model's integer entries (BatchNorm's ``num_batches_tracked``) back in their dtype:
        FedAvg averages them as floats, and a float counter sent in the next round does not match the integer one
        every client replies with."""
        own = self.model.state_dict()
        state = arrays.to_torch_state_dict()
        counters = [k for k, v in own.items() if not v.is_floating_point() and k in state
                    and state[k].is_floating_point()]
        if not counters:
            return arrays
        for k in counters:
            state[k] = state[k].round().to(own[k].dtype)
        return ArrayRecord(state)

    # ---- audit -----------------------------------------------------------------------------------------
    def _audit_round(self, server_round: int, sent: Mapping[str, torch.Tensor],
                     jobs: list[tuple[int, int, WeightUpdate, dict[str, torch.Tensor] | None, dict[str, Any]]]) -> None:
        """Hand the round's valid updates to the audit: all of them, or, when the backlog of pending jobs leaves
        too little room under ``audit_backlog``, a seeded sample (:func:`~fedleak.federation.audit_pool.
        choose_audited`); every update left out gets a ``"not-audited"`` record saying why."""
        self._futures = [f for f in self._futures if not f.done()]
        backlog = pending_jobs(self._futures)
        chosen = set(choose_audited([(p, n) for n, p, *_ in jobs], backlog, self.audit_backlog, self.audit_seed,
                                    server_round))
        entry = RoundAudit(server_round, len(jobs), len(chosen), backlog, self.audit_backlog,
                           self.audit_seed if len(chosen) < len(jobs) else None)
        self._ledger.arrived(entry)
        for i, (node, partition, update, delta, declared) in enumerate(jobs):
            if i not in chosen:
                self._add(ClientRecord.skipped(server_round, node, partition, "not-audited",
                                               f"not audited: {entry.text()}", num_examples=int(update.num_examples)))
                continue
            if self.audit_mode == "process":  # the job carries the sent weights: any worker can take it
                fut = self._executor().submit(audit_reply, self.plan, server_round, node, partition, sent,
                                              None if delta is not None else dict(update.after),
                                              int(update.num_examples), self.scorer, delta, declared)
            else:
                job = AuditInput(server_round, node, partition, self._round_model(server_round, sent), update,
                                 delta, declared)
                if self.audit_mode == "sync":
                    record = run_audit(self.plan, job, self.scorer)
                    self._ledger.finished(server_round)
                    self._add(record)
                    continue
                fut = self._executor().submit(run_audit, self.plan, job, self.scorer)
            fut.add_done_callback(self._collect)
            self._futures.append(fut)

    def _round_model(self, server_round: int, state: Mapping[str, torch.Tensor]) -> nn.Module:
        """One copy of the sent model per round, shared by that round's attacks (they only read it)."""
        if self._models_round[0] != server_round:
            self._models_round = (server_round, self._model(state))
        return self._models_round[1]

    def _model(self, state: Mapping[str, torch.Tensor], like: nn.Module | None = None) -> nn.Module:
        """A copy of ``like`` (default: the audit's :attr:`template`) holding the weights ``state``."""
        model = copy_model(self.template if like is None else like)
        model.load_state_dict(state)
        return model

    def _executor(self) -> Executor:
        if self._pool is None:
            self._pool = make_audit_executor(self.audit_mode, self.audit_workers, self.template)
        return self._pool

    def _collect(self, fut: Future) -> None:
        if fut.cancelled() or self._closing:
            return
        exc = fut.exception()
        if exc is not None:  # the worker died (run_audit itself never raises)
            self._add(ClientRecord.skipped(-1, -1, -1, "attack-error", f"audit worker failed: {exc!r}"))
        else:
            record = fut.result()
            self._ledger.finished(record.round)
            self._add(record)

    def _add(self, record: ClientRecord) -> None:
        with self._lock:
            self._records.append(record)
        if self.on_finding is not None:
            self.on_finding(record)

    # ---- results ---------------------------------------------------------------------------------------
    def audit_rounds(self) -> tuple[RoundAudit, ...]:
        """Per round: updates received and audited, the backlog they met, the sample's seed and the audit's lag
        (complete once :meth:`findings` has waited for the pending attacks)."""
        return self._ledger.rounds()

    def backlog(self, server_round: int | None = None) -> int | None:
        """Audit jobs not finished yet: now, or when ``server_round`` was aggregated (None: it was not)."""
        return pending_jobs(self._futures) if server_round is None else self._ledger.backlog_after(server_round)

    def wait(self) -> float:
        """Wait for pending attacks; returns the seconds spent waiting."""
        waited = wait_for(self._futures)
        self.audit_wait_seconds += waited
        return waited

    def findings(self) -> list[ClientRecord]:
        """All per-(round, client) records, sorted; waits for pending attacks first.

        A failed reply does not say which partition the node holds: it is filled in from the node's
        other replies when there are any. A client that never sends its ``partition-id`` keeps
        ``client`` -1 and is named by Flower's node id (``client_id``, ``client_label``)."""
        self.wait()
        with self._lock:
            records = list(self._records)
        partition = {r.node_id: r.client for r in records if r.client >= 0}
        records = [replace(r, client=partition.get(r.node_id, -1)) if r.client < 0 else r for r in records]
        return sorted(records, key=lambda r: (r.round, r.client < 0, r.client_id, r.node_id))

    def close(self, force: bool = False) -> None:
        """Stop the audit worker (``force``: at once, killing a running attack, e.g. on Ctrl-C)."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        self._closing = force
        if force and isinstance(pool, ProcessPoolExecutor):
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=not force, cancel_futures=True)
