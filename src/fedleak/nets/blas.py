"""Which library's BLAS takes the exact attack's float64 products on the CPU: torch's or numpy's.

Their speed depends on the CPU (one thread, torch 2.13.0 with MKL, numpy 2 with OpenBLAS): on an AMD EPYC numpy's
OpenBLAS ran the narrow products of a layer with a few columns 1.2-2.5x faster than torch's MKL; on an Intel Xeon
with AVX-512 torch's MKL ran them up to 2x faster than OpenBLAS (a 1024 x 25088 layer times 9 columns: 21.7 against
45.2 ms; times 41: 40.3 against 74.9 ms), except a Gram product ``A A^T``, which numpy's BLAS takes as one
``syrk`` (half the work; 2000 x 784: 47 against 88 ms). The choice is made once per process from the CPU's vendor,
so a machine always computes the same products the same way. A float32 product (the joint test's random sketch)
goes to torch's BLAS on the same CPUs (a 1024 x 25088 layer times 74 columns: 31.6 against 42.0 ms), but only while
torch's float32 matmul is set to plain IEEE arithmetic (a lower precision would round its inputs to bfloat16).
"""

from __future__ import annotations

import functools
import platform


@functools.cache
def cpu_field(name: str) -> str:
    """The first value of ``name`` in Linux's /proc/cpuinfo (e.g. ``vendor_id``, ``model name``); "" where there
    is none."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return ""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo; ``platform.processor()`` elsewhere, often empty)."""
    return cpu_field("model name") or platform.processor()


@functools.cache
def torch_blas_preferred() -> bool:
    """Whether torch's BLAS takes the float64 products (other than Gram products): torch built with MKL on an
    Intel CPU."""
    import torch

    return torch.backends.mkl.is_available() and cpu_field("vendor_id") == "GenuineIntel"


def ieee_float32_matmul() -> bool:
    """Whether torch's float32 matrix products on the CPU are plain IEEE float32 arithmetic: not set (by
    ``torch.set_float32_matmul_precision`` or the ``fp32_precision`` settings) to round to bfloat16 or TF32."""
    import torch

    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    setting = getattr(mkldnn, "fp32_precision", "none")
    if setting == "none":
        setting = getattr(torch.backends, "fp32_precision", "none")
    return setting in ("none", "ieee")
