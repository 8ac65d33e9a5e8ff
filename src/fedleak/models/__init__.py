"""Model builders: the networks fedleak studies, seeded (users bring their own ``nn.Module`` too).

Importing this package is cheap (no torch): the built-in models are listed in
:data:`fedleak.models.catalog.MODEL_CATALOG`, and the names below are imported when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedleak.lazy import lazy_attributes
from fedleak.models.catalog import BUILTIN_MODELS, available_models

if TYPE_CHECKING:
    from fedleak.models.flower import FlowerNet
    from fedleak.models.io import load_mlp, save_mlp
    from fedleak.models.mlp import MLP, make_mlp
    from fedleak.models.zoo import LoadedModel, load_model

__all__ = ["MLP", "make_mlp", "load_mlp", "save_mlp", "FlowerNet", "BUILTIN_MODELS", "LoadedModel",
           "available_models", "load_model"]

_LAZY = {
    "FlowerNet": "fedleak.models.flower",
    "load_mlp": "fedleak.models.io",
    "save_mlp": "fedleak.models.io",
    "MLP": "fedleak.models.mlp",
    "make_mlp": "fedleak.models.mlp",
    "LoadedModel": "fedleak.models.zoo",
    "load_model": "fedleak.models.zoo",
}


__getattr__ = lazy_attributes("fedleak.models", _LAZY, globals())
