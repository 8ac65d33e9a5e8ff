"""Flower's own differential privacy, as defenses selectable by name everywhere.

* ``local-dp``: Flower's ``LocalDpMod`` (``flwr.clientapp.mod``): the client clips its update ``after - before``
  to L2 norm ``clip`` (``compute_clip_model_update``, the FlatClip of McMahan et al. 2018) and adds Gaussian noise
  of std ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon`` to what it sends: the classical Gaussian
  mechanism (Dwork & Roth 2014, Thm A.1), calibrated per round.
* ``central-dp``: Flower's central DP with client-side fixed clipping: the clients clip their update to ``clip``
  (``fixedclipping_mod``) and the server's ``DifferentialPrivacyClientSideFixedClipping`` wrapper adds
  ``N(0, (noise_multiplier * clip / n)^2)`` to the *average* of the ``n`` sampled clients (DP-FedAvg, McMahan et
  al., ICLR 2018).

In ``fedleak federate`` both run as the real Flower mods and strategy wrapper (see
:mod:`fedleak.federation.flower_native`). Everywhere else (audit, evaluation, :func:`defended_gradient`) their
:meth:`apply` calls the same Flower functions those mods call (``flwr.supercore.differential_privacy``), so both
paths do the same math. Flower draws its noise from numpy's global generator: :meth:`LocalDp.apply` seeds it
from the ``generator`` it is given (:func:`flower_seed`) and restores it afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from fedleak.defenses.accounting import ACCOUNTANTS, gaussian_epsilon
from fedleak.defenses.base import (
    Accounting,
    ClientBatch,
    Privacy,
    Tensors,
    UpdateFilter,
    check_choice,
    check_open_range,
    register_defense,
)
from fedleak.defenses.clipping import GROUPINGS, clip_groups
from fedleak.errors import OptionError


def flower_dp() -> Any:
    """Flower's DP helpers (``flwr.supercore.differential_privacy``), or an OptionError saying how to get them."""
    try:
        from flwr.supercore import differential_privacy
    except ImportError:
        raise OptionError("Flower's DP defenses (local-dp, central-dp) call Flower's own functions: "
                          "pip install 'fedleak[flower]'") from None
    return differential_privacy


def flower_seed(generator: torch.Generator) -> int:
    """The seed of numpy's global generator under which Flower's noise is drawn, taken from ``generator``."""
    return int(torch.randint(0, 2**32 - 1, (1,), generator=generator))


@contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """numpy's global generator seeded with ``seed`` inside, restored on exit (Flower's noise draws from it)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(state)


def _as_flower_arrays(update: Tensors) -> tuple[list[str], list[np.ndarray]]:
    """The update as Flower sees it in a reply: ``after - before``, the negative of fedleak's ``before - after``."""
    names = list(update)
    return names, [(-update[n].detach().cpu()).numpy().copy() for n in names]


def flower_clip(arrays: list[np.ndarray], clip: float) -> None:
    """Flower's ``clip_inputs_inplace`` (FlatClip to L2 norm ``clip``); an all-zero update, which it would divide
    by, is left as it is."""
    dp = flower_dp()
    if dp.get_norm(arrays) > 0:
        dp.clip_inputs_inplace(arrays, clip)


def _from_flower_arrays(update: Tensors, names: list[str], arrays: list[np.ndarray]) -> dict[str, torch.Tensor]:
    return {n: (-torch.from_numpy(np.asarray(a))).to(update[n].dtype).to(update[n].device)
            for n, a in zip(names, arrays)}


