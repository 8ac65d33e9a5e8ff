"""Typed settings of an audited federation, and the data split every party derives from them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache
from pathlib import Path

import torch

from fedleak.client_loss import ClientLoss, check_loss_read
from fedleak.clients.local_optimizers import CLIENT_OPTIMIZERS, LocalOptimizer
from fedleak.clients.mode import check_client_mode
from fedleak.data.normalize import Normalization
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError
from fedleak.federation.audit_pool import check_pool_options
from fedleak.federation.flower_native import check_native_order, needs_weight_upload
from fedleak.federation.runtimes import get_runtime
from fedleak.federation.secagg_config import SecAggConfig, check_secagg


@dataclass(frozen=True)
class FederationSettings:
    """Everything that defines one audited federation run (recorded in ``results.json``).

    Clients train on disjoint partitions of the data set's first ``N - test_size - public_size``
    samples; ``public_size`` samples are the server's public data (imprint quantiles), the last
    ``test_size`` its test set (unset: a fifth of the data set each, at most 1,000). With ``local_epochs == 0``
    every client takes ``local_steps`` SGD steps on batches of ``batch_size`` (one step: the update is ``lr``
    times one batch gradient, which the exact attacks can invert); with ``local_epochs > 0`` it runs that many
    passes over its partition.
    ``transform_options`` go to the server-shipped batch transform (fishing).
    ``defenses``: what every client runs, as specs (``"top-k:ratio=0.1"``, ``"mixup"``; a ``"+"`` inside one spec
    combines, and all specs together form one :class:`~fedleak.defenses.DefenseStack`), checked when the
    settings are built, so a typo fails before anything starts; see ``fedleak info`` for the names.
    ``upload``: what a client sends: ``"delta"`` (FedSGD-style: its change ``lr * sum of gradients``,
    computed exactly; the server applies it, so the model is the same as FedAvg's) or ``"weights"``
    (FedAvg: its new weights; the server's ``before - after`` then carries float32 cancellation error,
    about ``ulp(w) / (lr * |g|)``, which can spoil exact recovery at small learning rates). Flower's DP mods
    clip ``reply - sent`` and so need weights: a defense realised by Flower
    (:mod:`fedleak.federation.flower_native`, e.g. ``local-dp``, ``central-dp``) switches to ``"weights"``.
    ``inject_faults`` (testing): ``"fail:P@R"`` makes partition P raise in round R, ``"malformed:P@R"``
    makes it send NaN weights (``@R`` omitted: every round).
    Scale: ``fraction_train`` and ``min_train_nodes`` are Flower's FedAvg sampling (each round it trains
    ``max(int(clients * fraction_train), min_train_nodes)`` clients, drawn by Flower); ``audit_workers`` worker
    processes attack the updates; ``audit_backlog`` bounds the audit jobs left pending, beyond which a seeded
    sample of a round's updates is audited and the others recorded as not audited
    (:mod:`fedleak.federation.audit_pool`); ``ray_address`` joins an existing Ray cluster for Flower's clients
    (``ray_cpus`` is then the cluster's business; ``client_cpus`` still sets each client's share).
    """

    data: str = "fashion-mnist"
    clients: int = 4
    rounds: int = 2
    threat: str = "honest"
    defenses: tuple[str, ...] = ()
    seed: int = 0
    batch_size: int = 16
    local_steps: int = 1
    local_epochs: int = 0
    lr: float = 0.1
    optimizer: str = "sgd"  # the clients' local optimizer (fedleak.clients.local_optimizers: sgd or adam)
    momentum: float = 0.0  # the clients' SGD momentum (torch's; Flower's quickstart clients train with 0.9)
    weight_decay: float = 0.0  # ... and weight decay (SGD's or Adam's)
    lr_known: bool = True  # the server's attack takes the learning rate it sends its clients (False: it ignores it)
    hidden: tuple[int, ...] = (1000,)
    model: str | None = None  # the clients' model instead of the MLP of ``hidden``: a built-in name or file.py:Class
    weights: str | None = None  # its initial weights (a state-dict file); None: its seeded initialisation
    client_mode: str = "train"  # clients train in model.train() (Dropout, BatchNorm active) or model.eval() mode
    partition: str = "iid"
    alpha: float = 0.5
    test_size: int | None = None  # None: a fifth of the data set, at most HELD_OUT (data_split)
    public_size: int | None = None  # None: the same
    audit: bool = True
    audit_mode: str = "process"
    upload: str = "delta"
    trap_scale: float = 0.8
    imprint_bins: int = 0
    fished_class: int = 0  # the class-fishing server's target class
    transform_options: tuple[tuple[str, float | int | str | bool], ...] = ()
    ray_cpus: int = 1
    client_cpus: float = 1.0
    attack_budget: float = 30.0  # seconds per update for the optimisation route (multi-step updates)
    inject_faults: tuple[str, ...] = field(default=())
    fraction_train: float = 1.0  # Flower's FedAvg: the fraction of clients sampled per round ...
    min_train_nodes: int = 1  # ... but at least this many
    audit_workers: int = 1  # audit worker processes
    audit_backlog: int | None = None  # most audit jobs pending before updates are sampled (None: no bound)
    ray_address: str | None = None  # join this Ray cluster (None: a private local Ray with ray_cpus CPUs)
    runtime: str = "simulation"  # where it runs: a name of fedleak.federation.runtimes (simulation | deployment)
    secagg: bool = False  # Flower's SecAgg+: the server sees only the aggregate (fedleak.federation.secagg)
    secagg_shares: int | float = 1.0  # SecAggPlusWorkflow's num_shares (count > 2, or fraction of the sampled)
    secagg_threshold: int | float = 0.5  # its reconstruction_threshold (count >= 2, or fraction of the shares)
    secagg_clipping_range: float = 8.0  # its clipping_range (Flower's default)
    secagg_quantization_range: int = 4194304  # its quantization_range (Flower's default, 2**22)
    secagg_max_weight: float = 1000.0  # its max_weight (Flower's default)
    secagg_upload_dtype: str = "float32"  # the dtype clients hand to Flower's SecAgg+ mod (it quantizes in it)
    membership_targets: int = 0  # candidate records the server scores every update on (0: no membership scoring)
    membership_ascent: float = 1.0  # the membership-active server's gradient-ascent step on the candidates
    membership_rounds: tuple[int, ...] = ()  # rounds the membership-active server tampers with (none: every round)
    membership_target_loss: float = 0.0  # > 0: line-search the ascent step to raise the candidates' mean loss to this
    membership_max_drift: float = 0.5  # ... keeping the drift of its public-data predictions (nats) within this
    membership_last_layers: int = 0  # ascend on the last this-many parameter tensors only (0: every parameter)
    label_smoothing: float = 0.0  # the loss the clients train with (ClientLoss; the plain cross-entropy by default)
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "hidden", () if self.model is not None else tuple(int(h) for h in self.hidden))
        if self.weights is not None and self.model is None:
            raise FedleakError("weights are the initial weights of a model given by name or file (model=...)")
        # every party builds the model, in processes of their own (Ray's, a SuperNode's): files by absolute path
        object.__setattr__(self, "model", _absolute(self.model))
        object.__setattr__(self, "weights", _absolute(self.weights))
        check_client_mode(self.client_mode)
        object.__setattr__(self, "membership_rounds", tuple(int(r) for r in self.membership_rounds))
        if self.threat == "membership-active" and self.membership_targets == 0:
            object.__setattr__(self, "membership_targets", 64)  # the active server needs candidates
        specs = (self.defenses,) if isinstance(self.defenses, str) else self.defenses
        object.__setattr__(self, "defenses", tuple(str(d) for d in specs))
        stack = self.stack  # OptionError on an unknown defense or a bad parameter, before anything starts
        check_native_order(stack)
        loss = ClientLoss(self.label_smoothing, self.class_weights, self.focal_gamma)  # checked together
        for name, value in loss.options().items():
            object.__setattr__(self, name, value)
        from fedleak.federation.hooks import get_threat

        check_loss_read((get_threat(self.threat).attack,), (stack,), loss)  # the server's attack reads it
        self.local_optimizer  # (FedleakError on an unknown optimizer, a bad momentum or weight decay)
        if needs_weight_upload(stack):
            object.__setattr__(self, "upload", "weights")
        object.__setattr__(self, "inject_faults", tuple(self.inject_faults))
        object.__setattr__(self, "transform_options",
                           tuple((str(k), v) for k, v in dict(self.transform_options).items()))
        checks = [
            (self.clients >= 1, f"clients must be at least 1, got {self.clients}"),
            (self.rounds >= 1, f"rounds must be at least 1, got {self.rounds}"),
            (self.batch_size >= 1, f"batch_size must be positive, got {self.batch_size}"),
            (self.local_steps >= 1, f"local_steps must be positive, got {self.local_steps}"),
            (self.local_epochs >= 0, f"local_epochs must be 0 or more, got {self.local_epochs}"),
            (self.lr > 0, f"lr must be positive, got {self.lr}"),
            (self.fished_class >= 0, f"fished_class must be a class index (0 or more), got {self.fished_class}"),
            (self.threat != "class-fishing" or (self.lr_known and self.local_steps == 1 and self.local_epochs == 0),
             "the class-fishing server reads each update at the learning rate it sets and one local step: drop "
             "--lr-unknown, --local-steps and --local-epochs"),
            (self.model is not None or (len(self.hidden) >= 1 and min(self.hidden) >= 1),
             f"hidden needs positive widths, got {self.hidden}"),
            (self.audit_mode in ("process", "thread", "sync"),
             f"audit mode must be process, thread or sync, got '{self.audit_mode}'"),
            (self.upload in ("delta", "weights"), f"upload must be delta or weights, got '{self.upload}'"),
            (self.ray_cpus >= 1, f"ray_cpus must be at least 1, got {self.ray_cpus}"),
            (self.attack_budget > 0, f"attack_budget must be positive, got {self.attack_budget}"),
            (0 < self.client_cpus <= self.ray_cpus or (self.ray_address is not None and self.client_cpus > 0),
             f"client_cpus must lie in (0, ray_cpus], got {self.client_cpus}"),
            (0 < self.fraction_train <= 1, f"fraction_train must lie in (0, 1], got {self.fraction_train}"),
            (self.membership_targets == 0 or self.membership_targets >= 2 * self.clients,
             f"membership_targets must be 0 (off) or at least 2 x clients = {2 * self.clients}, "
             f"got {self.membership_targets}"),
            (self.membership_ascent >= 0, f"membership_ascent must be 0 or more, got {self.membership_ascent}"),
            (self.membership_target_loss >= 0,
             f"membership_target_loss must be 0 (fixed step) or more, got {self.membership_target_loss}"),
            (self.membership_max_drift > 0, f"membership_max_drift must be positive, got {self.membership_max_drift}"),
            (self.membership_last_layers >= 0,
             f"membership_last_layers must be 0 (every parameter) or more, got {self.membership_last_layers}"),
            (all(1 <= r <= self.rounds for r in self.membership_rounds),
             f"membership_rounds must lie in 1..{self.rounds}, got {list(self.membership_rounds)}"),
            (1 <= self.min_train_nodes <= self.clients,
             f"min_train_nodes must lie in [1, clients={self.clients}], got {self.min_train_nodes}"),
            (self.ray_address is None or bool(str(self.ray_address).strip()),
             "ray_address must name a Ray cluster (e.g. 'auto' or '10.0.0.5:6379') or be left out"),
        ]
        for ok, message in checks:
            if not ok:
                raise FedleakError(message)
        for fault in self.inject_faults:
            parse_fault(fault)
        check_pool_options(self.audit_mode, self.audit_workers, self.audit_backlog)
        get_runtime(self.runtime)  # OptionError naming the runtimes
        if self.secagg:
            check_secagg(self)  # OptionError naming the bad SecAgg+ parameter

    @property
    def secagg_config(self) -> SecAggConfig:
        """The SecAgg+ parameters (used when ``secagg`` is on)."""
        return SecAggConfig(self.secagg_shares, self.secagg_threshold, self.secagg_clipping_range,
                            self.secagg_quantization_range, self.secagg_max_weight, self.secagg_upload_dtype)

    @property
    def stack(self) -> DefenseStack:
        """The clients' defenses, as given (not yet bound to the data)."""
        return DefenseStack.of(self.defenses)

    @property
    def loss(self) -> ClientLoss:
        """The loss the clients train with."""
        return ClientLoss(self.label_smoothing, self.class_weights, self.focal_gamma)

    @property
    def local_optimizer(self) -> LocalOptimizer:
        """The clients' local optimizer (``optimizer``), with their momentum and weight decay."""
        return CLIENT_OPTIMIZERS.get(self.optimizer)(self.momentum, self.weight_decay)

    @property
    def one_step(self) -> bool:
        """True when each client uploads a single SGD step (the exact attacks' setting)."""
        return self.local_epochs == 0 and self.local_steps == 1

    def declared_training(self) -> dict[str, int | float]:
        """What the server knows of the clients' local training from this run configuration (the facts of
        :func:`fedleak.update_kind.describe_update`): steps, or epochs and batch size; the learning rate, unless
        ``lr_known`` is False."""
        rate = {"learning_rate": self.lr} if self.lr_known else {}
        if self.local_epochs == 0:
            return {"local_steps": self.local_steps, "batch_size": self.batch_size, **rate}
        return {"local_epochs": self.local_epochs, "batch_size": self.batch_size, **rate}

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["hidden"] = list(self.hidden)
        d["inject_faults"] = list(self.inject_faults)
        d["defenses"] = list(self.defenses)
        d["transform_options"] = dict(self.transform_options)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederationSettings:
        raw = json.loads(text)
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        if "transform_options" in raw:
            raw["transform_options"] = tuple(dict(raw["transform_options"]).items())
        return cls(**raw)


