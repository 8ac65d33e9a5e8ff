"""(ε, δ) of the subsampled Gaussian mechanism, from Opacus's accountants.

fedleak computes no privacy bound itself: :func:`gaussian_epsilon` hands the noise multiplier, the sampling
rate and the number of steps to Opacus's RDP accountant (Mironov et al.) or its PRV accountant (Gopi et al.)
and returns what it reports.
"""

from __future__ import annotations

import warnings

from fedleak.errors import OptionError

ACCOUNTANTS = ("rdp", "prv")


def gaussian_epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float,
                     accountant: str = "rdp") -> float:
    """ε after ``steps`` releases of the Gaussian mechanism with noise ``noise_multiplier`` x sensitivity, each
    on a Poisson sample of rate ``sample_rate``, at ``delta``; ``inf`` without noise."""
    if accountant not in ACCOUNTANTS:
        raise OptionError(f"accountant must be one of {list(ACCOUNTANTS)}, got {accountant!r}")
    if not (0 < sample_rate <= 1) or steps < 1 or not (0 < delta < 1) or noise_multiplier < 0:
        raise OptionError(f"privacy accounting needs noise >= 0, a sampling rate in (0, 1], steps >= 1 and delta in "
                          f"(0, 1); got {noise_multiplier}, {sample_rate}, {steps}, {delta}")
    if noise_multiplier == 0:
        return float("inf")
    try:
        from opacus.accountants import create_accountant
    except ImportError:
        raise OptionError("privacy accounting needs Opacus (pip install opacus)") from None
    acc = create_accountant(accountant)
    acc.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    with warnings.catch_warnings():  # PRV at sampling rate 1 warns about log(0), which it handles; RDP that its
        warnings.simplefilter("ignore", RuntimeWarning)  # best order lies at the edge of its grid (ε stays valid)
        warnings.filterwarnings("ignore", message="Optimal order", category=UserWarning)
        return float(acc.get_epsilon(delta=float(delta)))
