"""(ε, δ) of DP-SGD: fedleak's numbers are Opacus's accountants' numbers."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from fedleak.defenses import Accounting
from fedleak.defenses.accounting import gaussian_epsilon
from fedleak.defenses.dp_sgd import DPSGD, noise_for_epsilon
from fedleak.errors import OptionError

ACCOUNTANT_CLASSES = {"rdp": RDPAccountant, "prv": PRVAccountant}

# (noise multiplier, sampling rate, steps, delta)
SETTINGS = [(1.0, 0.01, 100, 1e-5), (0.7, 0.05, 30, 1e-6), (2.0, 1.0, 5, 1e-4)]


def opacus_epsilon(accountant: str, z: float, q: float, steps: int, delta: float) -> float:
    """ε straight from Opacus: one accountant step per DP-SGD step."""
    acc = ACCOUNTANT_CLASSES[accountant]()
    for _ in range(steps):
        acc.step(noise_multiplier=z, sample_rate=q)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # Opacus's PRV at sampling rate 1 (log of 0)
@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("z,q,steps,delta", SETTINGS)
def test_gaussian_epsilon_is_opacus(accountant, z, q, steps, delta):
    expected = opacus_epsilon(accountant, z, q, steps, delta)
    assert math.isfinite(expected) and expected > 0
    assert gaussian_epsilon(z, q, steps, delta, accountant) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_dp_sgd_privacy_is_opacus(accountant):
    accounting = Accounting(rounds=4, local_steps=5, batch_size=8, dataset_size=200, delta=1e-5)
    privacy = DPSGD(noise_multiplier=1.1, max_grad_norm=1.0, accountant=accountant).privacy(accounting)
    assert privacy.epsilon == pytest.approx(opacus_epsilon(accountant, 1.1, 8 / 200, 20, 1e-5), rel=1e-9)
    assert privacy.delta == 1e-5 and privacy.unit == "example" and privacy.accountant == f"opacus-{accountant}"
    assert "Poisson" in privacy.mechanism and "fixed-size" in privacy.mechanism
    assert "C=1" in privacy.mechanism and "z=1.1" in privacy.mechanism


def test_rdp_and_prv_agree_roughly():
    rdp, prv = (gaussian_epsilon(1.0, 0.01, 1000, 1e-5, a) for a in ("rdp", "prv"))
    assert prv <= rdp * 1.05 and prv > 0.5 * rdp  # PRV is the tighter of the two


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_decreases_with_noise(accountant):
    accounting = Accounting(rounds=10, local_steps=1, batch_size=8, dataset_size=100)
    eps = [DPSGD(noise_multiplier=z, max_grad_norm=1.0, accountant=accountant).privacy(accounting).epsilon
           for z in (0.6, 1.0, 2.0)]
    assert all(a > b for a, b in zip(eps, eps[1:]))
    assert DPSGD(noise_multiplier=0.0, max_grad_norm=1.0, accountant=accountant).privacy(accounting).epsilon == math.inf


def test_bad_accountant():
    with pytest.raises(OptionError, match="accountant"):
        gaussian_epsilon(1.0, 0.1, 10, 1e-5, "gdp")
    with pytest.raises(OptionError, match=r"accountant.*\['rdp', 'prv'\]"):
        DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, accountant="moments")
    with pytest.raises(OptionError, match="accountant"):
        noise_for_epsilon(1.0, Accounting(), accountant="gdp")


def test_noise_for_epsilon_round_trips():
    accountant, target = "rdp", 4.0  # (the PRV search is the same call to Opacus, many times slower)
    accounting = Accounting(rounds=5, local_steps=4, batch_size=10, dataset_size=500, delta=1e-5)
    z = noise_for_epsilon(target, accounting, accountant)
    eps = DPSGD(noise_multiplier=z, max_grad_norm=1.0, accountant=accountant).privacy(accounting).epsilon
    assert target - 0.05 < eps <= target
    weaker = DPSGD(noise_multiplier=0.9 * z, max_grad_norm=1.0, accountant=accountant)
    assert weaker.privacy(accounting).epsilon > target


def test_noise_for_epsilon_bad_targets():
    for bad in (0.0, -1.0, math.inf, "1"):
        with pytest.raises(OptionError, match="target_epsilon"):
            noise_for_epsilon(bad, Accounting())
