"""``fedleak federate --secagg``: the server runs Flower's SecAgg+ and audits what it sees, the aggregate.

Flower 1.41 runs SecAgg+ as a legacy workflow: :class:`flwr.server.workflow.SecAggPlusWorkflow` inside
:class:`flwr.server.workflow.DefaultWorkflow`, with a legacy :class:`flwr.server.strategy.Strategy` whose
``aggregate_fit`` receives only the unmasked weighted average of the sampled clients' uploads (the clients run
:func:`flwr.clientapp.mod.secaggplus_mod`, see :mod:`fedleak.federation.secagg_client`). Flower's Message-API
strategies (``AuditFedAvg``) cannot run inside it, so :func:`make_secagg_server_app` builds a ServerApp whose
``main`` runs exactly Flower's pattern (as in Flower's ``flower-secure-aggregation`` example) with
:class:`SecAggAudit` as the strategy:

* ``configure_fit`` samples the clients (seeded), sends every one the same weights (after the threat's ``tamper``
  for a malicious server) and the run's config;
* ``aggregate_fit`` gets the aggregate (the only update the server ever holds), applies it, and hands it to the
  aggregate audit (:func:`fedleak.federation.aggregate_audit.run_aggregate_audit`) on a background thread: one
  :class:`~fedleak.federation.aggregate_record.AggregateRecord` per round replaces the per-client records;
* ``evaluate`` measures the global model on the test set, as the ordinary run does.

The threat's plan and ``tamper`` come from :func:`~fedleak.federation.server_app.build_strategy` (one definition
of each threat). :class:`ObservedGrid` counts, on the server's own Grid, what arrives: masked vectors, and replies
carrying plain arrays (none: ``secaggplus_mod`` empties them), recorded per round.
"""

from __future__ import annotations

from fedleak.federation._flwr import require_flwr

require_flwr()

import dataclasses  # noqa: E402
import random  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from concurrent.futures import Future, ThreadPoolExecutor  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Context  # noqa: E402
from flwr.common import FitIns, FitRes, Parameters, ndarrays_to_parameters, parameters_to_ndarrays  # noqa: E402
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key  # noqa: E402
from flwr.server import LegacyContext, ServerConfig  # noqa: E402
from flwr.server.client_manager import ClientManager  # noqa: E402
from flwr.server.client_proxy import ClientProxy  # noqa: E402
from flwr.server.strategy import Strategy  # noqa: E402
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fedleak.federation.aggregate_audit import AggregateInput, AggregateScorer, run_aggregate_audit  # noqa: E402
from fedleak.federation.aggregate_record import AggregateRecord, ClientShare, ServerView  # noqa: E402
from fedleak.federation.audit_pool import pending_jobs, wait_for  # noqa: E402
from fedleak.federation.client_app import GROUND_TRUTH_KEY, SETTINGS_KEY  # noqa: E402
from fedleak.federation.results import FederationResult, RoundAudit  # noqa: E402
from fedleak.federation.secagg_client import DTYPE_KEY, NAMES_KEY, SEED_KEY, UPLOADS_KEY  # noqa: E402
from fedleak.federation.server_app import StoppableGrid, build_strategy, evaluate_global  # noqa: E402
from fedleak.federation.settings import FederationSettings, data_split, make_model  # noqa: E402
from fedleak.model_copy import copy_model, state_copy  # noqa: E402

__all__ = ["ObservedGrid", "SecAggAudit", "make_secagg_server_app", "with_aggregates"]


class ObservedGrid:
    """A Grid that counts, per round (the messages' group id), the replies the server receives: all of them, those
    carrying a SecAgg+ masked vector, and those carrying arrays in the clear. Everything else is delegated."""

    def __init__(self, grid: Grid) -> None:
        self._grid = grid
        self.replies: Counter[int] = Counter()
        self.masked: Counter[int] = Counter()
        self.plain: Counter[int] = Counter()

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        for msg in replies:
            rnd = int(msg.metadata.group_id or 0)
            self.replies[rnd] += 1
            if not msg.has_content():
                continue
            if any(len(rec) > 0 for rec in msg.content.array_records.values()):
                self.plain[rnd] += 1
            cfg = msg.content.config_records.get(RECORD_KEY_CONFIGS)
            if cfg is not None and Key.MASKED_PARAMETERS in cfg:
                self.masked[rnd] += 1
        return replies

    def view(self, server_round: int, aggregates: int) -> ServerView:
        return ServerView(self.replies[server_round], self.masked[server_round], self.plain[server_round], aggregates)


