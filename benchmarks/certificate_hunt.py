"""Hunt for false certificates where they were found before: natural two-class data, models with PyTorch's
default initialisation, output biases shifted by the size of that initialisation, small batches; and models trained
to confidence first (the -trained grounds), where many samples are classified with probability 1.

Every batch: a random draw of M samples (M uniform in 2..8, or 2..64 on the -large grounds, 2..256 on -256), a
model built with plain torch (``nn.Sequential`` of Linear/ReLU, default init, seeded; on the ``conv1d`` grounds each
sample is read as one signal by a ``Conv1d`` + ReLU before them; on the trap-weights and imprint grounds with
that malicious server's first layer), the mean cross-entropy gradient by plain autograd,
``fedleak.reconstruct`` with and without the reported batch size (alternating), with the ground's attack. Every
certified reconstruction is scored against every original by ``fedleak.metrics.match``: it must be within ``1e-4`` of
the data's range (max abs error) of an original with its label, and no two certified reconstructions may claim
the same original. The worst certified error (relative to the range) is recorded too.

    python benchmarks/certificate_hunt.py [--batches 1000] [--configs lfw-2:2500,lfw-2-shift,...] [--seed 0]
    python benchmarks/certificate_hunt.py --render benchmarks/results/certificate_hunt_a.json ...
    python benchmarks/certificate_hunt.py --render RESULTS.json --section hunt_peeling --heading "..."

Writes benchmarks/results/certificate_hunt.json (versions, seed, settings, the machine, per-config counts); ``--render``
writes the table of one or more result files into docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch
from certificate_grounds import CONFIGS, Config
from doc_section import write_section
from torch import nn

import fedleak
from fedleak.attacks.exact.multiplicity import read_off_scale
from fedleak.nets.blas import cpu_model

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "certificate_hunt.json"


def malicious(model: nn.Module, cfg: Config, public: torch.Tensor, seed: int) -> nn.Module:
    """``model`` with the malicious server's first layer of ``cfg.attack`` (imprint bins from ``public``)."""
    if cfg.attack == "trap-weights":
        return fedleak.trap_weights(model, seed=seed)
    return fedleak.imprint_weights(model, public.reshape(len(public), -1), seed=seed)


