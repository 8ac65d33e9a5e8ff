"""The built-in models by name, listed without importing torch (``fedleak info``, ``--help`` texts).

:mod:`fedleak.models.zoo` implements them and registers each under its catalog name and description; looking
one up imports it (:class:`fedleak.registry.LazyRegistry`).
"""

from __future__ import annotations

from typing import Any

from fedleak.registry import CatalogEntry, LazyRegistry

_ZOO = "fedleak.models.zoo"

MODEL_CATALOG: tuple[CatalogEntry[str], ...] = (
    CatalogEntry("flower-cnn", _ZOO, "Flower's quickstart-pytorch Net (CIFAR-10 3x32x32): two 5x5 convs with 2x2 "
                 "max pooling, fc 400-120-84-10"),
    CatalogEntry("mlp", _ZOO, "make_mlp((1, 8, 8), [1024], 10): one ReLU layer of 1024 on 8x8 digits"),
    CatalogEntry("convnet", _ZOO, "make_convnet((1, 28, 28), 10, channels=(6, 32), padding=1, fc_widths=(1024,)): "
                 "a certifiable CNN for Fashion-MNIST"),
    CatalogEntry("convnet-digits", _ZOO, "make_convnet((1, 8, 8), 10, channels=(6, 32), padding=1, "
                 "fc_widths=(1024,)): a certifiable CNN for 8x8 digits"),
)

BUILTIN_MODELS: LazyRegistry[Any, str] = LazyRegistry("built-in model", MODEL_CATALOG,
                                                      describe=lambda model: model.description)


def available_models() -> dict[str, str]:
    """Built-in model names and their one-line descriptions (imports nothing heavy)."""
    return dict(BUILTIN_MODELS.descriptions())
