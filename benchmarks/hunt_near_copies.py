"""Hunt for false certificates on batches of near-copies: a sample and copies of it moved by a little noise.

Two near-copies that share every active unit and their label have nearly the same loss vector, so every unit that
fires for both weighs them alike: their rows give the blend of the two, to about the square of their distance, at
twice a sample's scale. Only the scale can tell such a blend from one sample, and only where it is pinned. Each cell
draws a data set, a default-initialised MLP (fedleak's builder, seeded), a batch built of near-copies, the noise's
size (a fraction of the data's range, uniform per value), the update as the client sends it, and the attack:

* batch structures: ``pairs`` (4 samples and a near-copy of each), ``triples`` (2 samples and two near-copies of
  each), ``one pair`` (7 samples and a near-copy of the first), ``drift`` (8 readings of a slowly drifting signal,
  each within the noise of the one before);
* updates: the mean cross-entropy gradient with its batch size, the same as a plain dict without it, one SGD step at
  rate 0.1 as a weight update with its size (the rate unknown to the server), and the same with the rate revealed;
* attacks: ``exclusivity`` on the plain model, ``trap-weights`` and ``imprint`` (bins from 500 samples outside the
  batch, or half the data set where it is smaller) on their malicious first layers.

Every certified reconstruction is scored by ``fedleak.metrics.match`` (within 1e-4 of the range of an original with
its label, no two claiming one original); ``exact`` counts returned inputs within that of an original.

    python benchmarks/hunt_near_copies.py [--seeds 2] [--label after] [--no-doc]
    PYTHONPATH=/path/to/an/older/src python benchmarks/hunt_near_copies.py --label before --no-doc
    python benchmarks/hunt_near_copies.py --render      # the table of both results files, into the docs

Writes ``benchmarks/results/near_copies_<label>.json`` (versions, seeds, settings, the machine, the counts per data
set, structure, update and attack) and, unless ``--no-doc``, the table into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

import torch
from doc_section import write_section

import fedleak
from fedleak.nets.blas import cpu_model
from fedleak.report.output import environment_info, write_atomic

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
DATA = {"digits": 256, "fashion-mnist": 1024, "lfw": 1024, "retina": 1024}  # data set: hidden width
STRUCTURES = ("pairs", "triples", "one pair", "drift")
UPDATES = ("gradient, size", "gradient, no size", "one step, size", "one step, size and rate")
ATTACKS = ("exclusivity", "trap-weights", "imprint")
NOISE = (3e-4, 1e-3, 3e-3)
PUBLIC = 500  # samples kept out of every batch: imprint's quantiles


def near_copies(x: torch.Tensor, structure: str, eps: float, gen: torch.Generator) -> torch.Tensor:
    """The batch of ``structure`` built from the samples ``x`` (values in [0, 1] after scaling), noise ``eps``."""
    def noise(shape):
        return eps * (2 * torch.rand(shape, generator=gen) - 1)

    if structure == "pairs":
        return torch.cat([x[:4], x[:4] + noise(x[:4].shape)])
    if structure == "triples":
        return torch.cat([x[:2], x[:2] + noise(x[:2].shape), x[:2] + noise(x[:2].shape)])
    if structure == "one pair":
        return torch.cat([x[:7], x[:1] + noise(x[:1].shape)])
    return x[:1] + noise((8, *x.shape[1:])).cumsum(0)  # drift


def labels_of(y: torch.Tensor, structure: str) -> torch.Tensor:
    return {"pairs": lambda: torch.cat([y[:4], y[:4]]), "triples": lambda: y[:2].repeat(3),
            "one pair": lambda: torch.cat([y[:7], y[:1]]), "drift": lambda: y[:1].repeat(8)}[structure]()


def hunt(seeds: int) -> list[dict]:
    rows = []
    for name, width in DATA.items():
        data = fedleak.load_dataset(name)
        lo, hi = data.value_range
        keep = min(PUBLIC, len(data.x) // 2)
        public = data.x[-keep:]
        for seed in range(seeds):
            base = fedleak.make_mlp(data.input_shape, [width], data.num_classes, seed=seed)
            models = {"exclusivity": base, "trap-weights": fedleak.trap_weights(base, seed),
                      "imprint": fedleak.imprint_weights(base, public, bins=min(width, 256), seed=seed)}
            for structure in STRUCTURES:
                for eps in NOISE:
                    gen = torch.Generator().manual_seed(seed * 7919 + int(eps * 1e6) + STRUCTURES.index(structure))
                    idx = torch.randperm(len(data.x) - keep, generator=gen)[:7]
                    x0 = (data.x[idx] - lo) / (hi - lo)
                    x = (near_copies(x0, structure, eps, gen).clamp(0, 1) * (hi - lo) + lo).to(data.x.dtype)
                    y = labels_of(data.y[idx], structure)
                    for attack, model in models.items():
                        for update_kind in UPDATES:
                            rows.append(one(model, x, y, data, attack, update_kind) | dict(
                                data=name, width=width, seed=seed, structure=structure, noise=eps))
        print(f"{name}: {sum(r['certified'] for r in rows if r['data'] == name)} certified, "
              f"{sum(r['false'] for r in rows if r['data'] == name)} false", flush=True)
    return rows


def one(model, x, y, data, attack: str, update_kind: str) -> dict:
    """One cell's counts."""
    if update_kind.startswith("gradient"):
        update = fedleak.compute_gradient_update(model, x, y)
        if update_kind.endswith("no size"):
            update = dict(update.gradients)
    else:
        update = fedleak.fedavg_update(model, x, y, lr=0.1, local_steps=1,
                                       reveal_learning_rate=update_kind.endswith("rate"))
    start = time.perf_counter()
    try:
        rec = fedleak.reconstruct(model, update, attack=attack)
    except Exception as exc:  # noqa: BLE001 - a refusal (FedleakError) is counted; any other error is a crash
        return dict(attack=attack, update=update_kind, samples=len(x), certified=0, false=0, exact=0,
                    refused=str(exc)[:200], crashed=not isinstance(exc, fedleak.FedleakError),
                    seconds=round(time.perf_counter() - start, 4))
    scores = fedleak.metrics.match(rec, x, y, data_range=data.value_range)
    return dict(attack=attack, update=update_kind, samples=len(x), certified=rec.num_certified,
                false=scores.false_certificates, exact=int(scores.exact.sum()), refused="", crashed=False,
                seconds=round(time.perf_counter() - start, 4))


