"""Models that read token indices (an embedding first): no attack of fedleak rebuilds their inputs."""

from __future__ import annotations

from torch import nn

from fedleak.errors import ModelError
from fedleak.forward_failure import EMBEDDINGS


class TokenInputs(ModelError):
    """The model reads token indices: no input shape or other option makes its inputs rebuildable."""


def token_reader(first: tuple[str, nn.Module | nn.Parameter] | None) -> str:
    """Why a model's inputs cannot be rebuilt when its first layer with weights (``first``: its name and module)
    is an embedding, in words (empty otherwise)."""
    if first is None or not isinstance(first[1], EMBEDDINGS):
        return ""
    name, layer = first
    return (f"the model's first layer with weights, '{name}' ({type(layer).__name__}), reads token indices: fedleak "
            "rebuilds continuous inputs (images, signals, records), not text. Such an update gives away the batch's "
            f"set of tokens without any attack: the rows of '{name}.weight''s gradient that are not zero")