class SecAggAudit(Strategy):
    """A legacy Flower strategy for :class:`~flwr.server.workflow.SecAggPlusWorkflow` that audits each round's
    aggregate (see the module docstring). ``scorer``: evaluation only (against the clients' true batches).
    ``evaluate_fn(round, state) -> (accuracy, loss)``: the global model's test accuracy."""

    def __init__(self, settings: FederationSettings, *, scorer: AggregateScorer | None = None,
                 ground_truth_dir: str | None = None,
                 evaluate_fn: Callable[[int, dict[str, torch.Tensor]], tuple[float, float]] | None = None,
                 on_aggregate: Callable[[AggregateRecord], None] | None = None) -> None:
        self.settings = settings
        split = data_split(settings.data, settings.test_size, settings.public_size)
        self.data_range = tuple(float(v) for v in split.value_range)
        _, inner = build_strategy(settings)  # the threat's plan, tamper and audit template
        self.plan, self.tamper, self.template, self.user_model = inner.plan, inner.tamper, inner.template, inner.model
        self.initial = state_copy(make_model(settings, split))
        self.names = list(self.initial)
        self.scorer, self.ground_truth_dir = scorer, ground_truth_dir
        self.evaluate_fn, self.on_aggregate = evaluate_fn, on_aggregate
        self.grid: ObservedGrid | None = None
        self.sampled: dict[int, tuple[int, ...]] = {}
        self.round_seconds: dict[int, float] = {}
        self.audit_wait_seconds = 0.0
        self._sent: dict[int, dict[str, torch.Tensor]] = {}
        self._start: dict[int, float] = {}
        self._aggregated: set[int] = set()
        self._records: list[AggregateRecord] = []
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None

    # ---- Flower's legacy strategy ----------------------------------------------------------------------
    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return self._parameters(self.initial)

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list[tuple[ClientProxy, FitIns]]:
        self._start[server_round] = time.perf_counter()
        s = self.settings
        sent = self._state(parameters)
        if self.tamper is not None:
            model = copy_model(self.user_model)
            model.load_state_dict(sent)
            sent = state_copy(self.tamper(model, server_round))
        self._sent[server_round] = sent
        count = s.clients if s.fraction_train >= 1 else max(int(s.clients * s.fraction_train), s.min_train_nodes)
        client_manager.wait_for(count)
        proxies = sorted(client_manager.all().values(), key=lambda p: int(p.node_id))
        proxies = random.Random(s.seed * 1_000_003 + server_round).sample(proxies, count)
        self.sampled[server_round] = tuple(int(p.node_id) for p in proxies)
        out = []
        for proxy in proxies:
            config = {SETTINGS_KEY: s.to_json(), "server-round": server_round, NAMES_KEY: list(self.names),
                      DTYPE_KEY: s.secagg_upload_dtype,
                      SEED_KEY: int(np.random.SeedSequence([s.seed, server_round, int(proxy.node_id) % 2**32])
                                    .generate_state(1)[0])}
            if self.ground_truth_dir is not None:  # evaluation only: see client_app and secagg_client
                config[GROUND_TRUTH_KEY] = config[UPLOADS_KEY] = self.ground_truth_dir
            out.append((proxy, FitIns(self._parameters(sent), config)))
        return out

    def aggregate_fit(self, server_round: int, results: list[tuple[ClientProxy, FitRes]],
                      failures: list) -> tuple[Parameters | None, dict]:
        sent = self._sent.get(server_round)
        if not results or sent is None:
            return None, {}
        aggregates = {id(res.parameters) for _, res in results}  # SecAgg+ gives every result the same aggregate
        average = self._state(results[0][1].parameters, dtype=torch.float64)
        if self.settings.upload == "delta":
            delta = {k: average[k].float() for k in sent}
            new = {k: sent[k] - delta[k] for k in sent}
        else:
            new = {k: average[k].float() for k in sent}
            delta = {k: sent[k] - new[k] for k in sent}
        shares = tuple(ClientShare(int(proxy.node_id), int(res.metrics.get("partition-id", -1)), int(res.num_examples))
                       for proxy, res in sorted(results, key=lambda r: int(r[1].metrics.get("partition-id", -1))))
        self._aggregated.add(server_round)
        if self.settings.audit:
            model = copy_model(self.template)
            model.load_state_dict(sent)
            job = AggregateInput(server_round, model, delta, shares, self.settings.secagg_config,
                                 self.settings.upload, average, self._declared(), self.data_range)
            view = self.grid.view(server_round, len(aggregates)) if self.grid is not None else None
            future = self._executor().submit(run_aggregate_audit, self.plan, job, self.scorer, view)
            future.add_done_callback(lambda done, r=server_round, j=job: self._collect(done, r, j))
            self._futures.append(future)
        if server_round in self._start:
            self.round_seconds[server_round] = time.perf_counter() - self._start[server_round]
        return self._parameters(new), {}

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: ClientManager) -> list:
        return []

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple[float | None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict] | None:
        if server_round > 0 and server_round not in self._aggregated:  # SecAgg+ halted: nothing was aggregated
            view = self.grid.view(server_round, 0) if self.grid is not None else None
            self._add(AggregateRecord(server_round, "halted", (), None, view, "SecAgg+ did not complete this round "
                                      "(too few clients answered a stage): the model was not updated"))
        if self.evaluate_fn is None:
            return None
        acc, loss = self.evaluate_fn(server_round, self._state(parameters))
        return loss, {"accuracy": acc}

    # ---- audit -------------------------------------------------------------------------------------------
    def _declared(self) -> dict[str, int | float]:
        """What the server knows of the training behind the aggregate: each client's local steps (the aggregate
        covers the union of the batches, so the per-client batch size does not describe it) and the learning rate
        it sets; with local epochs, the run's declaration (a multi-step update either way)."""
        s, declared = self.settings, self.settings.declared_training()
        return {k: v for k, v in declared.items() if k != "batch_size"} if s.local_epochs == 0 else declared

    def _executor(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedleak-secagg-audit")
        return self._pool

    def _collect(self, future: Future, server_round: int, job: AggregateInput) -> None:
        """The finished audit's record; an audit that raised (or was cancelled) still leaves one, saying so."""
        if future.cancelled():
            self._add(AggregateRecord(server_round, "attack-error", job.shares, None, detail="the audit was cancelled"))
        elif future.exception() is not None:
            exc = future.exception()
            self._add(AggregateRecord(server_round, "attack-error", job.shares, None,
                                      detail=f"{type(exc).__name__}: {exc}"))
        else:
            self._add(future.result())

    def _add(self, record: AggregateRecord) -> None:
        with self._lock:
            self._records.append(record)
        if self.on_aggregate is not None:
            self.on_aggregate(record)

    def wait(self) -> float:
        """Wait for the pending audits; returns the seconds spent waiting."""
        waited = wait_for(self._futures)
        self.audit_wait_seconds += waited
        return waited

    def aggregates(self) -> list[AggregateRecord]:
        """One record per round, sorted; waits for the audit first."""
        self.wait()
        with self._lock:
            return sorted(self._records, key=lambda r: r.round)

    def findings(self) -> list:
        """No per-client records: under secure aggregation there is no individual update (see :meth:`aggregates`)."""
        self.wait()
        return []

    def audit_rounds(self) -> tuple[RoundAudit, ...]:
        """Per round: one update received (the aggregate), audited once."""
        return tuple(RoundAudit(r.round, 1 if r.status != "halted" else 0, 1 if r.status == "ok" else 0, 0, None, None)
                     for r in self.aggregates())

    def backlog(self, server_round: int | None = None) -> int:
        return pending_jobs(self._futures)

    def close(self, force: bool = False) -> None:
        """Stop the audit thread (``force``: drop the jobs not started; a running attack finishes on its own)."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=not force, cancel_futures=True)

    # ---- parameters ----------------------------------------------------------------------------------------
    def _parameters(self, state: dict[str, torch.Tensor]) -> Parameters:
        return ndarrays_to_parameters([state[n].detach().cpu().numpy() for n in self.names])

    def _state(self, parameters: Parameters, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        arrays = parameters_to_ndarrays(parameters)
        return {n: torch.from_numpy(np.array(a, copy=True)).to(dtype) for n, a in zip(self.names, arrays)}


def make_secagg_server_app(settings: FederationSettings, *, scorer: AggregateScorer | None = None,
                           ground_truth_dir: str | None = None,
                           on_evaluate: Callable[[int, float, float], None] | None = None,
                           on_aggregate: Callable[[AggregateRecord], None] | None = None,
                           stop: threading.Event | None = None) -> tuple[ServerApp, SecAggAudit]:
    """(ServerApp running Flower's SecAgg+ workflow for ``settings.rounds`` rounds, its :class:`SecAggAudit`)."""
    split = data_split(settings.data, settings.test_size, settings.public_size)

    def evaluate(server_round: int, state: dict[str, torch.Tensor]) -> tuple[float, float]:
        from flwr.app import ArrayRecord

        acc, loss = evaluate_global(make_model(settings, split), split, ArrayRecord(state), settings.stack)
        if on_evaluate is not None:
            on_evaluate(server_round, acc, loss)
        return acc, loss

    strategy = SecAggAudit(settings, scorer=scorer, ground_truth_dir=ground_truth_dir, evaluate_fn=evaluate,
                           on_aggregate=on_aggregate)
    cfg = settings.secagg_config
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        grid = ObservedGrid(StoppableGrid(grid, stop) if stop is not None else grid)
        strategy.grid = grid
        legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds), strategy=strategy)
        fit = SecAggPlusWorkflow(cfg.num_shares, cfg.reconstruction_threshold, max_weight=cfg.max_weight,
                                 clipping_range=cfg.clipping_range, quantization_range=cfg.quantization_range)
        DefaultWorkflow(fit_workflow=fit)(grid, legacy)

    return app, strategy


def with_aggregates(result: FederationResult, audit: SecAggAudit) -> FederationResult:
    """``result`` of a SecAgg+ run with its per-round aggregate records, and each round's clients counted from the
    aggregate (clients in the sum / sampled clients left out) rather than from per-client records (there are none)."""
    records = tuple(audit.aggregates())
    by_round = {r.round: r for r in records}
    rounds = tuple(dataclasses.replace(r, clients_ok=len(by_round[r.round].shares),
                                       clients_skipped=(len(audit.sampled.get(r.round, ()))
                                                        - len(by_round[r.round].shares)))
                   if r.round in by_round else r for r in result.rounds)
    return dataclasses.replace(result, rounds=rounds, aggregates=records)
