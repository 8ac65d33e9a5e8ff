"""Analyses of a batch: neuron exclusivity and the per-sample passes behind it."""

from fedleak.analysis.exclusivity import ExclusivityReport, LayerExclusivity, analyze_exclusivity

__all__ = ["ExclusivityReport", "LayerExclusivity", "analyze_exclusivity"]
