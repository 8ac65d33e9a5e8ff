"""The speed benchmark's markdown table (``bench_speed.py`` writes it to docs/benchmarks.md): attack times and
their ratios to the client's gradient, before and now, memory and results, one row per cell."""

from __future__ import annotations

from doc_section import write_section

DATA_NAMES = {"lfw": "LFW (two classes)", "retina": "retina", "mni152": "MNI152 slices",
              "fashion-mnist": "Fashion-MNIST", "digits": "digits"}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.1f}" if a is not None and b else "—"


def per_gradient(r: dict, step: str, cpu: bool = False) -> str:
    """``step``'s time over the gradient's in cell ``r``: the median of the rounds' ratios where the cell has
    them, else the ratio of its times."""
    if "ratios" in r:
        return f"{r['ratios'][step]['cpu' if cpu else 'wall']:.1f}"
    suffix = "_cpu_ms" if cpu else "_ms"
    return ratio(r[step + suffix], r["gradient" + suffix])


def once(r: dict) -> str:
    """The cell's attack reading the update once (``peel=False``): its time, ratio and recovered samples; a dash
    where the row was measured before the table had it."""
    if "one_reading_ms" not in r:
        return "—"
    return (f"{ms(r['one_reading_ms'])}, {per_gradient(r, 'one_reading')}, {r['one_reading_recovered']}/"
            f"{r['batch_size']}" + (f" ({r['one_reading_false_certificates']} false)"
                                     if r["one_reading_false_certificates"] else ""))


def ms(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def label(r: dict) -> str:
    """A row's model: its hidden widths, the CNN, or a user's own module and the data it runs on."""
    if r["conv"]:
        return f"CNN {tuple(r['conv'])} + {r['widths'][0]} head, {r['parameters'] / 1e6:.1f}M params"
    if r.get("user"):
        steps = r.get("local_steps", 0)
        return (f"user's `nn.Module`, {r['widths'][0]} hidden, on {DATA_NAMES.get(r['dataset'], r['dataset'])}"
                f"{', normalised' if r.get('normalise') else ''}"
                + (f", FedAvg update of {steps} local step{'s' if steps > 1 else ''} (gradient: the client's "
                   "local training)" if steps else ""))
    widths = ", ".join(map(str, r["widths"]))
    data = r.get("dataset", "fashion-mnist")
    return widths if data == "fashion-mnist" else f"{widths}, on {DATA_NAMES.get(data, data)}"


def table(rows: list[dict], before: list[dict]) -> str:
    """The markdown speed table; the previous version's attack where ``before`` has the same cell."""
    prev = {(b["model"], b["batch_size"]): b for b in before}
    lines = ["| hidden widths | M | gradient ms | f64 copy ms | attack ms (before → now) | attack / gradient "
             "(before → now) | same, CPU time | attack / f64 copy | attack's peak extra memory / gradient size | "
             "recovered | false cert. | one reading: ms, / gradient, recovered |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = prev.get((r["model"], r["batch_size"]))
        was = f"{ms(b['attack_ms'])} → " if b else ""
        was_ratio = f"{per_gradient(b, 'attack')} → " if b else ""
        was_cpu = f"{per_gradient(b, 'attack', cpu=True)} → " if b else ""
        rec = f"{r['recovered']}/{r['batch_size']}"
        lines.append(
            f"| {label(r)} | {r['batch_size']} | {ms(r['gradient_ms'])} | {ms(r['f64_copy_ms'])} "
            f"| {was}{ms(r['attack_ms'])} | {was_ratio}{per_gradient(r, 'attack')} "
            f"| {was_cpu}{per_gradient(r, 'attack', cpu=True)} "
            f"| {ratio(r['attack_ms'], r['f64_copy_ms'])} "
            f"| {r['attack_peak_extra_mb']:.0f} MB / {r['gradient_mb']:.1f} MB = "
            f"{r['attack_peak_extra_mb'] / r['gradient_mb']:.1f} | {rec} | {r['false_certificates']} "
            f"| {once(r)} |")
    for r in rows:
        if "fish_ms" not in r:
            continue
        b = prev.get((r["model"], r["batch_size"]))
        lines.append("")
        lines.append(f"{label(r)}, M = {r['batch_size']}: fishing "
                     f"{(ms(b['fish_ms']) + ' → ') if b else ''}{ms(r['fish_ms'])} ms; the attack on the fished "
                     f"batch {(ms(b['fished_attack_ms']) + ' → ') if b else ''}{ms(r['fished_attack_ms'])} ms "
                     f"({per_gradient(r, 'fished_attack')}× the gradient), "
                     + "".join(f"{what}'s peak extra memory {r[key]:.0f} MB ({r[key] / r['gradient_mb']:.1f}× the "
                               "gradient), " for what, key in (("fishing", "fish_peak_extra_mb"),
                                                               ("the fished attack", "fished_attack_peak_extra_mb"))
                               if key in r)
                     + f"{r['fished_recovered']}/{r['batch_size']} recovered, "
                     f"{r['fished_false_certificates']} false certificates.")
    return "\n".join(lines)


def write_doc(rows: list[dict], before: list[dict], meta: dict) -> None:
    """The table, with how it was measured, in the ``speed`` section of docs/benchmarks.md."""
    load = ", ".join(f"{v:.1f}" for v in meta["machine"]["load_average_start"])
    n = meta.get("rounds", 1)
    rounds = (f" in each of {n} processes per model and version, taken in turn (times: medians over them; "
              "ratios: medians of each process's ratios)") if n > 1 else ""
    machine = meta["machine"]
    cpu = ", ".join(str(v) for v in (machine.get("processor") or "CPU", machine["arch"],
                                     machine.get("torch_cpu_capability")) if v)
    products = f", the float64 products on {machine['float64_products']}" if "float64_products" in machine else ""
    body = (f"_Measured {meta['date']} on {machine['cpus']} cores of an {cpu} CPU "
            f"(load average {load} at the start), torch {meta['torch']} pinned to one thread"
            f"{products}; medians of "
            f"{meta['repeats']} interleaved repeats{rounds}; Fashion-MNIST unless a row names its data, seed "
            f"{meta['seed']}. Command: `{meta['command']}`._\n\n{table(rows, before)}")
    write_section("speed", body, "Speed of the exact attack")
