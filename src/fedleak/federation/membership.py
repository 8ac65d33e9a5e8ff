"""Membership inference inside an audited federation: the server's candidate records, the active server's gradient
ascent on them, and the scoring of every client's update against which candidates that client holds.

* :func:`membership_targets`: the candidates (a seeded mix of records from the clients' partitions, the same
  number from each, and held-out records from the server's test set, which no client trains on);
* :func:`ascend_on_targets`: the active server (Nasr, Shokri & Houmansadr, IEEE S&P 2019): before sending the
  round's weights it runs gradient *ascent* on the candidates (each record's own loss gradient, normalised, so
  every candidate gets the same push), so that a client who trains on a candidate pulls its loss down sharply
  while a non-member's stays high; the ``membership-active`` threat of :mod:`fedleak.federation.hooks`;
* :class:`MembershipAuditor`: called by :class:`~fedleak.federation.strategy.AuditFedAvg` with every valid
  update, it scores each candidate from what the server has (the weights it sent and the client's new weights):
  ``loss-drop`` (the candidate's loss at the sent weights minus at the client's), ``loss`` (minus the loss at the
  client's weights: :mod:`fedleak.membership`'s LOSS attack) and ``update-alignment`` (the candidate's gradient at
  the sent weights against the update: :mod:`fedleak.membership`'s attack), and, once a round is complete,
  ``loss-drop-vs-others`` (a candidate's loss drop at this client minus its mean drop at the round's other
  clients: what every client learns from similar data cancels, what only the owner learns stays).

The truth (which candidates a client's partition holds) is evaluation-only: the scores never read it. In a round
whose weights were tampered with the records say ``active``; in the others the server only looked (``passive``).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from fedleak.client_loss import ends_in_sigmoid, predicted_classes
from fedleak.errors import FedleakError
from fedleak.federation.settings import DataSplit, FederationSettings, data_split, make_model
from fedleak.membership.base import Observation, Records, make_membership_attack
from fedleak.membership.metrics import MembershipMetrics, score_membership
from fedleak.membership.signals import parameter_names, per_record_gradients, record_logits, record_losses
from fedleak.model_copy import copy_model, state_copy
from fedleak.updates import WeightUpdate

PASSIVE_SCORES = ("loss-drop", "loss", "update-alignment")
CALIBRATED = "loss-drop-vs-others"
SCORES = (*PASSIVE_SCORES, CALIBRATED)
DEFAULT_TARGETS = 64


@dataclass(frozen=True)
class MembershipTargets:
    """The server's candidate records and, for evaluation only, who holds each: ``owner`` is the partition id of
    a member, -1 for a held-out record (one of the server's test records, in no partition)."""

    records: Records
    owner: torch.Tensor

    def truth(self, partition: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(which candidates to score, which of those are members) for the client holding ``partition``:
        its own members against the held-out records (other clients' members are left out)."""
        keep = (self.owner == partition) | (self.owner < 0)
        return keep, self.owner[keep] == partition


def membership_targets(settings: FederationSettings) -> MembershipTargets:
    """The ``settings.membership_targets`` candidates: half from the clients' partitions (the same number from
    each, drawn from seed ``settings.seed``), half held out (the server's test records)."""
    return _targets(settings.data, settings.test_size, settings.public_size, settings.clients, settings.partition,
                    settings.seed, settings.alpha, settings.batch_size, settings.membership_targets)


@lru_cache(maxsize=4)
def _targets(data: str, test_size: int, public_size: int, clients: int, partition: str, seed: int, alpha: float,
             batch_size: int, count: int) -> MembershipTargets:
    from fedleak.federation.client import client_partition

    settings = FederationSettings(data=data, test_size=test_size, public_size=public_size, clients=clients,
                                  partition=partition, seed=seed, alpha=alpha, batch_size=batch_size)
    split = data_split(data, test_size, public_size)
    per_client = count // 2 // clients
    if per_client < 1:
        raise FedleakError(f"membership_targets={count} gives {clients} client(s) no member candidate each; "
                           f"give at least {2 * clients}")
    gen = torch.Generator().manual_seed(seed + 7919)
    xs, ys, owners = [], [], []
    for pid in range(clients):
        x, y = client_partition(settings, pid)
        if len(y) < per_client:
            raise FedleakError(f"partition {pid} holds {len(y)} samples, fewer than the {per_client} member "
                               "candidates asked of each client; lower membership_targets")
        pick = torch.randperm(len(y), generator=gen)[:per_client]
        xs.append(x[pick]), ys.append(y[pick]), owners.append(torch.full((per_client,), pid))
    held = count - per_client * clients
    if held > len(split.test_y):
        raise FedleakError(f"membership_targets={count} asks for {held} held-out records; the test set holds "
                           f"{len(split.test_y)}")
    pick = torch.randperm(len(split.test_y), generator=gen)[:held]
    xs.append(split.test_x[pick]), ys.append(split.test_y[pick]), owners.append(torch.full((held,), -1))
    return MembershipTargets(Records(torch.cat(xs), torch.cat(ys)), torch.cat(owners))


def attacks_round(settings: FederationSettings, server_round: int) -> bool:
    """Whether the active server tampers with the weights of ``server_round`` (every round when none are named)."""
    return not settings.membership_rounds or server_round in settings.membership_rounds


def ascent_direction(model: nn.Module, records: Records, last: int | None = None) -> tuple[list[str], torch.Tensor]:
    """(parameter names, direction): each record's loss gradient (real autograd) w.r.t. those parameters (every
    trainable one, or the ``last`` tensors), normalised to unit length and averaged over the records."""
    names = parameter_names(model, last)
    direction = torch.zeros(sum(dict(model.named_parameters())[n].numel() for n in names), dtype=torch.float64)
    for start in range(0, len(records), 64):
        part = records.take(torch.arange(start, min(start + 64, len(records))))
        grads = per_record_gradients(model, part, names, chunk=64)
        flat = torch.cat([grads[n].flatten(1) for n in names], dim=1).to(torch.float64)
        direction += (flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)).sum(0)
    return names, direction / len(records)


def _moved(model: nn.Module, names: list[str], direction: torch.Tensor, step: float) -> nn.Module:
    out = copy_model(model)
    params = dict(out.named_parameters())
    offset = 0
    with torch.no_grad():
        for name in names:
            p = params[name]
            p += step * direction[offset:offset + p.numel()].view_as(p).to(p.dtype)
            offset += p.numel()
    return out


@dataclass(frozen=True)
class Ascent:
    """What the active server did to a round's weights: the ``step`` along the candidates' ascent direction, the
    candidates' mean loss before and after, and ``public_drift``: the mean cross-entropy, on the server's public
    inputs, of the tampered model against the untouched model's predicted classes, minus the untouched model's own
    (0: the public predictions did not move)."""

    step: float
    loss_before: float
    loss_after: float
    public_drift: float


def _public_drift(model: nn.Module, tampered: nn.Module, public: torch.Tensor) -> float:
    if len(public) == 0:
        return 0.0
    guessed = Records(public, record_logits(model, Records(public, torch.zeros(len(public), dtype=torch.long)))
                      .argmax(1))
    return float(record_losses(tampered, guessed).mean() - record_losses(model, guessed).mean())


def ascend_on_targets(model: nn.Module, records: Records, step: float, *, target_loss: float = 0.0,
                      public: torch.Tensor | None = None, max_drift: float = 0.5,
                      last: int | None = None) -> tuple[nn.Module, Ascent]:
    """``model`` moved by gradient ascent on ``records`` (a new model, and what was done).

    The direction is :func:`ascent_direction`. With ``target_loss`` 0 the step is ``step``; otherwise a line
    search (doubling, then 20 bisections) picks the step that raises the records' mean cross-entropy to
    ``target_loss`` nats, or less where more would move the predictions on the ``public`` inputs by a drift
    (see :class:`Ascent`) above ``max_drift`` nats."""
    names, direction = ascent_direction(model, records, last)
    public = public if public is not None else torch.empty(0, *records.inputs.shape[1:])
    before = float(record_losses(model, records).mean())

    def within(s: float) -> bool:
        moved = _moved(model, names, direction, s)
        return (float(record_losses(moved, records).mean()) < target_loss
                and _public_drift(model, moved, public) <= max_drift)

    if target_loss > 0:
        lo, hi = 0.0, 1.0
        while within(hi) and hi < 1e6:
            lo, hi = hi, hi * 2
        for _ in range(20):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if within(mid) else (lo, mid)
        step = lo
    tampered = _moved(model, names, direction, step)
    return tampered, Ascent(step, before, float(record_losses(tampered, records).mean()),
                            _public_drift(model, tampered, public))


def tamper_for_membership(model: nn.Module, server_round: int, settings: FederationSettings,
                          split: DataSplit) -> nn.Module:
    """The ``membership-active`` threat's ``tamper``: gradient ascent on the candidates in the attacked rounds
    (:func:`ascend_on_targets` with the settings' step rule)."""
    if not attacks_round(settings, server_round):
        return model
    tampered, _ = ascend_on_targets(model, membership_targets(settings).records, settings.membership_ascent,
                                    **ascent_options(settings, split))
    return tampered


def ascent_options(settings: FederationSettings, split: DataSplit) -> dict[str, object]:
    """The settings' step rule as :func:`ascend_on_targets`'s keyword options."""
    return {"target_loss": settings.membership_target_loss, "public": split.public_x,
            "max_drift": settings.membership_max_drift, "last": settings.membership_last_layers or None}


@dataclass(frozen=True)
class MembershipRecord:
    """One score of one client's update in one round: ``mode`` is ``active`` (the server had tampered with the
    round's weights) or ``passive``; ``metrics`` against the truth of the client's partition (``client`` -1: the
    round's clients pooled, each scored on its own members and the held-out records)."""

    round: int
    client: int
    mode: str
    score: str
    metrics: MembershipMetrics

    def to_dict(self) -> dict[str, object]:
        return {"round": self.round, "client": self.client, "mode": self.mode, "score": self.score,
                **self.metrics.to_dict()}


@dataclass(frozen=True)
class ClientScores:
    """The raw scores of one update (one float per candidate, by score name), kept until the round is complete."""

    round: int
    client: int
    mode: str
    scores: dict[str, torch.Tensor]


def score_update(model: nn.Module, update: WeightUpdate, records: Records) -> dict[str, torch.Tensor]:
    """The passive scores of one client update (see the module docstring): higher means more likely a member;
    each is a registered :mod:`fedleak.membership` attack reading the update."""
    after = copy_model(model)
    after.load_state_dict({**after.state_dict(), **dict(update.after)})
    observation = Observation(model, update=update)
    return {"loss-drop": make_membership_attack("loss-drop").score(observation, records),
            "loss": make_membership_attack("loss").score(Observation(after), records),
            "update-alignment": make_membership_attack("update-alignment").score(observation, records)}


class MembershipAuditor:
    """The honest-but-curious (or active) server's membership scoring of every client update (thread-safe: the
    strategy calls :meth:`observe` from Flower's server thread). :meth:`findings` scores every update against
    the truth, per round, client and score, with ``loss-drop-vs-others`` where a round had other clients."""

    def __init__(self, settings: FederationSettings) -> None:
        self.settings = settings
        self.targets = membership_targets(settings)
        self.model = make_model(settings, data_split(settings.data, settings.test_size, settings.public_size))
        self._scores: list[ClientScores] = []
        self._lock = threading.Lock()
        self.failures: list[str] = []

    def observe(self, server_round: int, partition: int, update: WeightUpdate) -> None:
        """Score ``update`` (the client holding ``partition`` in ``server_round``); never raises."""
        try:
            scores = score_update(self.model, update, self.targets.records)
        except Exception as exc:  # noqa: BLE001 - scoring must not end the federation
            with self._lock:
                self.failures.append(f"round {server_round}, partition {partition}: {type(exc).__name__}: {exc}")
            return
        mode = "active" if self.settings.threat == "membership-active" and attacks_round(self.settings,
                                                                                          server_round) else "passive"
        with self._lock:
            self._scores.append(ClientScores(server_round, partition, mode, scores))

    def findings(self) -> tuple[MembershipRecord, ...]:
        with self._lock:
            raw = sorted(self._scores, key=lambda s: (s.round, s.client))
        out = []
        pooled: dict[tuple[int, str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
        for item in raw:
            if item.client < 0:
                continue
            keep, truth = self.targets.truth(item.client)
            scores = dict(item.scores)
            others = [s.scores["loss-drop"] for s in raw if s.round == item.round and s.client != item.client]
            if others:
                scores[CALIBRATED] = item.scores["loss-drop"] - torch.stack(others).mean(0)
            for name, values in scores.items():
                out.append(MembershipRecord(item.round, item.client, item.mode, name,
                                            score_membership(values[keep], truth)))
                pooled.setdefault((item.round, item.mode, name), []).append((values[keep], truth))
        for (rnd, mode, name), parts in pooled.items():  # client -1: every client's update, pooled
            out.append(MembershipRecord(rnd, -1, mode, name, score_membership(torch.cat([v for v, _ in parts]),
                                                                              torch.cat([t for _, t in parts]))))
        return tuple(out)


def summarize_membership(records: tuple[MembershipRecord, ...]) -> list[tuple[int, str, str, float, float, float]]:
    """Per (round, mode, score): the mean over clients of AUC, TPR at 1 % FPR and balanced accuracy."""
    keys = sorted({(r.round, r.mode, r.score) for r in records}, key=lambda k: (k[0], k[1], SCORES.index(k[2])))
    rows = []
    for rnd, mode, score in keys:
        mine = [r.metrics for r in records if (r.round, r.mode, r.score) == (rnd, mode, score) and r.client >= 0]
        rows.append((rnd, mode, score, float(np.mean([m.auc for m in mine])),
                     float(np.mean([m.tpr_at_1pct_fpr for m in mine])),
                     float(np.mean([m.balanced_accuracy for m in mine]))))
    return rows


def membership_lines(records: tuple[MembershipRecord, ...]) -> list[str]:
    """One console line per round and mode: each score's mean AUC and TPR at 1 % FPR over the clients."""
    lines: dict[tuple[int, str], list[str]] = {}
    for rnd, mode, score, auc, tpr, _ in summarize_membership(records):
        lines.setdefault((rnd, mode), []).append(f"{score} AUC {auc:.3f} (TPR@1%FPR {tpr:.2f})")
    return [f"round {rnd}, {mode} membership inference (mean over clients): " + ", ".join(parts)
            for (rnd, mode), parts in sorted(lines.items())]


def membership_roc_uris(records: tuple[MembershipRecord, ...]) -> list[tuple[str, str]]:
    """Per round: (caption, ROC figure as a data URI) of every score, the round's clients pooled."""
    from fedleak.membership.plots import roc_plot_uri

    out = []
    for rnd, mode in sorted({(r.round, r.mode) for r in records if r.client < 0}):
        curves = {r.score: r.metrics for r in records if (r.round, r.mode, r.client) == (rnd, mode, -1)}
        out.append((f"Round {rnd} ({mode} server): membership ROC of every score, the clients' updates pooled "
                    "(each client's own candidate members against the held-out candidates).",
                    roc_plot_uri(curves, f"round {rnd}, {mode}")))
    return out


@dataclass(frozen=True)
class PairedRound:
    """One attacked round run twice from the same global model (same seed, data, warm-up rounds and local
    batches): once sent as it is (``honest``, the passive server's scores) and once after the active server's
    ascent (``active``); ``accuracy`` is the sent model's test accuracy (honest, tampered)."""

    round: int
    ascent: Ascent
    accuracy: tuple[float, float]
    honest: tuple[MembershipRecord, ...]
    active: tuple[MembershipRecord, ...]


def _train_round(model: nn.Module, settings: FederationSettings, server_round: int,
                 auditor: MembershipAuditor) -> nn.Module:
    """Every client's local training (fedleak's client code, without Flower) from ``model``; each update is
    observed by ``auditor``; returns the example-weighted FedAvg of the clients' weights."""
    from fedleak.federation.client import local_update

    sent = state_copy(model)
    total, summed = 0, {k: torch.zeros_like(v) for k, v in sent.items()}
    for pid in range(settings.clients):
        client = copy_model(model)
        done = local_update(client, settings, pid, server_round)
        auditor.observe(server_round, pid, WeightUpdate(sent, done.weights, num_examples=done.num_examples))
        total += done.num_examples
        summed = {k: summed[k] + done.weights[k] * done.num_examples for k in sent}
    out = copy_model(model)
    out.load_state_dict({k: summed[k] / total for k in sent})
    return out


def _accuracy(model: nn.Module, split: DataSplit) -> float:
    logits = record_logits(model, Records(split.test_x, split.test_y))
    predicted = predicted_classes(logits, probability=ends_in_sigmoid(model, logits))  # a binary classifier too
    return float((predicted == split.test_y).double().mean())


def paired_round(settings: FederationSettings, attacked_round: int) -> PairedRound:
    """:class:`PairedRound` of ``attacked_round`` after ``attacked_round - 1`` honest FedAvg rounds, with the
    ascent of ``settings`` (step rule :func:`ascent_options`) on its candidates."""
    if attacked_round < 1:
        raise FedleakError(f"attacked_round must be 1 or more, got {attacked_round}")
    honest_settings = dataclasses.replace(settings, rounds=attacked_round, threat="honest", membership_rounds=())
    active_settings = dataclasses.replace(honest_settings, threat="membership-active",
                                          membership_rounds=(attacked_round,))
    split = data_split(settings.data, settings.test_size, settings.public_size)
    model = make_model(honest_settings, split)
    warm = MembershipAuditor(honest_settings)
    for rnd in range(1, attacked_round):
        model = _train_round(model, honest_settings, rnd, warm)
    honest, active = MembershipAuditor(honest_settings), MembershipAuditor(active_settings)
    tampered, ascent = ascend_on_targets(model, honest.targets.records, settings.membership_ascent,
                                         **ascent_options(settings, split))
    _train_round(model, honest_settings, attacked_round, honest)
    _train_round(tampered, active_settings, attacked_round, active)
    return PairedRound(attacked_round, ascent, (_accuracy(model, split), _accuracy(tampered, split)),
                       honest.findings(), active.findings())