def _absolute(spec: str | None) -> str | None:
    """A model spec or weights path with its file made absolute where it names an existing file (``net.py:Net``,
    ``weights.pt``); a built-in name, or anything else, as it is."""
    if spec is None:
        return None
    file, _, cls = str(spec).partition(".py:")
    if cls and Path(file + ".py").is_file():
        return f"{Path(file + '.py').resolve()}:{cls}"
    return str(Path(spec).resolve()) if Path(spec).is_file() else str(spec)


def parse_fault(text: str) -> tuple[str, int, int | None]:
    """``"fail:2@1"`` -> ("fail", 2, 1); ``"malformed:0"`` -> ("malformed", 0, None)."""
    try:
        kind, rest = text.split(":", 1)
        part, _, rnd = rest.partition("@")
        if kind not in ("fail", "malformed"):
            raise ValueError
        return kind, int(part), (int(rnd) if rnd else None)
    except ValueError:
        raise FedleakError(f"bad fault '{text}': use fail:PARTITION[@ROUND] or malformed:PARTITION[@ROUND]") from None


@dataclass(frozen=True)
class DataSplit:
    """The federation's data: clients' pool, the server's public set and its test set, the data's
    ``value_range`` (errors are scored in its units) and, for data normalised before the model, its
    ``normalization`` (what fishing and the per-channel defenses keep each channel's range by)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    public_x: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    input_shape: tuple[int, ...]
    num_classes: int
    value_range: tuple[float, float] = (0.0, 1.0)
    normalization: Normalization | None = None


HELD_OUT = 1000  # the most test (and public) samples a federation holds out unless told


@lru_cache(maxsize=4)
def data_split(data: str, test_size: int | None, public_size: int | None) -> DataSplit:
    """The clients' pool, the server's public set and its test set: the data set's last ``test_size`` samples
    are the test set, the ``public_size`` before them the public set, the rest the pool; where the last samples
    miss a class, all three are cut from a fixed shuffle of the data set (:func:`fedleak.data.holdout.split_order`),
    the same for every party. A size left ``None`` is a fifth of the data set, at most :data:`HELD_OUT`."""
    from fedleak.data import load_dataset
    from fedleak.data.holdout import held_out_size, split_order

    ds = load_dataset(data)
    n = len(ds)
    asked = f"test_size={test_size}, public_size={public_size}"
    test_size, public_size = (held_out_size(n, HELD_OUT) if size is None else size for size in (test_size, public_size))
    n_train = n - test_size - public_size
    if test_size < 1 or public_size < 0 or n_train < 1:
        raise FedleakError(f"{ds.name} has {n} samples: too few for {asked} (left unset, each is a fifth of the "
                           f"data set, at most {HELD_OUT})")
    order = split_order(ds.y, test_size)  # a data set sorted by class: a fixed shuffle (fedleak.data.holdout)
    x, y = (ds.x, ds.y) if order is None else (ds.x[order], ds.y[order])
    return DataSplit(x[:n_train], y[:n_train], x[n_train : n_train + public_size],
                     x[n - test_size :], y[n - test_size :], ds.input_shape, ds.num_classes, ds.value_range,
                     ds.normalization)


def make_model(settings: FederationSettings, split: DataSplit):
    """The round's model as every party builds it: the MLP of ``settings.hidden``, or ``settings.model`` (a
    built-in name or the user's ``file.py:Class``, seeded, from ``settings.weights`` where given), checked to
    take the data's inputs and give an output per class (or one logit for two classes: a binary classifier)."""
    if settings.model is None:
        from fedleak.models import make_mlp

        return make_mlp(split.input_shape, list(settings.hidden), split.num_classes, seed=settings.seed)
    from fedleak.models.zoo import load_model_for

    return load_model_for(settings.model, split.input_shape, split.num_classes, weights=settings.weights,
                          seed=settings.seed, binary=True)
