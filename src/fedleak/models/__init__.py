"""Models: builders and the typed description of a user's ``nn.Sequential``."""

from fedleak.models.io import load_mlp, save_mlp
from fedleak.models.mlp import MLP, make_mlp
from fedleak.models.structure import DenseSpec, FlattenSpec, ReluMLP, ReluSpec, as_relu_mlp, parse_sequential

__all__ = ["MLP", "make_mlp", "load_mlp", "save_mlp", "DenseSpec", "FlattenSpec", "ReluSpec", "ReluMLP", "as_relu_mlp", "parse_sequential"]