@register_defense
@dataclass(frozen=True)
class LocalDp(UpdateFilter):
    """Flower's ``LocalDpMod``: clip the update to L2 norm ``clip``, add Gaussian noise calibrated to (``epsilon``,
    ``delta``) per round for an L2 ``sensitivity`` (default ``2 * clip``: any two data sets of the client give
    clipped updates at most that far apart)."""

    name: ClassVar[str] = "local-dp"
    summary: ClassVar[str] = ("Flower's LocalDpMod: clip the update to `clip`, add Gaussian noise calibrated to "
                              "(epsilon, delta) per round")
    source: ClassVar[str] = "Flower LocalDpMod; Gaussian mechanism, Dwork & Roth 2014"
    strengths: ClassVar[tuple[dict[str, object], ...]] = ({"epsilon": 8.0}, {"epsilon": 2.0}, {"epsilon": 0.5})
    known_function: ClassVar[bool] = False

    clip: float = 1.0
    epsilon: float = 1.0
    delta: float = 1e-5
    sensitivity: float | None = None

    def check(self) -> None:
        check_open_range(self, "clip", 0.0, math.inf)
        check_open_range(self, "epsilon", 0.0, math.inf)
        check_open_range(self, "delta", 0.0, 1.0)
        if self.sensitivity is not None:
            check_open_range(self, "sensitivity", 0.0, math.inf)

    @property
    def l2_sensitivity(self) -> float:
        return 2 * self.clip if self.sensitivity is None else float(self.sensitivity)

    @property
    def noise_std(self) -> float:
        """The std LocalDpMod adds: ``sensitivity * sqrt(2 ln(1.25 / delta)) / epsilon``."""
        return self.l2_sensitivity * math.sqrt(2 * math.log(1.25 / self.delta)) / self.epsilon

    def flower_mod(self) -> Any:
        """The Flower mod this defense is: ``LocalDpMod(clip, sensitivity, epsilon, delta)``."""
        from flwr.clientapp.mod import LocalDpMod

        return LocalDpMod(self.clip, self.l2_sensitivity, self.epsilon, self.delta)

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """What LocalDpMod sends, as a change ``before - after``: the same clip and noise functions, numpy's global
        generator seeded by :func:`flower_seed`."""
        dp = flower_dp()
        from flwr.compat.common.parameter import ndarrays_to_parameters, parameters_to_ndarrays

        names, arrays = _as_flower_arrays(update)
        flower_clip(arrays, self.clip)  # what compute_clip_model_update does to after - before
        with numpy_seeded(flower_seed(generator)):
            noised = dp.add_localdp_gaussian_noise_to_params(ndarrays_to_parameters(arrays), self.l2_sensitivity,
                                                             self.epsilon, self.delta)
        return _from_flower_arrays(update, names, parameters_to_ndarrays(noised))

    def privacy(self, accounting: Accounting) -> Privacy:
        """(ε, δ) per round as calibrated, over ``rounds`` by basic composition: (rounds·ε, rounds·δ)."""
        caveat = ("" if self.epsilon < 1 else f"; the classical calibration is proven for epsilon < 1 only, so at "
                  f"epsilon {self.epsilon:g} the per-round guarantee is nominal")
        return Privacy(
            epsilon=accounting.rounds * self.epsilon, delta=accounting.rounds * self.delta, unit="client",
            accountant="basic composition",
            mechanism=(f"Flower LocalDpMod: each round the client clips its update to L2 norm {self.clip:g} and adds "
                       f"Gaussian noise of std {self.noise_std:.4g} (sensitivity {self.l2_sensitivity:g}), "
                       f"(epsilon {self.epsilon:g}, delta {self.delta:g}) per round; {accounting.rounds} round(s) "
                       f"by basic composition{caveat}"))


@register_defense
@dataclass(frozen=True)
class CentralDp(UpdateFilter):
    """Flower's central DP with client-side fixed clipping: each client clips its update to L2 norm ``clip``
    (``fixedclipping_mod``); the server adds ``N(0, (noise_multiplier * clip / n)^2)`` to the average of the
    ``n`` sampled clients (``DifferentialPrivacyClientSideFixedClipping``).

    :meth:`apply` is what the client does, the clipping: the noise goes on the aggregate only, so an individual
    update the server sees is clipped but not noised. That is exactly why an honest-but-curious server still
    reads individual updates: the guarantee covers the released model, not what the server receives.
    """

    name: ClassVar[str] = "central-dp"
    summary: ClassVar[str] = ("Flower's central DP: clients clip to `clip`, the server adds noise to the aggregate "
                              "(each update it sees is only clipped)")
    source: ClassVar[str] = "Flower DifferentialPrivacyClientSideFixedClipping; DP-FedAvg, McMahan et al. 2018"
    strengths: ClassVar[tuple[dict[str, object], ...]] = (
        {"noise_multiplier": 0.5}, {"noise_multiplier": 1.0}, {"noise_multiplier": 2.0})

    noise_multiplier: float = 1.0
    clip: float = 1.0
    accountant: str = "rdp"

    def check(self) -> None:
        check_open_range(self, "clip", 0.0, math.inf)
        check_choice(self, "accountant", ACCOUNTANTS)

    def apply(self, update: Tensors, batch: ClientBatch | None, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The client's clipping, with Flower's ``clip_inputs_inplace`` (what ``fixedclipping_mod`` does)."""
        names, arrays = _as_flower_arrays(update)
        flower_clip(arrays, self.clip)
        return _from_flower_arrays(update, names, arrays)

    def observe(self, simulated: Tensors, observed: Tensors) -> dict[str, torch.Tensor]:
        return clip_groups(simulated, self.clip, GROUPINGS["update"])

    def aggregate_noise(self, clients: int) -> float:
        """What ``DifferentialPrivacyClientSideFixedClipping`` adds to the average: std ``z * clip / clients``."""
        return self.noise_multiplier * self.clip / clients

    def privacy(self, accounting: Accounting) -> Privacy | None:
        """Client-level (ε, δ) of the released aggregates: noise multiplier ``noise_multiplier`` over ``rounds``
        releases at client sampling rate ``client_rate`` (Opacus's accountant); None without noise."""
        if self.noise_multiplier == 0:
            return None
        eps = gaussian_epsilon(self.noise_multiplier, accounting.client_rate, accounting.rounds, accounting.delta,
                               self.accountant)
        return Privacy(
            epsilon=eps, delta=accounting.delta, unit="client", accountant=f"opacus-{self.accountant}",
            mechanism=(f"Flower central DP: clients clip their update to L2 norm {self.clip:g}, the server adds "
                       f"Gaussian noise (multiplier {self.noise_multiplier:g}) to the aggregate; {accounting.rounds} "
                       f"round(s) at client rate {accounting.client_rate:g}. Protects the released model only: the "
                       "server sees each clipped update without noise"))
