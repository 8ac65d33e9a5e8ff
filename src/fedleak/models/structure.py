"""Read a user's ``torch.nn.Sequential`` into typed layer specs.

Attacks and analyses need to know, layer by layer, what a model computes and which entry of
``model.named_parameters()`` holds each weight and bias. This module walks a (possibly nested)
``nn.Sequential`` and turns it into a tuple of small frozen dataclasses, refusing anything it does not
understand with a :class:`~fedleak.errors.ModelError` that names the offending layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.validation import check_num_classes, check_shape


@dataclass(frozen=True)
class FlattenSpec:
    """``nn.Flatten`` over all but the batch dimension."""

    name: str


@dataclass(frozen=True)
class DenseSpec:
    """An ``nn.Linear`` layer and the names of its parameters in ``named_parameters()``."""

    name: str
    module: nn.Linear
    weight_name: str
    bias_name: str | None

    @property
    def in_features(self) -> int:
        return self.module.in_features

    @property
    def out_features(self) -> int:
        return self.module.out_features


@dataclass(frozen=True)
class ReluSpec:
    """An ``nn.ReLU`` activation."""

    name: str


LayerSpec = FlattenSpec | DenseSpec | ReluSpec


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for child_name, child in module.named_children():
            out.extend(_leaves(child, f"{prefix}.{child_name}" if prefix else child_name))
        return out
    return [(prefix, module)]


def _dense(name: str, module: nn.Linear) -> DenseSpec:
    prefix = f"{name}." if name else ""
    return DenseSpec(
        name=name,
        module=module,
        weight_name=f"{prefix}weight",
        bias_name=f"{prefix}bias" if module.bias is not None else None,
    )


def parse_sequential(model: nn.Module) -> tuple[LayerSpec, ...]:
    """Return the layer specs of ``model``, a (possibly nested) ``nn.Sequential``.

    Supported leaves are ``nn.Flatten`` (before the first dense layer), ``nn.Linear``, ``nn.ReLU`` and
    ``nn.Identity``. Anything else raises :class:`ModelError` naming the layer.
    """
    if not isinstance(model, nn.Sequential):
        raise ModelError(
            f"fedleak needs a torch.nn.Sequential model to know the order of its layers; got {type(model).__name__}"
        )
    specs: list[LayerSpec] = []
    for name, leaf in _leaves(model, ""):
        if isinstance(leaf, nn.Identity):
            continue
        if isinstance(leaf, nn.Flatten):
            if leaf.start_dim != 1 or leaf.end_dim != -1:
                raise ModelError(f"layer '{name}' (Flatten): only Flatten(start_dim=1, end_dim=-1) is supported")
            if any(isinstance(s, DenseSpec) for s in specs):
                raise ModelError(f"layer '{name}' (Flatten): a Flatten after a Linear layer is not supported")
            specs.append(FlattenSpec(name))
        elif isinstance(leaf, nn.Linear):
            specs.append(_dense(name, leaf))
        elif isinstance(leaf, nn.ReLU):
            specs.append(ReluSpec(name))
        else:
            raise ModelError(
                f"layer '{name}' ({type(leaf).__name__}) is not supported: fedleak's exact attacks handle "
                "Flatten, Linear and ReLU layers"
            )
    return tuple(specs)


@dataclass(frozen=True)
class ReluMLP:
    """A fully connected ReLU network: ``Linear (ReLU Linear)*``, optionally after a Flatten.

    ``dense[h]`` is hidden layer ``h+1`` for ``h < depth`` and ``dense[-1]`` is the output layer.
    """

    dense: tuple[DenseSpec, ...]
    input_shape: tuple[int, ...] | None

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

    def weights(self, dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        return [d.module.weight.detach().to(dtype) for d in self.dense]

    def biases(self, dtype: torch.dtype = torch.float64) -> list[torch.Tensor | None]:
        return [None if d.module.bias is None else d.module.bias.detach().to(dtype) for d in self.dense]

    def parameter_names(self) -> list[str]:
        names: list[str] = []
        for d in self.dense:
            names.append(d.weight_name)
            if d.bias_name is not None:
                names.append(d.bias_name)
        return names


def as_relu_mlp(model: nn.Module, input_shape: tuple[int, ...] | None = None) -> ReluMLP:
    """Check that ``model`` is a fully connected ReLU network and describe it.

    ``input_shape`` (without the batch dimension) is taken from ``model.input_shape`` when the model
    was built by :func:`fedleak.make_mlp`, else from the argument, else left unknown.
    """
    specs = parse_sequential(model)
    dense = [s for s in specs if isinstance(s, DenseSpec)]
    if not dense:
        raise ModelError("the model has no Linear layer")
    body = [s for s in specs if not isinstance(s, FlattenSpec)]
    for i, spec in enumerate(body):
        want = DenseSpec if i % 2 == 0 else ReluSpec
        if not isinstance(spec, want):
            kind = "Linear" if want is DenseSpec else "ReLU"
            raise ModelError(
                f"layer '{spec.name}': expected a {kind} here; a fully connected ReLU network alternates "
                "Linear and ReLU and ends with a Linear layer"
            )
    if not isinstance(body[-1], DenseSpec):
        raise ModelError(f"layer '{body[-1].name}': the model must end with a Linear layer (the logits)")
    for prev, nxt in zip(dense, dense[1:]):
        if prev.out_features != nxt.in_features:
            raise ModelError(
                f"layer '{nxt.name}' takes {nxt.in_features} inputs but layer '{prev.name}' gives {prev.out_features}"
            )
    check_num_classes(dense[-1].out_features, f"the output layer '{dense[-1].name}'")
    shape = input_shape if input_shape is not None else getattr(model, "input_shape", None)
    if shape is not None:
        shape = check_shape("input_shape", shape)
        if math.prod(shape) != dense[0].in_features:
            raise ModelError(f"input shape {shape} has {math.prod(shape)} values but the first "
                             f"Linear layer takes {dense[0].in_features}")
    return ReluMLP(dense=tuple(dense), input_shape=shape)
