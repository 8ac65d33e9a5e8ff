"""A client's defenses together, and the one place where a defended update is computed.

A :class:`DefenseStack` holds any number of batch defenses (applied in order), at most one step defense (it
computes each step's gradient; plain autograd without one) and any number of update filters (applied in
order to what is sent). :func:`defended_gradient` is what a FedSGD client does with one batch; the federation's
clients and :func:`fedleak.clients.local_training` use the same three stages over several local steps.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.autograd_mode import with_autograd
from fedleak.client_loss import PLAIN_LOSS, ClientLoss
from fedleak.data.normalize import Normalization
from fedleak.defenses.base import (
    Accounting,
    BatchDefense,
    ClientBatch,
    Defense,
    Privacy,
    StepDefense,
    UpdateFilter,
    parse_defense,
)
from fedleak.errors import OptionError
from fedleak.updates import GradientUpdate, WeightUpdate, batch_loss, check_client_batch, trainable_parameters

FLOAT_BYTES = 4  # what one dense float32 entry costs on the wire


class WithheldBatch(OptionError):
    """The client's batch defenses left out every sample of the batch: it sends nothing."""


@dataclass(frozen=True)
class DefenseStack:
    """The defenses a client runs, in the order given within each stage."""

    defenses: tuple[Defense, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "defenses", tuple(parse_defense(d) for d in self.defenses))
        steps = [d.name for d in self.defenses if isinstance(d, StepDefense)]
        if len(steps) > 1:
            raise OptionError(f"at most one defense may compute the gradient itself, got {steps}")

    @classmethod
    def of(cls, specs: DefenseStack | Defense | str | Iterable[Defense | str] | None) -> DefenseStack:
        """A stack from a stack, one defense, a spec (``"top-k:ratio=0.1 + quantize:bits=8"`` combines two), a
        sequence of them, or None / "none" (no defense)."""
        if isinstance(specs, DefenseStack):
            return specs
        if specs is None:
            return cls(())
        if isinstance(specs, (str, Defense)):
            specs = [specs]
        items: list[Defense | str] = []
        for s in specs:
            items.extend(p.strip() for p in s.split("+")) if isinstance(s, str) else items.append(s)
        return cls(tuple(s for s in items if not (isinstance(s, str) and s in ("none", ""))))

    @property
    def batch(self) -> tuple[BatchDefense, ...]:
        return tuple(d for d in self.defenses if isinstance(d, BatchDefense))

    @property
    def step(self) -> StepDefense | None:
        return next((d for d in self.defenses if isinstance(d, StepDefense)), None)

    @property
    def filters(self) -> tuple[UpdateFilter, ...]:
        return tuple(d for d in self.defenses if isinstance(d, UpdateFilter))

    @property
    def label(self) -> str:
        return " + ".join(d.label for d in self.defenses) or "none"

    def __bool__(self) -> bool:
        return bool(self.defenses)

    def bind(self, *, data_range: tuple[float, float] | None = None, num_classes: int | None = None,
             normalization: Normalization | None = None) -> DefenseStack:
        """The stack with the data's range and number of classes filled in where a defense left them unset; for data
        normalised before the model, a defense that works per channel (a ``normalization`` field) and was given
        neither gets the ``normalization`` and, as its range, the pixels'."""
        known = {"data_range": None if data_range is None else tuple(float(v) for v in data_range),
                 "num_classes": num_classes}
        out = []
        for d in self.defenses:
            names = {f.name for f in dataclasses.fields(d)}
            per_channel = normalization is not None and "normalization" in names and d.normalization is None \
                and d.data_range is None  # (a range the user gave is in the data's units: left as it is)
            told = {**known, "normalization": normalization, "data_range": normalization.pixel_range} \
                if per_channel else known
            fill = {k: v for k, v in told.items() if k in names and v is not None and getattr(d, k) is None}
            out.append(dataclasses.replace(d, **fill) if fill else d)
        return DefenseStack(tuple(out))

    # --- the three stages -------------------------------------------------------------------------------

    def transform(self, model: nn.Module, inputs: torch.Tensor,
                  labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        for d in self.batch:
            inputs, labels = d(model, inputs, labels)
        return inputs, labels

    def at_inference(self, inputs: torch.Tensor) -> torch.Tensor:
        """Test inputs as the model trained through this stack must see them (see BatchDefense.at_inference)."""
        for d in self.batch:
            inputs = d.at_inference(inputs)
        return inputs

    def shown(self, originals: torch.Tensor, rebuilt: torch.Tensor, *, paired: bool = False) -> torch.Tensor:
        """``originals`` as the client's images show them, for scoring ``rebuilt`` inputs (see
        BatchDefense.shown), the batch defenses in order."""
        for d in self.batch:
            originals = d.shown(originals, rebuilt, paired=paired)
        return originals

    def gradient(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator, loss: ClientLoss = PLAIN_LOSS) -> dict[str, torch.Tensor]:
        """One step's gradient of the mean ``loss`` (the client's; the plain cross-entropy by default): the step
        defense's, else plain autograd. A step defense computes its per-sample gradients of the plain cross-entropy:
        with another loss it is refused."""
        if self.step is not None:
            self.check_loss(loss)
            return self.step.gradient(model, inputs, labels, generator)
        params = trainable_parameters(model)
        grads = torch.autograd.grad(batch_loss(model, inputs, labels, **loss.options()), list(params.values()),
                                    materialize_grads=True)
        return {n: g.detach() for n, g in zip(params, grads)}

    def check_loss(self, loss: ClientLoss) -> None:
        """Refuse a client ``loss`` other than the plain cross-entropy where the stack has a step defense (DP-SGD),
        whose per-sample gradients are the plain cross-entropy's."""
        if self.step is not None and not loss.plain:
            raise OptionError(f"the step defense '{self.step.name}' computes its per-sample gradients of the plain "
                              f"cross-entropy, not of the client's {loss.describe()}: give one of them")

    def filter(self, update: Mapping[str, torch.Tensor], batch: ClientBatch | None,
               generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = dict(update)
        for f in self.filters:
            if f.needs_batch and batch is None:
                raise OptionError(f"defense '{f.name}' needs the client's batch")
            out = f.apply(out, batch, generator)
        return out

    # --- what an attack and an accountant know ---------------------------------------------------------

    def observe(self, simulated: Mapping[str, torch.Tensor],
                observed: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The filters' forward model applied to an update the attacker simulates (see UpdateFilter.observe)."""
        out = dict(simulated)
        for f in self.filters:
            out = f.observe(out, observed)
        return out

    def aggregate_noise(self, clients: int) -> float:
        """The std of the noise the server adds to the average of ``clients`` updates (central DP; 0 without)."""
        return sum(f.aggregate_noise(clients) ** 2 for f in self.filters) ** 0.5

    def privacy(self, accounting: Accounting) -> tuple[Privacy, ...]:
        """Every (ε, δ) guarantee a defense of the stack gives (post-processing by the others keeps it)."""
        return tuple(p for p in (d.privacy(accounting) for d in self.defenses) if p is not None)

    def sent_bytes(self, sent: Mapping[str, torch.Tensor]) -> int:
        """The bytes the client transmits: the last filter's encoding, dense float32 without one."""
        for f in reversed(self.filters):
            size = f.encoded_bytes(sent)
            if size is not None:
                return int(size)
        return FLOAT_BYTES * sum(int(t.numel()) for t in sent.values())


@dataclass(frozen=True)
class DefendedUpdate:
    """What a defended FedSGD client computed from one batch: the update it sends, the batch the gradient was
    computed on (after its batch defenses; labels may be soft), its time and the bytes it sends."""

    update: GradientUpdate
    inputs: torch.Tensor
    labels: torch.Tensor
    seconds: float
    sent_bytes: int


@with_autograd
def defended_gradient(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                      defenses: DefenseStack | Sequence[Defense | str] | Defense | str | None = None,
                      *, seed: int = 0, loss: ClientLoss = PLAIN_LOSS) -> DefendedUpdate:
    """The FedSGD update a client running ``defenses`` sends for the batch ``(inputs, labels)``, the gradient of its
    ``loss`` (the plain mean cross-entropy by default).

    Randomised defenses draw from a generator seeded with ``seed``. A batch defense that withholds every sample
    raises :class:`WithheldBatch` (nothing would be sent).
    """
    stack = DefenseStack.of(defenses)
    model = check_client_batch(model, inputs, labels)
    generator = torch.Generator().manual_seed(int(seed))
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        xs, ys = stack.transform(model, inputs, labels)
        if xs.shape[0] == 0:
            raise WithheldBatch(f"the defenses {stack.label} withheld the whole batch: the client sends nothing")
        check_client_batch(model, xs, ys)
        grads = stack.gradient(model, xs, ys, generator, loss)
        sent = stack.filter(grads, ClientBatch(model, xs, ys), generator)
    seconds = time.perf_counter() - start
    return DefendedUpdate(GradientUpdate(sent, num_examples=int(xs.shape[0])), xs.detach(), ys.detach(), seconds,
                          stack.sent_bytes(sent))


def defend_update(update: GradientUpdate | WeightUpdate,
                  defenses: DefenseStack | Sequence[Defense | str] | Defense | str,
                  *, seed: int = 0, batch: ClientBatch | None = None) -> GradientUpdate | WeightUpdate:
    """``update`` as a client running the update filters of ``defenses`` would send it.

    A weight update is filtered on its change ``before - after`` and sent as ``before - filtered change``; the
    filter's label is recorded in its metadata. Batch and step defenses act before the update exists: pass them to
    :func:`defended_gradient` or the federation instead (an OptionError here).
    """
    stack = DefenseStack.of(defenses)
    early = [d.name for d in stack.defenses if not isinstance(d, UpdateFilter)]
    if early:
        raise OptionError(f"{early} act on the batch or the gradient, not on a finished update; "
                          "use defended_gradient or the federation for them")
    generator = torch.Generator().manual_seed(int(seed))
    if isinstance(update, WeightUpdate):
        delta = update.delta()
        sent = stack.filter(delta, batch, generator)
        after = {k: update.before[k] - sent[k] if k in sent else update.after[k] for k in update.before}
        meta = {**dict(update.metadata), "defense": stack.label}
        return dataclasses.replace(update, after=after, metadata=meta)
    if not isinstance(update, GradientUpdate):
        raise OptionError(f"expected a GradientUpdate or WeightUpdate, got {type(update).__name__}")
    return GradientUpdate(stack.filter(update.gradients, batch, generator), num_examples=update.num_examples)
