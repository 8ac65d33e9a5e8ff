"""The plan as text: the verdict line first, then aligned tables, then what to change and what to run."""

from __future__ import annotations

from fedleak.plan.result import STATUS_UNDERDETERMINED, Plan, layer_label


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]], indent: str = "  ") -> list[str]:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    cells = [header, *rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: tuple[str, ...]) -> str:
        parts = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:])]
        return (indent + "  ".join(parts)).rstrip()

    return [line(r) for r in cells]


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def render(plan: Plan) -> str:
    lines = [f"VERDICT: {plan.verdict}", ""]
    lines.append(f"model     {plan.model}: input {_shape(plan.input_shape)}, {plan.parameters:,} parameters")
    lines.append(f"counts    {plan.evidence.description}")
    if plan.update is not None:
        lines.append(f"update    {plan.update.summary()}")
        lines += [f"          - {e}" for e in plan.update.evidence]
    if plan.blocks:
        lines += ["", "Conv blocks: equations the exact route reads per sample (non-zero output units) vs the unknowns "
                      "it must find"]
        rows = [(layer_label(b.name), f"{b.unknowns} ({_shape(b.in_shape)})", b.pooling or "none",
                 f"{b.max_equations} ({_shape(b.out_shape)})", f"{b.equations_median:g}", str(b.equations_min),
                 _pct(b.fraction), f"{b.proven}/{b.proof_samples}" if b.proof_samples else "-", b.status)
                for b in plan.blocks]
        lines += _table(("block", "unknowns", "pooling", "at most", "median", "min", "enough", "proven", "status"),
                        rows)
        lines += [f"  - {b.reason()}" for b in plan.blocks]
        for b in plan.blocks:
            if b.unpooled_median is None:
                continue
            line = f"  - {layer_label(b.name)} without its pooling: median {b.unpooled_median:g} active units"
            if b.status == STATUS_UNDERDETERMINED:
                line += ("; no channel count keeping the pooling gives enough" if b.channels_keeping_pool is None else
                         f"; keeping the pooling, {b.channels_keeping_pool} channels would give enough equations, "
                         "still unproven")
            lines.append(line)
    if plan.dense:
        sizes = [a.batch_size for a in plan.dense[0].at]
        lines += ["", "Dense ReLU layers: exclusively activated neurons (ExANs) per sample, and the share of samples "
                      "with the ExANs they need"]
        header = ("layer", "width", "need", *(f"batch {m}" for m in sizes), "alone up to")
        rows = [(layer_label(d.name), str(d.width), str(d.need),
                 *(f"{a.mean_exans:.1f} / {_pct(a.fraction)}" for a in d.at),
                 f"{'>=' if d.capped else ''}{d.max_batch_size}") for d in plan.dense]
        lines += _table(header, rows)
        lines += [f"  - {d.reason()}" for d in plan.dense]
    if plan.estimates:
        lines += ["", f"Batch sizes: samples the exact route can certify (target {_pct(plan.target)})"]
        peeled = plan.estimates[0].one_reading is not None
        rows = [(str(e.batch_size), _pct(e.fraction), *((_pct(e.one_reading),) if peeled else ()), _pct(e.whole_batch),
                 layer_label(e.limited_by) if e.limited_by else "-") for e in plan.estimates]
        lines += _table(("batch", "samples", *(("first reading",) if peeled else ()), "whole batch", "limited by"),
                        rows)
        up_to = f"{'at least ' if plan.capped else ''}{plan.max_batch_size}" if plan.max_batch_size else "none"
        lines.append(f"  largest batch size with at least {_pct(plan.target)} certifiable: {up_to}")
    if plan.proposal is not None:
        p = plan.proposal
        title = (f"Smallest change for batches of {p.batch_size} (checked by this plan's counting: {_pct(p.fraction)} "
                 "of the samples certifiable)" if p.checked else
                 f"Changes toward batches of {p.batch_size} (not enough by this plan's counting: {_pct(p.fraction)} of "
                 "the samples certifiable)")
        lines += ["", title]
        lines += [f"  - {line}" for line in p.lines()]
        lines += [f"  - {line}" for line in p.blocked]
        if not p.changes and not p.blocked:
            lines.append("  - none needed")
        if not p.checked:
            lines.append(f"  with {'these changes' if p.changes else 'the model as it is'}, the route applies up to "
                         f"batch {p.max_batch_size}" if p.max_batch_size else
                         "  even with these changes, the route applies at no batch size")
        lines.append(f"  parameters {p.parameters_before:,} -> {p.parameters_after:,}")
        lines.append(f"  assuming {p.assumption}")
    lines += ["", "Attacks (+ worth running, - not)"]
    width = max((len(a.name) for a in plan.attacks), default=0)
    for a in plan.attacks:
        tag = "certified" if a.certified else "uncertified"
        lines.append(f"  {'+' if a.recommended else '-'} {a.name.ljust(width)}  {tag.ljust(11)}  {a.why}")
    if plan.notes:
        lines += ["", "Notes"] + [f"  - {n}" for n in plan.notes]
    return "\n".join(lines)
