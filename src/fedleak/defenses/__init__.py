"""Client-side defenses against reconstruction from updates (each a ``BatchTransform`` or update filter)."""

from fedleak.defenses.exclusivity_reduction import (
    ExclusivityReduction,
    ReducedSample,
    ReductionOptions,
    ReductionResult,
    reduce_exclusivity,
)

__all__ = ["ExclusivityReduction", "ReducedSample", "ReductionOptions", "ReductionResult", "reduce_exclusivity"]

# the DLM paper's two defenses on transmitted weights (issue 4)
from fedleak.defenses.sparsification import sparsify_update  # noqa: E402
from fedleak.defenses.weight_noise import add_weight_noise  # noqa: E402

__all__ += ["add_weight_noise", "sparsify_update"]
