"""How far a BatchNorm model's averaged running statistics lag its averaged weights in ``fedleak evaluate``'s
federation (as in any FedAvg federation, which averages every array a client returns): the test accuracy of the
global model in eval mode, and of the same weights with the statistics re-estimated on the clients' training data.
The paragraph on BatchNorm in docs/defenses.md.

    .venv/bin/python benchmarks/bench_batchnorm_fedavg.py

The model is a user's CNN class (below) on the built-in ``retina`` tiles; results (versions, seed, settings) go to
``benchmarks/results/batchnorm_fedavg.json``. Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from run_meta import run_meta, write_results
from torch import nn

import fedleak.evaluation.run as evaluation_run
from fedleak.defenses.stack import DefenseStack
from fedleak.evaluation import EvaluationSettings
from fedleak.evaluation.federation import Federation, prepare_federation
from fedleak.model_copy import copy_model

TARGET = "batchnorm_fedavg.json"


class BatchNormNet(nn.Module):
    """A CNN as users write it: BatchNorm after each conv, max pooling, Dropout before the head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.25)
        self.fc1, self.fc2 = nn.Linear(16 * 8 * 8, 256), nn.Linear(256, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


def recalibrated_accuracy(model: nn.Module, fed: Federation) -> float:
    """The accuracy of ``model``'s weights with BatchNorm's statistics re-estimated on the clients' data."""
    net = copy_model(model)
    for module in net.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over every batch below
    net.train()
    with torch.no_grad():
        for part in fed.parts:
            net(fed.train.x[torch.from_numpy(part)])
        net.eval()
        return float((net(fed.test_x).argmax(1) == fed.test_y).float().mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, nargs="+", default=[30, 100])
    ap.add_argument("--lr", type=float, default=0.05)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for rounds, (steps, momentum) in ((r, s) for r in args.rounds for s in ((1, 0.0), (3, 0.9))):
        settings = EvaluationSettings(data="retina", defenses=(), attacks=("exclusivity",), rounds=rounds,
                                      local_steps=steps, momentum=momentum, lr=args.lr, seed=args.seed)
        torch.manual_seed(args.seed)
        fed = prepare_federation(settings, BatchNormNet())
        trained = {}
        predictions = evaluation_run.model_predictions

        def keep(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
            trained["model"] = copy_model(net)
            return predictions(net, x)

        evaluation_run.model_predictions = keep  # the global model the utility cell tests
        try:
            cell = evaluation_run.train_federation(settings, fed, DefenseStack(()))
        finally:
            evaluation_run.model_predictions = predictions
        rows.append({"rounds": rounds, "training": settings.training(), "accuracy": cell.accuracy,
                     "recalibrated_accuracy": recalibrated_accuracy(trained["model"], fed),
                     "majority_class_share": float(torch.bincount(fed.test_y).max() / len(fed.test_y))})
        print(f"| {rounds} | {rows[-1]['training']} | {cell.accuracy:.1%} | {rows[-1]['recalibrated_accuracy']:.1%} |")
    write_results(Path(__file__).resolve().parent / "results" / TARGET,
                  meta=run_meta(" ".join(sys.argv), **vars(args)), rows=rows)


if __name__ == "__main__":
    main()
