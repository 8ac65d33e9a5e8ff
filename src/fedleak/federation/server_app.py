"""The Flower ServerApp of an audited federation, and the strategy it runs.

:func:`build_strategy` makes the :class:`~fedleak.federation.strategy.AuditFedAvg` for a run's
settings (threat model: what the server sends and which attack it runs, given the clients' defenses so that a
defense-aware attack can model them; wrapped in the server wrappers of the Flower-native defenses, e.g.
``DifferentialPrivacyClientSideFixedClipping`` for ``central-dp``: :mod:`fedleak.federation.flower_native`).
:func:`make_server_app` wraps it in a ServerApp whose ``main`` evaluates the global model on the held-out test
set each round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from fedleak.federation._flwr import require_flwr

require_flwr()

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import Strategy  # noqa: E402
from torch import nn  # noqa: E402

from fedleak.client_loss import client_loss, ends_in_sigmoid, predicted_classes  # noqa: E402
from fedleak.defenses.stack import DefenseStack  # noqa: E402
from fedleak.federation.client import CLIENT_RATE  # noqa: E402
from fedleak.federation.client_app import GROUND_TRUTH_KEY, SETTINGS_KEY  # noqa: E402
from fedleak.federation.flower_native import wrap_strategy  # noqa: E402
from fedleak.federation.hooks import audit_attack, get_threat  # noqa: E402
from fedleak.federation.settings import DataSplit, FederationSettings, data_split, make_model  # noqa: E402
from fedleak.federation.strategy import AuditFedAvg, AuditPlan, Scorer  # noqa: E402
from fedleak.logits_of import per_sample_logits  # noqa: E402
from fedleak.nets.tracing import TRACE_LOCK  # noqa: E402


class FederationStopped(RuntimeError):
    """Raised in the ServerApp's thread when the run is stopped (error, Ctrl-C) while it waits for replies."""


class StoppableGrid:
    """A Grid whose ``send_and_receive`` gives up when ``stop`` is set.

    Flower's in-memory grid waits for replies up to the round timeout (an hour by default), in a thread
    the interpreter waits for at exit; this proxy lets ``fedleak federate`` end at once on Ctrl-C.
    Everything else is delegated to the wrapped grid.
    """

    def __init__(self, grid: Grid, stop: threading.Event, poll: float = 0.05) -> None:
        self._grid, self._stop, self._poll = grid, stop, poll

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(self, messages: Iterable, *, timeout: float | None = None) -> list:
        pending = set(self._grid.push_messages(messages))
        end = None if timeout is None else time.time() + timeout
        replies: list = []
        while pending and (end is None or time.time() < end):
            if self._stop.is_set():
                raise FederationStopped("the federation was stopped while waiting for client replies")
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending.difference_update(m.metadata.reply_to_message_id for m in got)
            if pending:
                time.sleep(self._poll)
        return replies


def build_strategy(settings: FederationSettings, *, scorer: Scorer | None = None,
                   on_finding: Callable | None = None, on_update: Callable | None = None
                   ) -> tuple[Strategy, AuditFedAvg]:
    """(strategy to run, the AuditFedAvg inside it) for ``settings``."""
    split = data_split(settings.data, settings.test_size, settings.public_size)
    threat = get_threat(settings.threat)
    tamper: Callable[[nn.Module, int], nn.Module] | None = None
    if threat.tamper is not None:
        def _tamper(model: nn.Module, server_round: int) -> nn.Module:
            return threat.tamper(model, server_round, settings, split)

        tamper = _tamper
    stack = settings.stack.bind(data_range=split.value_range, num_classes=split.num_classes,
                                normalization=split.normalization)
    model = make_model(settings, split)
    # the data's input shape: the attacks need not infer it from the layers (a CNN fits larger images too)
    attack = audit_attack(threat, settings, model, tuple(split.input_shape), split.value_range)
    audit = AuditFedAvg(
        model,
        AuditPlan(attack.name, attack.options, threat.update_kind,
                  multi_step_attack="auto" if threat.update_kind == "gradient" else None,
                  multi_step_options={"budget": settings.attack_budget, "progress": False,
                                      "input_shape": tuple(split.input_shape)},
                  defense=stack if stack else None),
        tamper=tamper, scorer=scorer, audit_mode=settings.audit_mode, upload=settings.upload, audit=settings.audit,
        declared=settings.declared_training(), on_finding=on_finding, on_update=on_update,
        audit_workers=settings.audit_workers, audit_backlog=settings.audit_backlog, audit_seed=settings.seed,
        fraction_train=CLIENT_RATE * settings.fraction_train, fraction_evaluate=0.0,
        min_train_nodes=settings.min_train_nodes if settings.fraction_train < 1 else settings.clients,
        min_available_nodes=settings.clients,
    )
    return wrap_strategy(stack, audit, settings), audit


def evaluate_global(model: nn.Module, split: DataSplit, arrays: ArrayRecord,
                    stack: DefenseStack | None = None) -> tuple[float, float]:
    """Test accuracy and loss of the global weights ``arrays`` (on the test inputs as the clients' defenses make
    the model see them: DisguisedNets' keyed transform)."""
    model.load_state_dict(arrays.to_torch_state_dict())
    with TRACE_LOCK, torch.no_grad():  # an audit thread may be tracing a model (torch.fx patches every forward)
        x = split.test_x if stack is None else stack.bind(
            data_range=split.value_range, num_classes=split.num_classes,
            normalization=split.normalization).at_inference(split.test_x)
        logits = per_sample_logits(model(x), len(x))  # a binary classifier's squeezed logit as a column
        probability = ends_in_sigmoid(model, logits)  # a binary classifier whose forward ends with a sigmoid
        loss = float(client_loss(logits, split.test_y, probability=probability))
        acc = float((predicted_classes(logits, probability=probability) == split.test_y).float().mean())
    return acc, loss


def make_server_app(settings: FederationSettings, strategy: Strategy, *, ground_truth_dir: str | None = None,
                    on_evaluate: Callable[[int, float, float], None] | None = None,
                    stop: threading.Event | None = None) -> ServerApp:
    """A ServerApp that runs ``strategy`` for ``settings.rounds`` rounds from the seeded initial model
    (``stop``: an event that ends the run while it waits for replies, see :class:`StoppableGrid`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        split = data_split(settings.data, settings.test_size, settings.public_size)
        model = make_model(settings, split)
        config = {SETTINGS_KEY: settings.to_json()}
        if ground_truth_dir is not None:
            config[GROUND_TRUTH_KEY] = ground_truth_dir  # evaluation-only side channel (see ground_truth.py)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            acc, loss = evaluate_global(make_model(settings, split), split, arrays, settings.stack)
            if on_evaluate is not None:
                on_evaluate(server_round, acc, loss)
            return MetricRecord({"accuracy": acc, "loss": loss})

        if stop is not None:
            grid = StoppableGrid(grid, stop)
        strategy.start(grid=grid, initial_arrays=ArrayRecord(model.state_dict()), num_rounds=settings.rounds,
                       train_config=ConfigRecord(config), evaluate_fn=evaluate)

    return app
