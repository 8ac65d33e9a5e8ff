"""Tensor files a user hands fedleak (model weights, captured updates), read without unpickling anything:
safetensors files (with their string metadata), torch files of tensors (``torch.load(weights_only=True)``) and
numpy ``.npz`` archives (``numpy.load(allow_pickle=False)``: what ``numpy.savez`` writes of Flower's NDArrays).

A file may hold a dict of tensors (or a training checkpoint with one such dict among its entries, such as
``{"model_state_dict": ..., "epoch": 3}``), or (where the caller takes ``lists``) a list of them in order:
``torch.save`` of a list or tuple, or ``numpy.savez(path, *arrays)``; a list comes back keyed ``"0"``, ``"1"``,
... with the metadata key :data:`LISTED`, for the model to name (:func:`fedleak.captured.named_like`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from fedleak.errors import FedleakError

LISTED = "listed"  # the metadata key of a file that held a list of tensors (keyed "0", "1", ... in order)
FORMATS = ".safetensors, a torch file (.pt/.pth/.ckpt/.bin: a dict or list of tensors) or .npz (numpy.savez)"
TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")  # torch.save's files, as trainers name them
_UNSAFE_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")
_POSITIONAL = re.compile(r"arr_(\d+)")  # the names numpy.savez gives arrays passed by position


def read_tensor_file(
    path: str | os.PathLike[str], what: str, error: type[FedleakError], *, lists: bool = False
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and string metadata of a ``.safetensors`` file, or the tensors of a ``.pt``/``.pth`` or
    ``.npz`` file (no metadata).

    Anything missing, empty, unreadable, pickled or not a dict of tensors raises ``error`` naming the file; with
    ``lists``, a list of tensors is read too, keyed by position, with the metadata :data:`LISTED`.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{what} file not found: {path}")
    if path.stat().st_size == 0:
        raise error(f"{what} file {path} is empty")
    kind = _format(path)
    if kind == "torch":
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for corrupt or unsafe files
            raise error(_torch_load_error(path, what, exc)) from None
        if isinstance(obj, (list, tuple)) and obj and all(isinstance(v, torch.Tensor) for v in obj):
            return _listed(path, what, error, list(obj), lists)
        if isinstance(obj, Mapping) and not all(isinstance(v, torch.Tensor) for v in obj.values()):
            obj = _state_of_checkpoint(path, what, error, obj)
        if not isinstance(obj, Mapping):
            kinds = "a dict of tensors" + (" or a list of them" if lists else "")
            raise error(f"{what} file {path} must hold {kinds}, got {type(obj).__name__}")
        return {str(k): v for k, v in obj.items()}, {}
    if kind == "npz":
        return _read_npz(path, what, error, lists)
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        data = path.read_bytes()
        tensors = load(data)
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    except (SafetensorError, ValueError, OSError) as exc:  # json.JSONDecodeError is a ValueError
        known = "" if path.suffix == ".safetensors" else f" (fedleak reads {FORMATS})"
        raise error(f"cannot read {what} file {path} as safetensors: {exc}{known}") from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}


def _format(path: Path) -> str:
    """``"torch"``, ``"npz"`` or ``"safetensors"``: by the file's first bytes (``torch.save`` writes a zip archive
    holding a ``data.pkl``, or an old-style pickle; ``numpy.savez`` a zip of ``.npy`` files; safetensors an 8-byte
    header length, then the JSON header), whatever its suffix says (``save_mlp(model, "net.pt")`` writes
    safetensors); else by the suffix, for that format's own error."""
    import zipfile

    with path.open("rb") as fh:
        head = fh.read(9)
    if head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= path.stat().st_size - 8:  # its header fits
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle's protocol byte: torch's legacy format, which weights_only reads safely
        return "torch"
    if head[:2] == b"PK" and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return "torch" if any(n.endswith("data.pkl") for n in archive.namelist()) else "npz"
    if path.suffix in TORCH_SUFFIXES:
        return "torch"
    return "npz" if path.suffix == ".npz" else "safetensors"


def _state_of_checkpoint(path: Path, what: str, error: type[FedleakError], obj: Mapping) -> Mapping:
    """The one dict of tensors inside a training checkpoint (``{"model_state_dict": ..., "epoch": 3}``, or a
    Lightning checkpoint's ``state_dict``); else ``error`` naming what the file holds."""
    nested = [k for k, v in obj.items() if isinstance(v, Mapping) and v
              and all(isinstance(t, torch.Tensor) for t in v.values())]
    if len(nested) == 1:
        return obj[nested[0]]
    held = ", ".join(f"'{k}' ({type(v).__name__})" for k, v in list(obj.items())[:6])
    which = (f"{len(nested)} dicts of tensors ({', '.join(map(repr, nested[:4]))}), so which one is meant is not "
             "clear" if nested else "no dict of tensors")
    raise error(f"{what} file {path} holds {held}{', ...' if len(obj) > 6 else ''}: {which}; save the state dict "
                "alone (torch.save(model.state_dict(), ...))")


def _listed(path: Path, what: str, error: type[FedleakError], tensors: list[torch.Tensor],
            lists: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A list of tensors keyed by position, where the caller reads lists."""
    if not lists:
        raise error(f"{what} file {path} holds a list of {len(tensors)} tensors, not a dict: save a state dict "
                    "(names to tensors)")
    return {str(k): v for k, v in enumerate(tensors)}, {LISTED: "1"}


def _read_npz(path: Path, what: str, error: type[FedleakError],
              lists: bool) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The arrays of a ``.npz`` archive as tensors: by name, or by position where ``numpy.savez`` named them
    ``arr_0``, ``arr_1``, ...; object arrays are refused (nothing is unpickled)."""
    import zipfile

    import numpy as np

    with path.open("rb") as fh:
        if not fh.read(4).startswith(b"PK"):  # np.load would take anything else for a pickle
            raise error(f"cannot read {what} file {path}: it is not a .npz archive (numpy.savez writes one)")
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        reason = ("it holds pickled Python objects; fedleak never unpickles untrusted files: save numeric arrays "
                  "only" if "allow_pickle" in str(exc) else str(exc) or type(exc).__name__)
        raise error(f"cannot read {what} file {path}: {reason}") from None
    if not arrays:
        raise error(f"{what} file {path} holds no arrays")
    tensors = {}
    for name, array in arrays.items():
        if array.dtype.kind not in "fiub":
            raise error(f"{what} file {path}: array '{name}' has dtype {array.dtype}; numeric arrays are needed")
        tensors[name] = torch.from_numpy(np.array(array))
    positions = [_POSITIONAL.fullmatch(name) for name in tensors]
    if all(positions) and sorted(int(m.group(1)) for m in positions) == list(range(len(tensors))):
        return _listed(path, what, error, [tensors[f"arr_{k}"] for k in range(len(tensors))], lists)
    return tensors, {}


def _torch_load_error(path: Path, what: str, exc: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, without torch's advice to unpickle it anyway."""
    text = str(exc)
    if "Weights only load failed" in text:
        unsafe = _UNSAFE_GLOBAL.search(text)
        reason = (f"it holds pickled Python objects (it asks for '{unsafe.group(1)}')" if unsafe
                  else "it is corrupt or not a torch file of tensors")
        return (f"cannot read {what} file {path}: {reason}. fedleak never unpickles untrusted files; save the "
                f"{what} as a .safetensors file (safetensors.torch.save_file) or as a torch file holding only a "
                "dict of tensors (torch.save(model.state_dict(), ...))")
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return f"cannot read {what} file {path}: {first or type(exc).__name__ + ' (corrupt or truncated file)'}"
