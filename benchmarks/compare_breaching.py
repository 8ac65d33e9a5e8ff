"""Side by side with breaching 0.1.2 (the field's reference implementation), on the same model, batch and budget.

    .venv/bin/python benchmarks/compare_breaching.py                      # ~10-15 min on one busy core
    .venv/bin/python benchmarks/compare_breaching.py --iterations 200 --batches 1

breaching is **never** a dependency of fedleak. This script keeps it in its own virtual environment
outside the repository (default ``/tmp/fedleak-breaching-venv``), created on first use with
``python3 -m venv`` and ``pip install -c constraints.txt breaching torch==2.13.0`` (the constraint keeps
the CPU torch; see the environment notes). breaching only imports after a ``torch.library`` stub of
``torchvision::nms`` (torchvision 0.28 here is a CUDA build), and its CIFAR/ImageNet data loaders are
replaced by a stub that yields exactly the benchmark batch.

What runs, on identical inputs (the models' weights and the batch are written to a work folder and
loaded by both sides; PSNR is computed by fedleak's standard metric for both, per image, data range 1,
Hungarian-matched):

* **Inverting Gradients**: breaching ``attack=invertinggradients`` (Adam on signed gradients, lr 0.1,
  step decay, box, cosine objective, TV 0.2, labels by its default ``bias-corrected`` strategy, N(0,1)
  init) against ``fedleak`` ``attack="ig"`` with the same hyper-parameters (``tv=0.2``) and, as a second
  row, fedleak's defaults. The model is ``fedleak.make_lenet`` (sigmoid) on Fashion-MNIST images repeated
  to 3 channels (breaching's TV regulariser is written for 3 channels), FedSGD gradient of the mean loss,
  labels not given to either attacker.
* **Analytic**: breaching ``attack=analytic`` (``∇W/∇b`` of the fully connected layers) against fedleak's
  certified exclusivity attack, on a one-hidden-layer ReLU MLP (256 units) with the same digits batch,
  and on a linear model (``Flatten, Linear``) where breaching's attack is designed to work and fedleak's
  exclusivity attack does not apply (``auto`` falls back to IG there).

Both sides run with ``torch.set_num_threads(1)`` one after the other, so the time per iteration is
comparable on a shared machine. Results go to ``benchmarks/results/compare_breaching.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import fedleak

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "compare_breaching.json"

WORKER = r'''
import json, sys, time
import torch
torch.set_num_threads(1)
_lib = torch.library.Library("torchvision", "DEF")          # make torchvision 0.28 (CUDA build) importable
_lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
_lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
import breaching
from breaching.cases import servers, users

job = json.load(open(sys.argv[1]))
work = job["work"]
data = torch.load(f"{work}/{job['batch']}", weights_only=True)
state = torch.load(f"{work}/{job['model']}", weights_only=True)

def build(spec):
    if spec["kind"] == "lenet":
        c, h, w = spec["input_shape"]
        act = torch.nn.Sigmoid if spec["activation"] == "sigmoid" else torch.nn.ReLU
        ch = spec["channels"]
        def out(n, s): return (n + 4 - 5) // s + 1
        h2, w2 = out(out(out(h, 2), 2), 1), out(out(out(w, 2), 2), 1)
        return torch.nn.Sequential(
            torch.nn.Conv2d(c, ch, 5, padding=2, stride=2), act(),
            torch.nn.Conv2d(ch, ch, 5, padding=2, stride=2), act(),
            torch.nn.Conv2d(ch, ch, 5, padding=2, stride=1), act(),
            torch.nn.Flatten(), torch.nn.Linear(ch * h2 * w2, spec["classes"]))
    sizes = [spec["input_dim"], *spec["widths"], spec["classes"]]
    layers = [torch.nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)

model = build(job["spec"])
model.load_state_dict(state)          # strict: the same architecture and weights as fedleak's
model.name = "fedleak-" + job["spec"]["kind"]

class _Loader(torch.utils.data.DataLoader):
    pass

def fake_dataloader(*args, **kwargs):
    items = [dict(inputs=data["x"][i], labels=data["y"][i]) for i in range(len(data["y"]))]
    loader = _Loader(items, batch_size=len(items), shuffle=False)
    loader.name = "fedleak-batch"
    return loader

users.construct_dataloader = fake_dataloader
servers.construct_dataloader = fake_dataloader
from breaching.cases.models.model_preparation import VisionContainer  # breaching calls model(inputs=...)
wrapped = VisionContainer(model)
wrapped.name = model.name
breaching.cases.construct_model = lambda *a, **k: (wrapped, torch.nn.CrossEntropyLoss())

c, h, w = data["x"].shape[1:]
overrides = [
    "case=1_single_image_small", f"attack={job['attack']}",
    f"case.user.num_data_points={len(data['y'])}", "case.user.provide_labels=False",
    f"case.data.shape=[{c},{h},{w}]", "case.data.classes=10", "case.data.normalize=False",
    f"case.data.mean=[{','.join(['0.0'] * c)}]", f"case.data.std=[{','.join(['1.0'] * c)}]",
]
if job["attack"] == "invertinggradients":
    overrides += [f"attack.optim.max_iterations={job['iterations']}", "attack.optim.callback=100000"]
cfg = breaching.get_config(overrides=overrides)
setup = dict(device=torch.device("cpu"), dtype=torch.float)
torch.manual_seed(job["seed"])
user, server, _, loss_fn = breaching.cases.construct_case(cfg.case, setup)
attacker = breaching.attacks.prepare_attack(server.model, server.loss, cfg.attack, setup)
payload = server.distribute_payload()
shared, truth = user.compute_local_updates(payload)  # the user's data is the batch above, in order
assert torch.equal(truth["data"], data["x"]), "breaching's user did not get the batch"
start = time.perf_counter()
rec, stats = attacker.reconstruct([payload], [shared], {}, dryrun=False)
seconds = time.perf_counter() - start
torch.save({"x": rec["data"].detach().float(), "y": rec["labels"].detach().long()}, f"{work}/{job['out']}")
json.dump({"seconds": seconds, "breaching_version": __import__("importlib.metadata").metadata.version("breaching")},
          open(f"{work}/{job['out']}.json", "w"))
'''


def ensure_venv(venv: Path, log) -> Path:
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import importlib.metadata as m; print(m.version('breaching'))"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    log(f"creating {venv} and installing breaching into it (pip, constrained to the CPU torch)")
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"),
                    "breaching==0.1.2", "torch==2.13.0"], check=True)
    return python


def run_breaching(python: Path, work: Path, job: dict, log) -> tuple[torch.Tensor, torch.Tensor, float]:
    (work / "worker.py").write_text(WORKER)
    job_file = work / f"{job['out']}.job.json"
    job_file.write_text(json.dumps({**job, "work": str(work)}))
    env = {**os.environ, "HYDRA_FULL_ERROR": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(python), str(work / "worker.py"), str(job_file)], capture_output=True, text=True,
                          env=env, cwd=work)
    if proc.returncode != 0:
        raise RuntimeError(f"breaching worker failed:\n{proc.stderr[-3000:]}")
    out = torch.load(work / job["out"], weights_only=True)
    meta = json.loads((work / f"{job['out']}.json").read_text())
    return out["x"], out["y"], float(meta["seconds"])


def score(x_rec, y_rec, x, y) -> dict:
    m = fedleak.metrics.match(x_rec, x, y)
    labels = fedleak.metrics._multiset_accuracy(y_rec.numpy(), y.numpy()) if y_rec is not None else float("nan")
    return {"psnr_mean": round(m.mean_psnr(), 2), "psnr_max": round(float(m.psnr.max()), 2),
            "exact_fraction": round(float(m.exact.mean()), 3), "label_accuracy": round(labels, 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--venv", type=Path, default=Path(tempfile.gettempdir()) / "fedleak-breaching-venv")
    ap.add_argument("--iterations", type=int, default=300)
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trials", type=int, default=3, help="batches (and attack seeds) per batch size for IG")
    ap.add_argument("--skip-ig", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)

    python = ensure_venv(args.venv, log)
    # torch imports its compiler stack on the first optimizer construction (~3 s here); breaching's worker
    # has paid that before its timer starts, so pay it here too before timing fedleak
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])
    work = Path(tempfile.mkdtemp(prefix="fedleak-breaching-"))
    rows: list[dict] = []

    # ---- Inverting Gradients: LeNet (sigmoid), Fashion-MNIST as 3 channels ---------------------------
    if not args.skip_ig:
        fashion = fedleak.load_dataset("fashion-mnist")
        shape = (3, 28, 28)
        model = fedleak.make_lenet(shape, 10, activation="sigmoid", seed=0)
        torch.save(model.state_dict(), work / "lenet.pt")
        spec = {"kind": "lenet", "input_shape": list(shape), "activation": "sigmoid", "channels": 12, "classes": 10}
        for m in args.batches:
            for trial in range(args.trials):
                x1, y = fashion.batch(m, seed=500 + 10 * trial + m)
                x = x1.repeat(1, 3, 1, 1).contiguous()
                torch.save({"x": x, "y": y}, work / f"batch{m}_{trial}.pt")
                job = {"attack": "invertinggradients", "iterations": args.iterations, "seed": args.seed + trial,
                       "spec": spec, "model": "lenet.pt", "batch": f"batch{m}_{trial}.pt", "out": f"ig{m}_{trial}.pt"}
                bx, by, bsec = run_breaching(python, work, job, log)
                common = {"attack": "IG", "model": "LeNet-sigmoid 3x28x28", "batch": m, "trial": trial}
                rows.append({**common, "implementation": "breaching 0.1.2", "iterations": args.iterations,
                             "seconds": round(bsec, 2), "s_per_iteration": round(bsec / args.iterations, 4),
                             **score(bx, by, x, y)})
                log(f"breaching IG  M={m} trial {trial}: {rows[-1]}")
                grads = fedleak.compute_gradient_update(model, x, y)
                for label, opts in (("fedleak, breaching's settings (tv 0.2, N(0,1) init)", {"tv": 0.2, "init": "normal"}),
                                    ("fedleak, defaults (tv 1e-4, uniform init)", {})):
                    rec = fedleak.reconstruct(model, grads, attack="ig", iterations=args.iterations,
                                              seed=args.seed + trial, **opts)
                    rows.append({**common, "implementation": label, "iterations": rec.iterations,
                                 "seconds": round(rec.seconds, 2), "s_per_iteration": round(rec.seconds / rec.iterations, 4),
                                 **score(rec.inputs, rec.labels, x, y)})
                    log(f"fedleak IG    M={m} trial {trial}: {rows[-1]}")

    # ---- Analytic: MLP with one hidden ReLU layer, and a linear model, on digits ---------------------
    digits = fedleak.load_dataset("digits")
    for kind, widths in (("mlp", [256]), ("linear", [])):
        model = fedleak.make_mlp(digits.input_shape, widths, 10, seed=0)
        torch.save(model.state_dict(), work / f"{kind}.pt")
        spec = {"kind": kind, "input_dim": 64, "widths": widths, "classes": 10}
        for m in args.batches:
            x, y = digits.batch(m, seed=600 + m)
            torch.save({"x": x, "y": y}, work / f"d{m}.pt")
            job = {"attack": "analytic", "iterations": 1, "seed": args.seed, "spec": spec, "model": f"{kind}.pt",
                   "batch": f"d{m}.pt", "out": f"an_{kind}{m}.pt"}
            name = "MLP 64-256-10" if kind == "mlp" else "linear 64-10"
            try:
                bx, by, bsec = run_breaching(python, work, job, log)
                rows.append({"attack": "analytic", "implementation": "breaching 0.1.2", "model": name, "batch": m,
                             "iterations": None, "seconds": round(bsec, 3), "s_per_iteration": None,
                             **score(bx, by, x, y)})
            except RuntimeError as exc:
                last = str(exc).strip().splitlines()[-1]
                rows.append({"attack": "analytic", "implementation": "breaching 0.1.2", "model": name, "batch": m,
                             "error": last[:200]})
            log(f"breaching analytic {kind} M={m}: {rows[-1]}")
            grads = fedleak.compute_gradient_update(model, x, y)
            attack = "exclusivity" if kind == "mlp" else "auto"
            opts = {} if attack == "exclusivity" else {"iterations": args.iterations}
            rec = fedleak.reconstruct(model, grads, attack=attack, **opts)
            rows.append({"attack": "analytic", "implementation": f"fedleak {rec.attack}", "model": name, "batch": m,
                         "iterations": rec.iterations, "seconds": round(rec.seconds, 3), "s_per_iteration": None,
                         "certified": rec.num_certified,
                         **(score(rec.inputs, rec.labels, x, y) if len(rec) else {"psnr_mean": float("nan")})})
            log(f"fedleak {attack} {kind} M={m}: {rows[-1]}")

    summary = []
    for impl in dict.fromkeys(r["implementation"] for r in rows if r["attack"] == "IG"):
        for m in args.batches:
            sel = [r for r in rows if r["attack"] == "IG" and r["implementation"] == impl and r["batch"] == m]
            if sel:
                summary.append({"implementation": impl, "batch": m, "trials": len(sel),
                                "psnr_mean": round(sum(r["psnr_mean"] for r in sel) / len(sel), 2),
                                "s_per_iteration": round(sum(r["s_per_iteration"] for r in sel) / len(sel), 4),
                                # the minimum over trials is the least disturbed by other load on the machine
                                "s_per_iteration_min": round(min(r["s_per_iteration"] for r in sel), 4)})
                log(f"summary: {summary[-1]}")
    result = {
        "ig_summary": summary,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "versions": {"fedleak": fedleak.__version__, "torch": torch.__version__, "python": platform.python_version(),
                     "threads": 1},
        "rows": rows,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f".{args.out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, args.out)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
