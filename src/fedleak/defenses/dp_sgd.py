"""DP-SGD (Abadi et al., "Deep Learning with Differential Privacy", CCS 2016), computed by Opacus
(Yousefpour et al., "Opacus: User-Friendly Differential Privacy Library in PyTorch", 2021).

Each local step's gradient is what Opacus's ``DPOptimizer`` makes of the batch: every sample's whole gradient
(all trainable parameters together, from Opacus's ``GradSampleModule``) is clipped to L2 norm ``C``
(``max_grad_norm``), the clipped gradients are summed, Gaussian noise of standard deviation ``z * C``
(``noise_multiplier`` z) is added to every entry, and the sum is divided by the batch size ``M``. Its
(ε, δ) per training example comes from Opacus's RDP or PRV accountant (:func:`gaussian_epsilon`).

fedleak attaches Opacus to the user's model only for the step and leaves it exactly as it was (no hooks, no
Opacus attributes, the same ``.grad`` fields, the same training flags). Models Opacus cannot give per-sample
gradients for (BatchNorm, whose running statistics mix the samples) are refused with an
:class:`~fedleak.errors.OptionError` that says how to fix them.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from fedleak.autograd_mode import autograd_on
from fedleak.defenses.accounting import ACCOUNTANTS, gaussian_epsilon
from fedleak.defenses.base import Accounting, Privacy, StepDefense, check_choice, check_open_range, register_defense
from fedleak.errors import ModelError, OptionError
from fedleak.updates import batch_loss, trainable_parameters
from fedleak.validation import describe

FIX_ADVICE = ("replace BatchNorm by GroupNorm (opacus.validators.ModuleValidator.fix(model) swaps every "
              "unsupported layer for a supported one: BatchNorm -> GroupNorm, LSTM -> DPLSTM)")


@register_defense
@dataclass(frozen=True)
class DPSGD(StepDefense):
    """DP-SGD: per-sample clipping to ``max_grad_norm`` C, Gaussian noise ``noise_multiplier`` x C on the sum,
    divided by the batch size (Opacus's ``DPOptimizer``); ε from Opacus's ``accountant`` ("rdp" or "prv")."""

    name: ClassVar[str] = "dp-sgd"
    summary: ClassVar[str] = "per-sample gradient clipping to C and Gaussian noise z*C (Opacus)"
    source: ClassVar[str] = "Abadi et al., CCS 2016; Opacus, Yousefpour et al. 2021"
    # C = 1 lies below every per-sample gradient norm of an MLP on Fashion-MNIST (about 3.5 to 11 at
    # initialisation), so every sample is clipped to the same norm C and the noise z*C is z times one sample's
    # contribution: z alone sets the signal-to-noise ratio (Opacus's MNIST example also uses C = 1).
    strengths: ClassVar[tuple[dict[str, object], ...]] = (
        {"noise_multiplier": 0.5, "max_grad_norm": 1.0},
        {"noise_multiplier": 1.0, "max_grad_norm": 1.0},
        {"noise_multiplier": 2.0, "max_grad_norm": 1.0},
    )

    noise_multiplier: float
    max_grad_norm: float
    accountant: str = "rdp"

    def check(self) -> None:
        check_open_range(self, "max_grad_norm", 0.0, float("inf"))
        check_choice(self, "accountant", ACCOUNTANTS)

    def gradient(self, model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor,
                 generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The DP-SGD gradient of the batch, by Opacus; the noise is drawn from ``generator``."""
        from opacus.optimizers import DPOptimizer

        params = trainable_parameters(model)
        if not params:
            raise ModelError("the model has no trainable parameters (every parameter has requires_grad=False)")
        check_opacus_supports(model)
        device = next(iter(params.values())).device
        with _quiet(), opacus_attached(model), autograd_on():
            optimizer = DPOptimizer(
                torch.optim.SGD(list(params.values()), lr=0.0),
                noise_multiplier=float(self.noise_multiplier),
                max_grad_norm=float(self.max_grad_norm),
                expected_batch_size=int(inputs.shape[0]),
                loss_reduction="mean",
                generator=_device_generator(generator, device),
            )
            batch_loss(model, inputs, labels).backward()  # mean loss: Opacus rescales to per-sample gradients
            unused = [n for n, p in params.items() if getattr(p, "grad_sample", None) is None]
            if unused:
                raise ModelError(f"defense 'dp-sgd': the trainable parameter(s) {unused} get no gradient from the "
                                 "batch (the forward pass does not use them); freeze them with requires_grad_(False)")
            optimizer.pre_step()  # clip each sample, sum, add noise, divide by the batch size
            return {n: p.grad.detach().clone() for n, p in params.items()}

    def privacy(self, accounting: Accounting) -> Privacy:
        steps = accounting.rounds * accounting.local_steps
        q = accounting.sample_rate
        epsilon = gaussian_epsilon(self.noise_multiplier, q, steps, accounting.delta, self.accountant)
        mechanism = (f"DP-SGD: per-sample clipping to C={self.max_grad_norm:g}, Gaussian noise z*C with "
                     f"z={self.noise_multiplier:g} on the sum, divided by the batch size; {steps} step(s) at sampling "
                     f"rate {q:g}. Poisson-sampling analysis: fedleak's clients draw fixed-size batches while the "
                     "accountant assumes Poisson sampling (as Opacus's own non-Poisson mode does)")
        return Privacy(epsilon=epsilon, delta=accounting.delta, unit="example",
                       accountant=f"opacus-{self.accountant}", mechanism=mechanism)


def noise_for_epsilon(target_epsilon: float, accounting: Accounting, accountant: str = "rdp") -> float:
    """The noise multiplier z that DP-SGD needs for ``target_epsilon`` at ``accounting``'s δ, sampling rate and
    ``rounds x local_steps`` steps, by Opacus's ``get_noise_multiplier`` (its ε is at most the target)."""
    if accountant not in ACCOUNTANTS:
        raise OptionError(f"accountant must be one of {list(ACCOUNTANTS)}, got {describe(accountant)}")
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, (int, float)) or \
            not 0 < float(target_epsilon) < float("inf"):
        raise OptionError(f"target_epsilon must be a finite number > 0, got {describe(target_epsilon)}")
    from opacus.accountants.utils import get_noise_multiplier

    try:
        with _quiet():  # the search tries tiny noise levels, where RDP warns about its range of orders
            return float(get_noise_multiplier(
                target_epsilon=float(target_epsilon), target_delta=accounting.delta,
                sample_rate=accounting.sample_rate, steps=accounting.rounds * accounting.local_steps,
                accountant=accountant))
    except ValueError as exc:  # "The privacy budget is too low."
        raise OptionError(f"no noise multiplier reaches target_epsilon={target_epsilon:g} at delta="
                          f"{accounting.delta:g} ({exc})") from None


