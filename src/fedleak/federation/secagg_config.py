"""The settings of Flower's SecAgg+ in an audited federation, checked before anything starts (Flower-free).

SecAgg+ (Bell et al. 2020; Flower's ``SecAggPlusWorkflow`` and ``secaggplus_mod``) lets the server learn only the
weighted *sum* of the sampled clients' uploads. Each client multiplies its upload by its weight
``round(num_examples / max_weight * T) / T``, clips every entry to ``[-clipping_range, clipping_range]``, maps it
to an integer in ``[0, T]`` (``T = quantization_range``) by stochastic rounding, adds pairwise and private masks
modulo ``2**32``, and sends that; the masks cancel in the sum, which the server dequantizes and divides by the sum
of the weights. So the aggregate the server sees carries two errors on top of float rounding:

* **quantization**: each client's rounding errs by less than one level ``2 * clipping_range / T`` per entry, so
  the aggregate errs by less than ``n * 2 * clipping_range / T / sum(weights)`` per entry (:meth:`SecAggConfig.
  error_bound`): the server knows this bound, since it chose the settings;
* **clipping**: an entry beyond ``clipping_range`` is cut, an error the server cannot bound (it never sees the
  entry); pick ``clipping_range`` above the largest upload entry.

Flower's defaults (``clipping_range`` 8, ``T = 2**22``, ``max_weight`` 1000) are made for weights of order 1; on
a one-step change of a few 1e-3 they leave a relative error of about 1e-2, which is far above what an exact
reconstruction tolerates. Flower quantizes in the upload's dtype: with float32 uploads the error per entry is at
least about ``3e-7 * clipping_range`` whatever ``T`` is (``upload_dtype`` float64 lifts that floor). The sum
must not wrap around the modulus: ``n * T * max(1, num_examples / max_weight) < 2**32`` for ``n`` clients
(checked here for one-step rounds, where ``num_examples`` is the batch size).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedleak.errors import OptionError

if TYPE_CHECKING:
    from fedleak.federation.settings import FederationSettings

MODULUS_RANGE = 2**32  # Flower's default and largest modulus of the masks
INT32_LIMIT = 2**31 - 1  # Flower's client rounds the quantized values into int32
UPLOAD_DTYPES = {"float32": 2.0**-23, "float64": 2.0**-52}  # the dtype a client quantizes in, and its epsilon


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SecAggConfig:
    """Flower's ``SecAggPlusWorkflow`` parameters (same names and meaning).

    ``num_shares``: an int > 2 is the number of neighbours each client shares its keys with (itself included), a
    float in (0, 1] that fraction of the sampled clients. ``reconstruction_threshold``: an int >= 2 (below
    ``num_shares``) is the number of shares that rebuild a key, a float in (0, 1] that fraction of the shares.
    ``clipping_range``, ``quantization_range`` (``T``) and ``max_weight``: see the module docstring.
    ``upload_dtype``: the dtype the client hands to ``secaggplus_mod`` (fedleak's client converts its upload to it):
    Flower quantizes in that dtype, so float32 (a model's own dtype, the usual case) limits the precision whatever
    ``T`` is, and float64 lets ``T`` count.
    """

    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.5
    clipping_range: float = 8.0
    quantization_range: int = 4194304
    max_weight: float = 1000.0
    upload_dtype: str = "float32"

    def check(self, sampled: int, num_examples: int | None) -> None:
        """OptionError naming the first bad parameter, for ``sampled`` clients per round each reporting
        ``num_examples`` (None: not known in advance)."""
        shares, threshold = self.num_shares, self.reconstruction_threshold
        if sampled < 2:
            raise OptionError(f"secure aggregation needs at least 2 clients per round, got {sampled}")
        if _is_int(shares):
            if not 2 < shares <= sampled:
                raise OptionError(f"secagg num_shares as a count must lie in [3, {sampled}] (the clients per round), "
                                  f"got {shares}; or give a fraction in (0, 1]")
        elif not (isinstance(shares, float) and 0 < shares <= 1):
            raise OptionError(f"secagg num_shares must be a count above 2 or a fraction in (0, 1], got {shares!r}")
        if _is_int(threshold):
            top = shares if _is_int(shares) else sampled
            if not 2 <= threshold < top:
                raise OptionError(f"secagg reconstruction_threshold as a count must lie in [2, {top - 1}] (below "
                                  f"num_shares), got {threshold}; or give a fraction in (0, 1]")
        elif not (isinstance(threshold, float) and 0 < threshold <= 1):
            raise OptionError(f"secagg reconstruction_threshold must be a count of at least 2 or a fraction in "
                              f"(0, 1], got {threshold!r}")
        if not (isinstance(self.clipping_range, (int, float)) and math.isfinite(self.clipping_range)
                and self.clipping_range > 0):
            raise OptionError(f"secagg clipping_range must be a positive number, got {self.clipping_range!r}")
        if not (isinstance(self.max_weight, (int, float)) and math.isfinite(self.max_weight) and self.max_weight > 0):
            raise OptionError(f"secagg max_weight must be a positive number, got {self.max_weight!r}")
        if self.upload_dtype not in UPLOAD_DTYPES:
            raise OptionError(f"secagg upload dtype must be one of {', '.join(UPLOAD_DTYPES)}, "
                              f"got {self.upload_dtype!r}")
        q = self.quantization_range
        if not _is_int(q) or not 0 < q <= INT32_LIMIT:
            raise OptionError(f"secagg quantization_range must be a whole number in [1, {INT32_LIMIT}] "
                              f"(Flower rounds into int32), got {q!r}")
        ratio = max(1.0, (num_examples or 0) / self.max_weight)
        if sampled * q * ratio >= MODULUS_RANGE:
            largest = 2 ** int(math.floor(math.log2((MODULUS_RANGE - 1) / (sampled * ratio))))
            raise OptionError(f"secagg quantization_range {q} overflows the 2**32 modulus with {sampled} clients"
                              + (f" weighted {ratio:g}x (num_examples / max_weight)" if ratio > 1 else "")
                              + f": use at most {largest}")

    def weight(self, num_examples: int) -> float:
        """A client's weight as SecAgg+ quantizes it: ``round(num_examples / max_weight * T) / T``."""
        return round(num_examples / self.max_weight * self.quantization_range) / self.quantization_range

    def error_bound(self, num_examples: tuple[int, ...]) -> float:
        """The bound on every entry's quantization error in the aggregate of clients reporting ``num_examples``.
        Each client's entry errs by less than one level ``2c / T`` (stochastic rounding) plus the rounding of
        ``(x + c) * T / (2c)``, which Flower computes in the upload's dtype (about ``3 eps c``: float32 caps the
        useful ``T`` near ``2**24``); the sum is divided by the sum of the weights."""
        c = self.clipping_range
        per_client = 2.0 * c / self.quantization_range + 3.0 * UPLOAD_DTYPES[self.upload_dtype] * c
        total = sum(self.weight(n) for n in num_examples)
        return len(num_examples) * per_client / total if total > 0 else math.inf

    def to_dict(self) -> dict[str, object]:
        return {"num_shares": self.num_shares, "reconstruction_threshold": self.reconstruction_threshold,
                "clipping_range": self.clipping_range, "quantization_range": self.quantization_range,
                "max_weight": self.max_weight, "modulus_range": MODULUS_RANGE, "upload_dtype": self.upload_dtype}


def sampled_per_round(settings: FederationSettings) -> int:
    """How many clients a round samples (Flower's FedAvg rule: ``max(int(clients * fraction_train),
    min_train_nodes)``, every client when ``fraction_train`` is 1)."""
    if settings.fraction_train >= 1:
        return settings.clients
    return max(int(settings.clients * settings.fraction_train), settings.min_train_nodes)


def check_secagg(settings: FederationSettings) -> None:
    """OptionError unless ``settings`` can run under SecAgg+: its parameters (:meth:`SecAggConfig.check`), the
    simulation runtime, and no defense that wraps the server's strategy (SecAgg+ runs Flower's legacy workflow,
    which Flower's Message-API strategy wrappers, e.g. ``central-dp``'s, cannot join)."""
    from fedleak.federation.flower_native import flower_native, native_defenses

    if settings.runtime != "simulation":
        raise OptionError(f"secagg runs on the simulation runtime, not '{settings.runtime}'")
    wrapped = [d.name for d in native_defenses(settings.stack) if flower_native(d).server_wrapper is not None]
    if wrapped:
        raise OptionError(f"defense(s) {wrapped} wrap the server's Message-API strategy, which Flower's SecAgg+ "
                          "workflow cannot run; use a client-side defense (e.g. local-dp) with secagg")
    settings.secagg_config.check(sampled_per_round(settings),
                                 settings.batch_size if settings.local_epochs == 0 else None)
