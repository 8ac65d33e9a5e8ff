"""Analyses of a batch: neuron exclusivity of every ReLU layer (head and, for CNNs, conv units/channels)."""

from fedleak.analysis.exclusivity import analyze_exclusivity
from fedleak.analysis.report import ConvLayerExclusivity, ExclusivityReport, LayerExclusivity

__all__ = ["ConvLayerExclusivity", "ExclusivityReport", "LayerExclusivity", "analyze_exclusivity"]
