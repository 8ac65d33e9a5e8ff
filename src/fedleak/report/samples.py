"""Every sample's status and reason, in words, for the reports: certified, a false certificate, rebuilt without a
certificate (the attack's reason), not rebuilt (why, from the batch's exclusivity analysis)."""

from __future__ import annotations

from fedleak.analysis.report import ExclusivityReport
from fedleak.metrics import MatchResult
from fedleak.nets.forward import SATURATED_SAMPLE
from fedleak.reconstruction import Reconstruction



def saturated(report: ExclusivityReport | None, i: int) -> bool:
    """Whether the analysis found sent sample ``i`` classified with probability 1."""
    return report is not None and report.saturated is not None and bool(report.saturated[i])


def why_not_rebuilt(report: ExclusivityReport | None, i: int) -> str:
    """Why the attack found nothing for sent sample ``i``, from the batch's exclusivity analysis (None: the model
    was not analysed)."""
    if report is None:
        return "not rebuilt: the attack returned no sample for it"
    if saturated(report, i):
        return f"not rebuilt: {SATURATED_SAMPLE}"
    layers = report.layers
    last = int(layers[-1].effective_exans[i]) if layers else 0
    if layers and last < report.min_last:
        return (f"not rebuilt: {last} effective ExAN(s) at the last ReLU layer (layer {layers[-1].name}); the "
                f"exact attack needs {report.min_last}")
    for layer in layers[:-1]:
        if int(layer.effective_exans[i]) < report.min_other:
            return (f"not rebuilt: {int(layer.effective_exans[i])} effective ExAN(s) at ReLU layer {layer.name}; "
                    f"the exact attack needs {report.min_other}")
    if not bool(report.certifiable[i]):
        return "not rebuilt: its conv blocks cannot be inverted uniquely (see the exclusivity analysis)"
    return "not rebuilt: it meets the ExAN condition, but the attack returned no sample for it"


def sample_reasons(report: ExclusivityReport | None, rec: Reconstruction,
                   scores: MatchResult) -> tuple[list[str], list[str]]:
    """Per sent sample: its status ("certified", "false", "uncertified", "missing") and why."""
    false_reason = dict(scores.false_reasons())
    records = rec.samples if len(rec.samples) == len(rec) else ()
    status, reasons = [], []
    for i, j in enumerate(int(v) for v in scores.matched):
        if j < 0:
            status.append("missing")
            reasons.append(why_not_rebuilt(report, i))
        elif bool(rec.certified[j]):
            status.append("false" if j in false_reason or not scores.recovered[i] else "certified")
            reasons.append(false_reason.get(j, records[j].reason if records else ""))
        else:
            status.append("uncertified")
            own = records[j].reason if records and records[j].reason else "the attack gave no certificate"
            reasons.append(f"{SATURATED_SAMPLE}; the input paired with it: {own}" if saturated(report, i) else own)
    return status, reasons
