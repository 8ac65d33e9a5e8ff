"""Model files: fully connected ReLU networks as safetensors (or ``weights_only`` torch) state dicts.

The architecture is read from the state dict of an ``nn.Sequential``: Linear layers at numeric indices
(``"1.weight"``, ``"1.bias"``, ``"3.weight"``, ...) with a ReLU between consecutive ones, and a Flatten in
front when the first Linear is not at index 0 — exactly what :func:`fedleak.make_mlp` builds, and what
``torch.save(my_sequential.state_dict())`` writes for a user's own Flatten/Linear/ReLU model. Parameter
names are kept, so updates captured from the original model match the loaded one.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.models.mlp import MLP
from fedleak.report.output import write_bytes_atomic
from fedleak.tensor_files import read_tensor_file
from fedleak.validation import check_finite_tensors, check_num_classes, check_shape

_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


def save_mlp(model: nn.Sequential, path: str | os.PathLike[str]) -> Path:
    """Write a model's state dict (and its input shape, if known) to a safetensors file, atomically."""
    from safetensors.torch import save

    meta = {"format": "fedleak-model"}
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        meta["input_shape"] = json.dumps(list(shape))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    return write_bytes_atomic(path, save(tensors, metadata=meta))


def _metadata_shape(path: Path, meta: dict[str, str]) -> tuple[int, ...] | None:
    """The ``input_shape`` a model file records in its metadata (a JSON list), if any."""
    if "input_shape" not in meta:
        return None
    try:
        value = json.loads(meta["input_shape"])
    except json.JSONDecodeError:
        raise ModelError(f"{path}: metadata input_shape {meta['input_shape']!r} is not a JSON list such as "
                         "[1, 28, 28]; rewrite the file with fedleak.save_mlp or pass input_shape") from None
    return check_shape(f"{path}: metadata input_shape", value)


def _check_layer(path: Path, index: int, layer: dict[str, torch.Tensor]) -> None:
    """A Linear layer's state: a 2-d floating-point weight and, if present, a bias of one entry per output."""
    weight = layer.get("weight")
    if weight is None or weight.ndim != 2:
        raise ModelError(f"{path}: layer {index} has no 2-d weight, so it is not a Linear layer")
    for kind, value in layer.items():
        if not value.is_floating_point():
            raise ModelError(f"{path}: '{index}.{kind}' has dtype {value.dtype}; model weights must be floating-point")
    bias = layer.get("bias")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ModelError(f"{path}: '{index}.bias' has shape {tuple(bias.shape)} but layer {index} has "
                         f"{weight.shape[0]} outputs, so the bias needs shape ({weight.shape[0]},)")


def load_mlp(path: str | os.PathLike[str], input_shape: tuple[int, ...] | None = None) -> MLP:
    """Rebuild a fully connected ReLU network from a state-dict file (see the module docstring)."""
    path = Path(path)
    state, meta = read_tensor_file(path, "model", ModelError)
    check_finite_tensors(state.items(), f"{path}: parameter")
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        m = _KEY.match(key)
        if m is None:
            raise ModelError(
                f"{path}: key '{key}' is not a Sequential Linear parameter ('<index>.weight' / '<index>.bias'); "
                "rebuild the model in Python and pass it to fedleak.reconstruct instead"
            )
        layers.setdefault(int(m.group(1)), {})[m.group(2)] = value
    if not layers:
        raise ModelError(f"{path} holds no parameters")
    indices = sorted(layers)
    for i in indices:
        _check_layer(path, i, layers[i])
    check_num_classes(int(layers[indices[-1]]["weight"].shape[0]), f"{path}: the last layer ({indices[-1]})")
    for a, b in zip(indices, indices[1:]):
        if b - a != 2:
            raise ModelError(f"{path}: Linear layers {a} and {b} are not separated by exactly one (ReLU) layer")
        if layers[a]["weight"].shape[0] != layers[b]["weight"].shape[1]:
            raise ModelError(f"{path}: layer {b} takes {layers[b]['weight'].shape[1]} inputs but layer {a} gives "
                             f"{layers[a]['weight'].shape[0]}")
    first = indices[0]
    if first not in (0, 1):
        raise ModelError(f"{path}: the first Linear layer is at index {first}; expected 0 or 1 (after a Flatten)")
    modules: list[nn.Module] = [nn.Flatten()] if first == 1 else []
    for k, i in enumerate(indices):
        w = layers[i]["weight"]
        lin = nn.Linear(w.shape[1], w.shape[0], bias="bias" in layers[i])
        with torch.no_grad():
            lin.weight.copy_(w)
            if "bias" in layers[i]:
                lin.bias.copy_(layers[i]["bias"])
        modules.append(lin)
        if k < len(indices) - 1:
            modules.append(nn.ReLU())
    d_in = layers[first]["weight"].shape[1]
    shape = check_shape("input_shape", input_shape) if input_shape is not None else _metadata_shape(path, meta)
    shape = shape if shape is not None else (d_in,)
    if math.prod(shape) != d_in:
        raise ModelError(f"input shape {shape} has {math.prod(shape)} values but the model takes {d_in}")
    return MLP(modules, shape)
