"""Client-side defenses against reconstruction from updates (each a ``BatchTransform`` or update filter)."""

from fedleak.defenses.exclusivity_reduction import (
    ExclusivityReduction,
    ReducedSample,
    ReductionOptions,
    ReductionResult,
    reduce_exclusivity,
)

__all__ = ["ExclusivityReduction", "ReducedSample", "ReductionOptions", "ReductionResult", "reduce_exclusivity"]