def write_rows(path: Path, record: dict) -> None:
    """``record`` as JSON, its ``rows`` one compact line each (2,304 cells: a tenth of the indented size)."""
    rows = record.pop("rows")
    head = json.dumps(record, indent=1)[:-2]
    body = ",\n".join(json.dumps(r, separators=(",", ":")) for r in rows)
    write_atomic(path, f"{head},\n \"rows\": [\n{body}\n]}}\n")


def render(files: list[Path]) -> None:
    """The table of counts per update and attack, one column pair per results file (before / after)."""
    records = [json.loads(f.read_text()) for f in files]
    head = " | ".join(f"{r['label']}: certified / false" for r in records)
    lines = [f"| update | attack | samples | {head} |", "|---|---|---:|" + "---:|" * len(records)]
    for update_kind in UPDATES:
        for attack in ATTACKS:
            cells, samples = [], 0
            for r in records:
                rows = [x for x in r["rows"] if x["update"] == update_kind and x["attack"] == attack]
                samples = sum(x["samples"] for x in rows)
                cells.append(f"{sum(x['certified'] for x in rows)} / {sum(x['false'] for x in rows)}")
            lines.append(f"| {update_kind} | {attack} | {samples} | " + " | ".join(cells) + " |")
    by_structure = []
    for structure in STRUCTURES:
        cells = []
        for r in records:
            rows = [x for x in r["rows"] if x["structure"] == structure]
            cells.append(f"{sum(x['false'] for x in rows)} false of {sum(x['certified'] for x in rows)}")
        by_structure.append(f"{structure}: " + ", ".join(f"{r['label']} {c}" for r, c in zip(records, cells)))
    crashes = [f"{r['label']}: {sum(x['crashed'] for x in r['rows'])} of {len(r['rows'])} cells" for r in records]
    first = records[-1]
    body = (f"_Data sets {', '.join(f'{d} (MLP with {w} hidden units)' for d, w in DATA.items())}; "
            f"{first['settings']['seeds']} seeds each; structures {', '.join(STRUCTURES)}; noise "
            f"{', '.join(f'{e:g}' for e in NOISE)} of the range; {first['cpu']}, torch {first['versions']['torch']}; "
            f"`python benchmarks/hunt_near_copies.py`, and the version before the near-copies rule with "
            f"`--label before`._\n\n" + "\n".join(lines) + "\n\nBy structure: " + "; ".join(by_structure)
            + ". Crashed (an error other than a refusal): " + ", ".join(crashes) + ".")
    write_section("near-copies", body, "Certificate hunt: batches of near-copies")
    print(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--label", default="after")
    ap.add_argument("--no-doc", action="store_true")
    ap.add_argument("--render", action="store_true", help="write the table of the results files into the docs")
    args = ap.parse_args()
    files = [RESULTS / f"near_copies_{label}.json" for label in ("before", "after")]
    if args.render:
        render([f for f in files if f.exists()])
        return
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = hunt(args.seeds)
    out = RESULTS / f"near_copies_{args.label}.json"
    write_rows(out, dict(label=args.label, settings=dict(seeds=args.seeds, noise=NOISE, structures=STRUCTURES,
                                                         updates=UPDATES, attacks=ATTACKS, widths=DATA),
                         versions=dict(fedleak=fedleak.__version__, torch=torch.__version__,
                                       python=platform.python_version(), source=str(Path(fedleak.__file__).parent)),
                         environment=environment_info(), cpu=f"{os.cpu_count()} cores of an {cpu_model()}",
                         date=datetime.date.today().isoformat(), seconds=time.perf_counter() - start, rows=rows))
    print(f"wrote {out} in {time.perf_counter() - start:.0f} s")
    if not args.no_doc:
        render([f for f in files if f.exists()])


if __name__ == "__main__":
    main()