def check_opacus_supports(model: nn.Module) -> None:
    """Raise :class:`OptionError` if Opacus cannot compute per-sample gradients of ``model``, naming the layers
    and Opacus's reason: what ``opacus.validators.ModuleValidator`` refuses (BatchNorm, nn.LSTM, InstanceNorm
    with running statistics), and layers with both trainable parameters and buffers."""
    from opacus.validators import ModuleValidator

    problems = []
    for name, m in model.named_modules():
        validator = ModuleValidator.VALIDATORS.get(type(m))
        reasons = [str(e).split(". ")[0].rstrip(".") for e in validator(m)] if validator else []
        if not reasons and any(p.requires_grad for p in m.parameters(recurse=False)) and \
                any(True for _ in m.buffers(recurse=False)):
            reasons = ["it has trainable parameters and buffers, which Opacus does not support"]
        problems += [f"layer '{name or '(the model)'}' ({type(m).__name__}): {r}" for r in reasons]
    if problems:
        raise OptionError(f"defense 'dp-sgd' cannot compute per-sample gradients of this model: "
                          f"{'; '.join(problems)}. To use DP-SGD, {FIX_ADVICE}")


@contextlib.contextmanager
def opacus_attached(model: nn.Module) -> Iterator[None]:
    """Opacus's per-sample-gradient hooks on ``model`` for the duration, and afterwards the model as it was:
    hooks removed, every attribute Opacus set on modules and parameters deleted, ``.grad`` fields and
    training flags restored. Inside, the trainable parameters start with ``.grad = None``."""
    from opacus import GradSampleModule

    modules = list(model.modules())
    params = list(model.parameters())
    module_state = [(m, set(vars(m)), m.training, m.__dict__.get("_is_full_backward_hook")) for m in modules]
    param_state = [(p, set(vars(p)), p.grad) for p in params]
    for p in params:
        p.grad = None
    # Opacus records a layer's activations only in training mode: the layers that hold parameters are switched
    # to it (Linear, Conv, LayerNorm, GroupNorm act the same in both; Dropout and the model's own flag are left)
    for m in modules:
        if any(True for _ in m.parameters(recurse=False)):
            m.training = True
    gsm = None
    try:
        try:
            gsm = GradSampleModule(model, loss_reduction="mean", strict=True)
        except NotImplementedError as exc:  # a trainable layer with buffers
            raise OptionError(f"defense 'dp-sgd' cannot compute per-sample gradients of this model: {exc}. "
                              f"To use DP-SGD, {FIX_ADVICE}") from None
        yield
    finally:
        if gsm is not None:
            gsm.remove_hooks()
        for m, keys, training, full_hook in module_state:
            for key in set(vars(m)) - keys:
                delattr(m, key)
            m.training = training
            if "_is_full_backward_hook" in keys:
                m.__dict__["_is_full_backward_hook"] = full_hook
        for p, keys, grad in param_state:
            for key in set(vars(p)) - keys:
                delattr(p, key)
            p.grad = grad


def _device_generator(generator: torch.Generator, device: torch.device) -> torch.Generator:
    """``generator`` itself on its device, else a generator on ``device`` seeded from it (reproducibly)."""
    if generator.device.type == device.type:
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.Generator(device=device).manual_seed(seed)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence warnings that are Opacus's business, not the user's (errors still raise)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", module=r"opacus(\.|$)")  # e.g. RDP's range of orders, PRV's log(0) at q=1
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG", category=UserWarning)
        yield


__all__ = ["DPSGD", "check_opacus_supports", "noise_for_epsilon", "opacus_attached"]