def build(d_in: int, widths: tuple[int, ...], k: int, seed: int, shift: float, gen: np.random.Generator,
          conv1d: tuple[int, int] | None = None, norm: torch.Tensor | None = None, norm_input: bool = False,
          norm_hidden: bool = True, after_relu: bool = False, conv2d: tuple[int, ...] = (),
          maps: tuple[int, ...] = ()) -> nn.Module:
    """The ground's MLP; with ``norm`` (a sample of the data as the model sees it), an eval-mode BatchNorm1d on every
    hidden Linear layer (``norm_hidden``; after its ReLU where ``after_relu``) and on the input (``norm_input``), its
    running statistics those of ``norm`` and its gamma, beta drawn around 1 and 0."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten(), *([nn.BatchNorm1d(d_in, momentum=None)] if norm_input else [])]
    prev = d_in
    if conv1d is not None:  # each sample as one signal of d_in values, read by a Conv1d ("same" padding)
        channels, kernel = conv1d
        layers += [nn.Unflatten(1, (1, d_in)), nn.Conv1d(1, channels, kernel, padding=kernel // 2), nn.ReLU(),
                   nn.Flatten()]
        prev = channels * d_in
    if conv2d:  # 3 x 3 Conv2d blocks (padding 1) on the images (``maps``: one sample's C x H x W)
        layers.append(nn.Unflatten(1, maps))
        for c_in, c_out in zip((maps[0], *conv2d), conv2d):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        layers.append(nn.Flatten())
        prev = conv2d[-1] * d_in // maps[0]
    for w in widths:
        bn = [nn.BatchNorm1d(w, momentum=None)] if norm is not None and norm_hidden else []
        layers += [nn.Linear(prev, w), nn.ReLU(), *bn] if after_relu else [nn.Linear(prev, w), *bn, nn.ReLU()]
        prev = w
    layers.append(nn.Linear(prev, k))
    model = nn.Sequential(*layers)
    if norm is not None:
        with torch.no_grad():
            model.train()(norm)  # momentum None: the running statistics are this sample's
            for bn in (m for m in model if isinstance(m, nn.BatchNorm1d)):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.normal_(0.0, 0.1)
        model.eval()
    if shift:
        with torch.no_grad():
            model[-1].bias += torch.as_tensor(gen.uniform(-shift / 2, shift / 2, size=k), dtype=torch.float32)
    return model


class StandardisingInside(nn.Module):
    """``net`` behind ``(x - mean) / std`` in its own forward (buffers), as users write a normalisation."""

    def __init__(self, net: nn.Module, mean: float, std: float) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, seed: int) -> nn.Module:
    """``model`` after ``steps`` SGD steps (batch 64, lr 0.05, momentum 0.9) on ``(x, y)``."""
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    model.train()  # a BatchNorm1d normalises by each batch's statistics while it trains, as training loops run it
    for _ in range(steps):
        idx = torch.randint(0, len(y), (64,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return model.eval().requires_grad_(True)


def hunt(name: str, cfg: Config, batches: int, seed: int) -> dict:
    data = fedleak.load_dataset(cfg.data)
    gen = np.random.default_rng(seed)
    k = data.num_classes
    d_in = int(np.prod(data.input_shape))
    # the inputs as the model sees them: scaled, or standardised (x - mean) / std with the data set's statistics
    mean, std = (float(data.x.mean()), float(data.x.std())) if cfg.standardise else (0.0, 1.0)
    lo, hi = ((v - mean) / std * cfg.scale for v in data.value_range)
    if cfg.inside:  # the client's inputs are its pixels; the model standardises them
        lo, hi = data.value_range

    def inside(net: nn.Module) -> nn.Module:
        return StandardisingInside(net, mean, std) if cfg.inside else net
    out = dict(batches=0, samples=0, certified=0, false_certificates=0, certifiable=0, certifiable_recovered=0,
               certifiable_reported=0, recovered_reported=0, recovered=0, worst_certified_error=0.0, read_off_scale=0,
               read_off_scale_not_exact=0, seconds=0.0, failures=[])
    start = time.perf_counter()
    seen = (data.x - mean) / std * cfg.scale  # the inputs as the model sees them
    norm = seen[torch.as_tensor(gen.choice(len(data), size=512))] if cfg.norm or cfg.norm_input else None
    trained = [inside(train(build(d_in, cfg.widths, k, s, cfg.shift, gen, cfg.conv1d, norm, cfg.norm_input,
                                  cfg.norm, cfg.after_relu, cfg.conv2d, data.input_shape), seen, data.y, cfg.trained,
                            s)) for s in range(4)] \
        if cfg.trained else []
    for b in range(batches):
        M = int(gen.integers(2, cfg.max_batch + 1))
        idx = torch.as_tensor(gen.choice(len(data), size=M, replace=False))
        x, y = (data.x[idx] if cfg.inside else (data.x[idx] - mean) / std * cfg.scale), data.y[idx]
        model = trained[b % 4] if trained else inside(build(d_in, cfg.widths, k, int(gen.integers(0, 2**31)),
                                                            cfg.shift, gen, cfg.conv1d, norm, cfg.norm_input, cfg.norm,
                                                            cfg.after_relu, cfg.conv2d, data.input_shape))
        if cfg.attack != "auto":
            others = torch.as_tensor(gen.choice(np.setdiff1d(np.arange(len(data)), idx.numpy()), size=500))
            model = malicious(model, cfg, (data.x[others] - mean) / std * cfg.scale, int(gen.integers(0, 2**31)))
        weights = tuple(float(w) for w in np.exp(gen.uniform(-np.log(4), np.log(4), size=k))) if cfg.weighted else None
        if cfg.lr is not None:  # what a FedAvg client sends: weights after local SGD, its number of examples
            steps = cfg.steps if cfg.local_batch is None else -(-M // cfg.local_batch)
            try:
                update = fedleak.fedavg_update(model, x, y, lr=cfg.lr, local_steps=steps, batch_size=cfg.local_batch,
                                               optimizer="momentum" if cfg.momentum else "sgd",
                                               seed=int(gen.integers(0, 2**31)), label_smoothing=cfg.smoothing,
                                               class_weights=weights, reveal_learning_rate=cfg.lr_known)
            except fedleak.UpdateError:  # a step that moved no weight in float32: the client sends nothing
                out["unchanged"] = out.get("unchanged", 0) + 1
                continue
            if cfg.change:  # before - after is lr times the gradient: new - old is its negative
                update = {k: -cfg.change * v for k, v in update.delta().items()}
            if cfg.pseudo:  # a pseudo-gradient (old - new) / lr, computed from the two rounds' weights
                update = {k: v / cfg.lr for k, v in update.delta().items()}
        else:
            weight = None if weights is None else torch.tensor(weights)
            model.train(cfg.client_train)  # (a client in training mode: its norms on the batch's statistics)
            loss = nn.functional.cross_entropy(model(x), y, weight=weight, label_smoothing=cfg.smoothing)
            if cfg.penalty:
                loss = loss + cfg.penalty * sum((p * p).sum() for p in model.parameters())
            model.eval()
            grads = dict(zip([n for n, _ in model.named_parameters()],
                             [g.detach() for g in torch.autograd.grad(loss, list(model.parameters()))]))
            # a class-weighted mean loss does not reveal the batch size: its clients report it
            grads = {k: -g for k, g in grads.items()} if cfg.negated else grads
            update = fedleak.GradientUpdate(grads, num_examples=M) if b % 2 or cfg.weighted else grads
        # a Conv1d model reads each sample through an unflatten: its input shape is the data's, not inferred
        told = {"label_smoothing": cfg.smoothing} if not cfg.weighted else {"class_weights": weights}
        count = {"num_examples": M} if cfg.change or cfg.pseudo else {}  # a plain dict: the count it reports
        count.update({"learning_rate": cfg.lr} if cfg.pseudo else {})
        if cfg.attack == "auto":
            rec = fedleak.reconstruct(model, update, **(told if cfg.told else {}), **count,
                                      **({"input_shape": data.input_shape} if cfg.conv1d or cfg.conv2d else {}))
            # peeling's closure counts where the attack peels: the batch's scale pinned (its size reported, or a
            # one-step change at the rate the server set), no class weights
            pinned = ((cfg.lr is None and bool(b % 2)) or cfg.pseudo or (
                cfg.lr_known and cfg.steps == 1 and cfg.local_batch is None)) and not cfg.weighted
            certifiable = fedleak.analyze_exclusivity(model, x, y, peel=pinned).certifiable
        else:  # every sample counts: which ones a trap row or a bin isolates is the server's luck
            rec = fedleak.reconstruct(model, update, attack=cfg.attack, **count)
            certifiable = np.ones(M, dtype=bool)
        scores = fedleak.metrics.match(rec, x, y, data_range=(lo, hi))
        out["batches"] += 1
        out["samples"] += M
        out["certified"] += scores.n_certified
        out["recovered"] += int(scores.recovered.sum())
        out["false_certificates"] += scores.false_certificates
        out["certifiable"] += int(certifiable.sum())
        out["certifiable_recovered"] += int((scores.recovered & certifiable).sum())
        if not isinstance(update, dict) or count:  # the update tells its batch size (a gradient's: every other one)
            out["certifiable_reported"] += int(certifiable.sum())
            out["recovered_reported"] += int((scores.recovered & certifiable).sum())
        off_scale = [k for k, s in enumerate(rec.samples) if read_off_scale(s)]  # held by auto, uncertified
        out["read_off_scale"] += len(off_scale)
        out["read_off_scale_not_exact"] += sum(not exact_copy(rec.inputs[k], int(rec.labels[k]), x, y, hi - lo)
                                               for k in off_scale)
        if scores.n_certified:
            worst = float(np.max(scores.certified_error)) / (hi - lo)
            out["worst_certified_error"] = max(out["worst_certified_error"], worst)
        if scores.false_certificates:
            out["failures"].append(dict(batch=b, M=M, indices=idx.tolist(), reported=bool(b % 2),
                                        reasons=scores.false_reasons()))
    out["seconds"] = time.perf_counter() - start
    share = out["certifiable_recovered"] / max(out["certifiable"], 1)
    print(f"{name}: {out['batches']} batches, {out['samples']} samples, {out['certified']} certified, "
          f"{out['false_certificates']} false (worst certified error {out['worst_certified_error']:.1e} of the "
          f"range); certifiable recovered {out['certifiable_recovered']}/"
          f"{out['certifiable']} ({100 * share:.1f}%); read off the scale {out['read_off_scale']} "
          f"({out['read_off_scale_not_exact']} not exact); {out['seconds']:.0f} s", flush=True)
    return out


def exact_copy(rebuilt: torch.Tensor, label: int, x: torch.Tensor, y: torch.Tensor, width: float) -> bool:
    """Whether ``rebuilt`` is within 1e-4 of the range (max abs error) of a sample of ``x`` with ``label``."""
    err = (x.reshape(len(x), -1) - rebuilt.reshape(1, -1)).abs().amax(1)
    return bool(((err <= 1e-4 * width) & (y == label)).any())


HUNT_HEADING = ("Certificate hunt: two-class data, shifted biases, saturated networks, standardised inputs, FedAvg "
                "updates, label smoothing, class weights")


def render(files: list[Path], section: str = "hunt", heading: str = HUNT_HEADING) -> None:
    """Write the results of ``files`` as one table into docs/benchmarks.md (between ``section``'s markers, under
    ``heading`` where they are missing)."""
    lines = ["| ground | data | hidden widths | update | output-bias shift | inputs | batches | samples "
             "| certified | false certificates | worst certified error (of the range) | certifiable recovered |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    runs = []
    for f in files:
        record = json.loads(Path(f).read_text())
        settings = record["settings"]
        runs.append(f"`python benchmarks/certificate_hunt.py --configs "
                    f"{','.join(f'{n}:{b}' for n, b in settings['batches'].items())} --seed {settings['seed']}`")
        for name, r in record["results"].items():
            cfg = settings["configs"][name]
            share = r["certifiable_recovered"] / max(r["certifiable"], 1)
            reported = r.get("certifiable_reported", r["certifiable"])
            told = (f"; size reported: {r['recovered_reported']}/{reported} "
                    f"({100 * r['recovered_reported'] / max(reported, 1):.1f}%)") if reported < r["certifiable"] else ""
            steps = f"{cfg.get('steps', 1)} step{'s' if cfg.get('steps', 1) > 1 else ''}"
            if cfg.get("local_batch"):
                steps = f"one epoch in mini-batches of {cfg['local_batch']}" + (", momentum 0.9" * cfg["momentum"])
            update = "gradient" if cfg.get("lr") is None else f"FedAvg, lr {cfg['lr']:g}, {steps}"
            if cfg.get("attack", "auto") != "auto":
                update = f"{cfg['attack']} (every sample counts as certifiable); {update}"
            if cfg.get("smoothing"):
                update += (f"; label smoothing {cfg['smoothing']:g}, "
                           f"{'told' if cfg.get('told', True) else 'read off the update'}")
            if cfg.get("weighted"):
                update += (f"; class weights in [1/4, 4], "
                           f"{'told' if cfg.get('told', True) else 'not told'}")
            if cfg.get("change"):
                update += f"; passed as its change {'new - old' if cfg['change'] > 0 else 'old - new'} (a plain dict)"
            if cfg.get("negated"):
                update += "; negated (as a change new - old reads)"
            if cfg.get("penalty"):
                update += f"; L2 penalty {cfg['penalty']:g} x sum of squares in the loss"
            if cfg.get("trained"):
                update += f"; on 4 models trained {cfg['trained']} SGD steps (momentum 0.9, lr 0.05) first"
            inputs = ("standardised inside forward" if cfg.get("inside") else "standardised") if cfg.get(
                "standardise") else f"scaled ×{cfg['scale']:g}"
            widths = "-".join(map(str, cfg["widths"]))
            if cfg.get("conv1d"):
                widths = f"Conv1d {cfg['conv1d'][0]} ch, kernel {cfg['conv1d'][1]}; {widths}"
            if cfg.get("conv2d"):
                widths = f"3x3 Conv2d {', '.join(map(str, cfg['conv2d']))} ch; {widths}"
            if cfg.get("norm"):
                widths += (", each with an eval-mode BatchNorm1d" + (" after its ReLU" * cfg.get("after_relu", 0))
                           + (" and one on the input" * cfg.get("norm_input", 0)))
            elif cfg.get("norm_input"):
                widths += ", an eval-mode BatchNorm1d on the input"
            if cfg.get("client_train"):
                update += " computed in training mode"
            lines.append(f"| {name} | {cfg['data']} | {widths} | {update} | ±{cfg['shift'] / 2:g} | {inputs} "
                         f"| {r['batches']} | {r['samples']} | {r['certified']} "
                         f"| {r['false_certificates']} | {r['worst_certified_error']:.1e} "
                         f"| {r['certifiable_recovered']}/{r['certifiable']} ({100 * share:.1f}%){told} |")
    versions = record["versions"]
    body = (f"_Batches of 2-8 random samples (2-64 on the grounds named -large, 2-256 on -256), one fresh "
            f"default-init model each (`nn.Sequential`, seeded; on the trap-weights and imprint grounds with that "
            f"malicious first layer, imprint bins from 500 samples outside the batch); "
            f"gradients report the batch size for every other batch, FedAvg updates always (as Flower clients do); "
            f"{record['machine']}; torch {versions['torch']}. "
            f"Commands: {'; '.join(runs)}._\n\n" + "\n".join(lines))
    write_section(section, body, heading)
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=1000, help="batches per configuration")
    ap.add_argument("--configs", default=",".join(CONFIGS),
                    help=f"comma-separated names from {sorted(CONFIGS)}, each optionally NAME:BATCHES")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--render", type=Path, nargs="+", help="write these result files' table into docs/benchmarks.md")
    ap.add_argument("--section", default="hunt", help="the docs section --render writes (its markers' name)")
    ap.add_argument("--heading", default=HUNT_HEADING, help="the heading of a new section --render writes")
    args = ap.parse_args()
    if args.render:
        render(args.render, args.section, args.heading)
        return
    torch.set_num_threads(1)
    plan = {}
    for item in filter(None, args.configs.split(",")):
        name, _, count = item.partition(":")
        plan[name] = int(count) if count else args.batches
    unknown = sorted(set(plan) - set(CONFIGS))
    if unknown:
        raise SystemExit(f"unknown configuration(s) {unknown}; choose from {sorted(CONFIGS)}")
    names = list(plan)
    results = {n: hunt(n, CONFIGS[n], plan[n], args.seed + i) for i, n in enumerate(names)}
    record = dict(
        settings=dict(batches=plan, seed=args.seed, configs={n: CONFIGS[n].__dict__ for n in names}),
        versions=dict(fedleak=fedleak.__version__, torch=torch.__version__, numpy=np.__version__,
                      python=platform.python_version()),
        machine=f"{platform.machine()}, {torch.get_num_threads()} thread",
        cpu=f"{os.cpu_count()} cores of an {cpu_model()}",
        results=results,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
