"""Model builders: the networks fedleak studies, seeded (users bring their own ``nn.Module`` too)."""

from fedleak.models.io import load_mlp, save_mlp
from fedleak.models.mlp import MLP, make_mlp

__all__ = ["MLP", "make_mlp", "load_mlp", "save_mlp"]
