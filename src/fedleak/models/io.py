"""Model files: fully connected ReLU networks as safetensors (or ``weights_only`` torch) state dicts.

The architecture is read from the state dict of an ``nn.Sequential``: Linear layers at numeric indices
(``"1.weight"``, ``"1.bias"``, ``"3.weight"``, ...) with a ReLU between consecutive ones, and a Flatten in
front when the first Linear is not at index 0 — exactly what :func:`fedleak.make_mlp` builds, and what
``torch.save(my_sequential.state_dict())`` writes for a user's own Flatten/Linear/ReLU model. Parameter
names are kept, so updates captured from the original model match the loaded one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from fedleak.errors import ModelError
from fedleak.models.mlp import MLP
from fedleak.updates import _atomic_write_bytes

_KEY = re.compile(r"^(\d+)\.(weight|bias)$")


def save_mlp(model: nn.Sequential, path: str | os.PathLike[str]) -> Path:
    """Write a model's state dict (and its input shape, if known) to a safetensors file, atomically."""
    from safetensors.torch import save

    meta = {"format": "fedleak-model"}
    shape = getattr(model, "input_shape", None)
    if shape is not None:
        meta["input_shape"] = json.dumps(list(shape))
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    path = Path(path)
    _atomic_write_bytes(path, save(tensors, metadata=meta))
    return path


def _read_state(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not path.is_file():
        raise ModelError(f"model file not found: {path}")
    if path.suffix in {".pt", ".pth"}:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise ModelError(f"cannot read model file {path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ModelError(f"model file {path} must hold a state dict (a dict of tensors)")
        return dict(state), {}
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        state = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError, OSError) as exc:
        raise ModelError(f"cannot read model file {path}: {exc}") from None
    return state, header.get("__metadata__", {}) or {}


def load_mlp(path: str | os.PathLike[str], input_shape: tuple[int, ...] | None = None) -> MLP:
    """Rebuild a fully connected ReLU network from a state-dict file (see the module docstring)."""
    path = Path(path)
    state, meta = _read_state(path)
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
        if "weight" not in layers[i] or layers[i]["weight"].ndim != 2:
            raise ModelError(f"{path}: layer {i} has no 2-d weight, so it is not a Linear layer")
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
    if input_shape is None and "input_shape" in meta:
        input_shape = tuple(json.loads(meta["input_shape"]))
    shape = tuple(input_shape) if input_shape is not None else (d_in,)
    if int(torch.tensor(shape).prod()) != d_in:
        raise ModelError(f"input shape {shape} has {int(torch.tensor(shape).prod())} values but the model takes {d_in}")
    return MLP(modules, shape)
