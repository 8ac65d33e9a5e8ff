"""The fully connected ReLU part of a network: ``Linear (ReLU Linear)*`` on flat inputs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fedleak.nets.cast import cast
from fedleak.nets.layers import Dense


@dataclass(frozen=True, eq=False)
class ReluMLP:
    """``Linear (ReLU Linear)*``: ``dense[h]`` is hidden layer ``h+1`` for ``h < depth``, ``dense[-1]`` the logits.

    ``input_shape`` is the shape of one input of the whole network when this is the whole network (an MLP),
    else None (the head of a CNN reads the flattened conv features).
    """

    dense: tuple[Dense, ...]
    input_shape: tuple[int, ...] | None
    held: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # keeps its casts alive

    @property
    def depth(self) -> int:
        """Number of hidden ReLU layers (H in the algorithms spec)."""
        return len(self.dense) - 1

    @property
    def input_dim(self) -> int:
        return self.dense[0].in_features

    @property
    def num_classes(self) -> int:
        return self.dense[-1].out_features

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(d.out_features for d in self.dense[:-1])

    @property
    def has_all_biases(self) -> bool:
        return all(d.bias_name is not None for d in self.dense)

    @property
    def device(self) -> torch.device:
        return self.dense[0].weight.device

    def weights(self, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """The layers' weights in ``dtype`` (one shared copy per dtype while this head lives; do not modify)."""
        self.held["weights", dtype] = out = [cast(d.weight, dtype) for d in self.dense]
        return out

    def biases(self, dtype: torch.dtype = torch.float64) -> list[torch.Tensor | None]:
        self.held["biases", dtype] = out = [None if d.bias is None else cast(d.bias, dtype)
                                            for d in self.dense]
        return out

    def parameter_names(self) -> list[str]:
        return [n for d in self.dense for n in d.parameter_names()]
