"""Captured updates on disk: :func:`save_update` writes fedleak's own format (a safetensors file whose metadata
says the kind and the counts the client reported); :func:`load_update` reads it back, or a plain file of tensors
(:mod:`fedleak.tensor_files`) that the model names and tells gradients from weights (:mod:`fedleak.captured`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from fedleak.captured import check_kind, read_captured
from fedleak.errors import UpdateError
from fedleak.report.output import write_bytes_atomic
from fedleak.tensor_files import LISTED, read_tensor_file
from fedleak.updates import ClientUpdate, GradientUpdate, WeightUpdate
from fedleak.validation import MAX_COUNT, parse_int


def save_update(update: ClientUpdate, path: str | os.PathLike[str]) -> Path:
    """Write an update to a safetensors file (atomically: an existing file is replaced only on success)."""
    from safetensors.torch import save

    path = Path(path)
    meta: dict[str, str] = {"format": "fedleak-update", "version": "1"}
    if isinstance(update, GradientUpdate):
        tensors = {f"grad/{k}": v.contiguous() for k, v in update.gradients.items()}
        meta["kind"] = "gradient"
    elif isinstance(update, WeightUpdate):
        tensors = {f"before/{k}": v.contiguous() for k, v in update.before.items()}
        tensors.update({f"after/{k}": v.contiguous() for k, v in update.after.items()})
        meta["kind"] = "weights"
        if update.local_steps is not None:
            meta["local_steps"] = str(int(update.local_steps))
        if update.learning_rate is not None:
            meta["learning_rate"] = repr(float(update.learning_rate))
    else:
        raise UpdateError(f"cannot save a {type(update).__name__}")
    if update.num_examples is not None:
        meta["num_examples"] = str(int(update.num_examples))
    if update.error:
        meta["error"] = repr(float(update.error))
    return write_bytes_atomic(path, save(tensors, metadata=meta))


def _split(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def load_update(path: str | os.PathLike[str], model: nn.Module | None = None, kind: str = "auto") -> ClientUpdate:
    """Read an update written by :func:`save_update`, or a plain file of tensors.

    ``.safetensors`` files are read with safetensors, ``.pt``/``.pth`` files with
    ``torch.load(weights_only=True)``, ``.npz`` files with ``numpy.load(allow_pickle=False)``
    (:func:`~fedleak.tensor_files.read_tensor_file`). A plain file holds a dict of tensors or a list of them, which
    ``model`` names (:func:`~fedleak.captured.named_like`); given ``model``, a plain file of the client's weights
    after local training (a FedAvg client's reply, such as Flower's) is read as a :class:`WeightUpdate` from the
    model's weights, the round's (:func:`~fedleak.captured.read_captured`), and anything else as a gradient;
    ``kind`` (``"gradient"`` or ``"weights"``) says which a plain file holds where the default ``"auto"`` would
    guess wrong (a client that moved its weights more than half their norm). Anything unreadable raises
    :class:`UpdateError` naming the file.
    """
    tensors, meta = read_tensor_file(path, "update", UpdateError, lists=True)
    if LISTED in meta and model is None:
        raise UpdateError(f"update file {path} holds a list of tensors, which only the model can name: pass it "
                          "(load_update(path, model)), or save a dict keyed by model.named_parameters()")
    kind = check_kind(kind)
    if kind != "auto" and meta.get("kind", kind) != kind:
        raise UpdateError(f"update file {path} is fedleak's own and holds a {meta['kind']} update, not {kind}")
    if kind != "auto" and model is None:
        raise UpdateError(f"kind={kind!r} needs the model to read update file {path}: load_update(path, model, kind)")
    if "kind" not in meta and model is not None:  # a plain file: a list, or weights rather than a gradient
        captured, _ = read_captured(model, list(tensors.values()) if LISTED in meta else tensors, kind)
        if isinstance(captured, WeightUpdate):
            return captured
        tensors = captured

    def count(key: str) -> int | None:
        if key not in meta:
            return None
        return parse_int(f"update file {path}: metadata {key}", meta[key], low=1, high=MAX_COUNT, error=UpdateError)

    def number(key: str) -> float | None:
        try:
            return float(meta[key]) if key in meta else None
        except ValueError:
            raise UpdateError(f"update file {path}: metadata {key} must be a number, got {meta[key]!r}") from None

    num = count("num_examples")
    error = number("error") or 0.0
    if meta.get("kind") == "weights":
        return WeightUpdate(_split(tensors, "before/"), _split(tensors, "after/"), num_examples=num,
                            local_steps=count("local_steps"), error=error, learning_rate=number("learning_rate"))
    if meta.get("kind") == "gradient":
        tensors = _split(tensors, "grad/")
    return GradientUpdate(tensors, num_examples=num, error=error)
