"""What a defense evaluation runs: the data, the model, the defense settings, the attacks and the training budget.

The defenses are given as specs. A bare name (``"top-k"``) stands for every strength the defense lists in its
``strengths`` (weakest first); a spec with parameters (``"top-k:ratio=0.01"``) for exactly that setting; ``"+"``
combines defenses (``"clipping:bound=1 + gaussian-noise:sigma=0.01"``). The undefended baseline is always
evaluated.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fedleak.client_loss import ClientLoss, check_loss_read
from fedleak.clients.local_optimizers import CLIENT_OPTIMIZERS, LocalOptimizer
from fedleak.clients.mode import check_client_mode
from fedleak.defenses.base import defense_class, make_defense
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import FedleakError, OptionError
from fedleak.option_fields import validate_fields

# a grid that runs in a few minutes on 2 cores (Fashion-MNIST, the default MLP)
DEFAULT_DEFENSES = ("gaussian-noise", "top-k", "quantize", "sign", "dp-sgd", "mixup")
DEFAULT_ATTACKS = ("exclusivity", "ig")
TEST_SPLITS = {"fashion-mnist-train": "fashion-mnist"}  # test_data="auto": a built-in training set's test split
UPLOADS = ("auto", "delta", "weights")  # what the attacked server reads of a client's round (see the settings)
TEST_SIZE, CLIENT_SIZE = 2000, 500  # the most test samples and samples per client an evaluation takes unless told


@dataclass(frozen=True)
class EvaluationSettings:
    """A grid of defense settings x attacks on one data set and model.

    Data: clients train on ``data`` (``clients`` partitions of ``client_size`` samples, IID); utility is the test
    accuracy on the first ``test_size`` samples of ``test_data`` (``None``: the last ``test_size`` samples of
    ``data``, held out; ``"auto"``: the test split of a built-in training set, :data:`TEST_SPLITS`, else held
    out of ``data``). Unset, ``test_size`` is a fifth of ``data`` when held out of it (else all of ``test_data``),
    at most :data:`TEST_SIZE`, and ``client_size`` an equal share of the clients' data, at most :data:`CLIENT_SIZE`.
    Model: ``model`` (a spec :func:`fedleak.load_model` reads) or an MLP of ``widths`` (with
    ``conv`` channels: a CNN).

    Training (utility and cost): ``rounds`` of federated training; each client takes ``local_steps`` steps per
    round (one: FedSGD; more: FedAvg), each on a fresh batch of ``batch_size`` of its samples at ``lr``, in its
    ``optimizer``'s directions (``"sgd"``: torch's SGD with ``momentum`` and ``weight_decay``; ``"adam"``: torch's
    Adam with ``weight_decay``; :data:`~fedleak.clients.local_optimizers.CLIENT_OPTIMIZERS`), through its
    defenses; the server adds the mean of the changes they send and takes the mean of their buffers (BatchNorm's
    running statistics), as Flower's FedAvg averages every array.

    Leakage: ``trials`` attacked clients, each holding ``local_steps`` batches of ``attack_batch`` distinct samples
    of the clients' data, trained as above through the defenses for one round from the initial model; the server
    reads what it sends as ``upload`` says: ``"delta"`` (FedSGD-style, one step: the change, which the server,
    setting the learning rate, reads as the gradient ``change / lr``, or, not ``lr_known``, at an unknown scale),
    ``"weights"`` (FedAvg: the client's weights before and after, and its number of examples, with the learning
    rate where ``lr_known``), or ``"auto"``: ``"delta"`` for one local step, ``"weights"`` for more. Every attack
    in ``attacks`` runs on it; optimisation attacks run ``attack_iterations`` iterations and are defense-aware
    where the attack supports it. A sample counts as leaked when its best reconstruction reaches
    ``leak_psnr`` dB.

    Loss: ``label_smoothing``, ``class_weights``, ``focal_gamma``: the loss the clients train with in both
    (:class:`~fedleak.client_loss.ClientLoss`; the plain cross-entropy by default), which the attacks are told; an
    attack that reads only a plain cross-entropy's update, or a step defense in the grid (DP-SGD, whose per-sample
    gradients are of the plain cross-entropy), is refused with another loss.
    """

    data: str = "fashion-mnist-train"
    test_data: str | None = "auto"
    client_mode: str = "train"  # clients compute in model.train() (Dropout, BatchNorm active) or eval mode
    test_size: int | None = None
    model: str | None = None
    widths: tuple[int, ...] = (256,)
    conv: tuple[int, ...] = ()
    defenses: tuple[str, ...] = DEFAULT_DEFENSES
    attacks: tuple[str, ...] = DEFAULT_ATTACKS
    attack_batch: int = 4
    trials: int = 2
    attack_iterations: int = 200
    leak_psnr: float = 20.0
    rounds: int = 30
    clients: int = 4
    client_size: int | None = None
    batch_size: int = 32
    lr: float = 0.1
    local_steps: int = 1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    upload: str = "auto"  # resolved to "delta" or "weights" (UPLOADS)
    lr_known: bool = True
    delta: float = 1e-5
    seed: int = 0
    label_smoothing: float = 0.0
    class_weights: tuple[float, ...] | None = None
    focal_gamma: float = 0.0

    def __post_init__(self) -> None:
        check_client_mode(self.client_mode)
        for name, value in self.loss.options().items():  # (checked together)
            object.__setattr__(self, name, value)
        if self.test_data == "auto":
            object.__setattr__(self, "test_data", TEST_SPLITS.get(self.data))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "conv", tuple(int(c) for c in self.conv))
        object.__setattr__(self, "defenses", tuple(str(d) for d in self.defenses))
        object.__setattr__(self, "attacks", tuple(str(a) for a in self.attacks))
        validate_fields(self)
        for name in ("test_size", "attack_batch", "trials", "rounds", "clients", "client_size", "batch_size",
                     "local_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise OptionError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.client_size is not None and self.batch_size > self.client_size:
            raise OptionError(f"batch_size ({self.batch_size}) cannot exceed client_size ({self.client_size})")
        if not self.lr > 0:
            raise OptionError(f"lr must be positive, got {self.lr}")
        self.local_optimizer  # (FedleakError on an unknown optimizer, a bad momentum or weight decay)
        object.__setattr__(self, "upload", self._resolved_upload())
        if not 0 < self.delta < 1:
            raise OptionError(f"delta must lie in (0, 1), got {self.delta}")
        if not self.attacks:
            raise OptionError("at least one attack is needed")
        from fedleak.attacks import get_attack

        for name in self.attacks:
            get_attack(name)
        self.grid()  # every spec parses
        check_loss_read(self.attacks, (), self.loss)
        self._check_defenses_take_loss()

    def _check_defenses_take_loss(self) -> None:
        """Refuse a client loss with the defense specs that cannot carry it (a step defense), naming them and the
        rest of the grid, which can."""
        refused, why = [], ""
        for spec in self.defenses:
            try:
                check_loss_read((), expand(spec), self.loss)
            except FedleakError as err:
                refused.append(spec)
                why = str(err)
        if refused:
            rest = [spec for spec in self.defenses if spec not in refused]
            raise OptionError(f"{why}; the evaluation's defenses {', '.join(refused)} cannot run with that loss: "
                              f"evaluate the others ({', '.join(rest) or 'none'}), or the plain cross-entropy")

    def _resolved_upload(self) -> str:
        if self.upload not in UPLOADS:
            raise OptionError(f"upload must be one of {', '.join(UPLOADS)}, got {self.upload!r}")
        if self.upload == "auto":
            return "delta" if self.local_steps == 1 else "weights"
        if self.upload == "delta" and self.local_steps > 1:
            raise OptionError(f"upload='delta' is one step's change, read as its gradient; a client of "
                              f"local_steps={self.local_steps} sends its weights after training (FedAvg): pass "
                              "upload='weights', or local_steps=1")
        return self.upload

    def training(self) -> str:
        """How the clients train and what the server reads, in words (``3 steps of sgd (momentum 0.9) on 8 samples
        at lr 0.1; the server reads their weights (lr known)``)."""
        said = [f"momentum {self.momentum:g}"] if self.momentum else []
        said += [f"weight decay {self.weight_decay:g}"] if self.weight_decay else []
        options = f" ({', '.join(said)})" if said else ""
        steps = "one step" if self.local_steps == 1 else f"{self.local_steps} steps"
        known = "known" if self.lr_known else "unknown"
        reads = f"the change (lr {known})" if self.upload == "delta" else f"their weights (lr {known})"
        return (f"{steps} of {self.optimizer}{options} on {self.batch_size} samples at lr {self.lr:g}; the server "
                f"reads {reads}")

    @property
    def local_optimizer(self) -> LocalOptimizer:
        """The clients' local optimizer (``optimizer``), with their momentum and weight decay."""
        return CLIENT_OPTIMIZERS.get(self.optimizer)(self.momentum, self.weight_decay)

    @property
    def loss(self) -> ClientLoss:
        """The loss the clients train with."""
        return ClientLoss(self.label_smoothing, self.class_weights, self.focal_gamma)

    def grid(self) -> tuple[DefenseStack, ...]:
        """The defense settings evaluated: the baseline first, then each spec's settings (duplicates dropped)."""
        stacks = [DefenseStack(())]
        for spec in self.defenses:
            for stack in expand(spec):
                if stack.label not in {s.label for s in stacks}:
                    stacks.append(stack)
        return tuple(stacks)

    def to_dict(self) -> dict[str, object]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


def expand(spec: str) -> tuple[DefenseStack, ...]:
    """The stacks one spec stands for: a bare defense name alone is one stack per listed strength."""
    text = spec.strip()
    if text == "none":
        return (DefenseStack(()),)
    if "+" not in text and ":" not in text:
        cls = defense_class(text)
        return tuple(DefenseStack((make_defense(text, **dict(s)),)) for s in cls.strengths)
    return (DefenseStack.of(text),)
