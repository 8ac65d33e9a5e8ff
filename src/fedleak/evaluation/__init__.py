"""Defenses against attacks, with the utility and cost they take: ``fedleak.evaluate`` and ``fedleak evaluate``."""

from fedleak.evaluation.cells import DefenseRow, LeakageCell, UtilityCell, pareto_front
from fedleak.evaluation.report import write_evaluation
from fedleak.evaluation.run import Evaluation, evaluate
from fedleak.evaluation.settings import DEFAULT_ATTACKS, DEFAULT_DEFENSES, EvaluationSettings, expand

__all__ = ["DEFAULT_ATTACKS", "DEFAULT_DEFENSES", "DefenseRow", "Evaluation", "EvaluationSettings", "LeakageCell",
           "UtilityCell", "evaluate", "expand", "pareto_front", "write_evaluation"]
