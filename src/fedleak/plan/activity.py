"""What the plan counts on: per sample, which neurons of each dense ReLU layer fire (and pass a backward signal),
and how many units of each conv block are non-zero -- measured on the user's inputs, or on stated synthetic ones.

The counts are the attack's own (:mod:`fedleak.attacks.exact`): a conv block's equations are its non-zero output
units (after pooling when it pools), as :func:`fedleak.attacks.exact.invert_block` counts them on the top
block; a dense neuron is an *effective* ExAN of a sample when its gradient row is that sample's alone (it fires
for that sample with a non-zero backward signal, and for no other sample whose share of the row the client's sum
hears: :mod:`fedleak.nets.shares`), of a sample not classified with probability 1
(:func:`fedleak.analyze_exclusivity`).
Activations are computed in the model's own dtype, as the client computes them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedleak.nets import Network, forward_trace, readable_losses
from fedleak.nets.shares import quiet, row_shares
from fedleak.plan.widen import Widening, widening

CHUNK = 256  # samples per forward pass
SYNTHETIC_SAMPLES = 512  # synthetic inputs when the user gives none
DEFAULT_MAX_SAMPLES = 1024  # the user's inputs measured at most (a seeded random subset beyond)


@dataclass(frozen=True)
class Audible:
    """Which firing the plan counts on a layer's rows (:mod:`fedleak.nets.shares`). ``firing`` (n x width, bool):
    the samples that fire each neuron with a non-zero share of its row (a zero share is never heard: such a sample
    fires the neuron as good as silently), on the neurons whose shares every batch hears alike (the others' columns
    False). ``columns``: the other neurons, where some sample's share is non-zero but at most an epsilon of the
    row's largest (a batch hears it or not as its louder samples come and go), and ``shares`` (n x columns, the
    model's dtype) there."""

    firing: torch.Tensor
    columns: torch.Tensor
    shares: torch.Tensor


def audible(active: torch.Tensor, shares: torch.Tensor) -> Audible:
    """The :class:`Audible` of a layer's ``active`` (n x width) and the samples' ``shares`` of its rows."""
    columns = quiet(shares).any(0).nonzero().flatten()
    firing = active & (shares > 0)
    firing[:, columns] = False
    return Audible(firing, columns, shares[:, columns].clone())


@dataclass(frozen=True)
class DenseActivity:
    """One hidden ReLU layer of the head over n samples: ``active`` (n x width, bool), ``effective`` (active with
    a non-zero backward signal for the sample's label), the firing the client's sum hears (``audible``) and how to
    draw more neurons like its own (``widening``)."""

    name: str
    active: torch.Tensor
    effective: torch.Tensor
    audible: Audible
    widening: Widening

    @property
    def width(self) -> int:
        return int(self.active.shape[1])


@dataclass(frozen=True)
class BlockActivity:
    """One conv block over n samples: ``nonzero`` output units per sample (after its pooling: the equations the
    attack reads) and ``active_units`` (conv units > 0 before pooling: the equations without the pooling)."""

    name: str
    nonzero: np.ndarray
    active_units: np.ndarray


@dataclass(frozen=True)
class Activity:
    """Per-sample activity of a network on ``samples`` inputs. ``measured``: the inputs are the user's;
    ``description`` says which inputs (and, for synthetic ones, the assumption)."""

    measured: bool
    samples: int
    description: str
    dense: tuple[DenseActivity, ...]
    blocks: tuple[BlockActivity, ...]
    saturated: int = 0  # samples classified with probability 1 in the model's dtype: no ExAN makes them readable


def synthetic_inputs(shape: tuple[int, ...], n: int = SYNTHETIC_SAMPLES, seed: int = 0) -> torch.Tensor:
    """``n`` inputs with every value drawn uniformly from [0, 1], seeded (the assumption when no data is given)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, *shape, generator=gen)


def measure(net: Network, x: torch.Tensor, labels: torch.Tensor | None, *, measured: bool,
            description: str) -> Activity:
    """Run ``x`` (n x input_shape) through ``net`` and record what the plan counts. ``labels`` (n,) fix the
    backward signal; without them the model's predictions are used (as :func:`fedleak.analyze_exclusivity` does)."""
    dtype = net.dtype
    depth = net.head.depth
    inputs: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    active: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    effective: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    shares: list[list[torch.Tensor]] = [[] for _ in range(depth)]
    saturated = 0
    nonzero: list[list[np.ndarray]] = [[] for _ in net.blocks]
    units: list[list[np.ndarray]] = [[] for _ in net.blocks]
    with torch.no_grad():
        for start in range(0, x.shape[0], CHUNK):
            xc = x[start:start + CHUNK].to(device=net.device, dtype=dtype)
            run = net.conv_pass(xc, dtype)
            for i, (z, out) in enumerate(zip(run.preacts, run.outputs)):
                nonzero[i].append((out.reshape(len(xc), -1) > 0).sum(1).cpu().numpy())
                units[i].append((z.reshape(len(xc), -1) > 0).sum(1).cpu().numpy())
            if labels is None:
                yc = forward_trace(net.head, run.features, dtype=dtype).logits.argmax(1)
            else:
                yc = labels[start:start + CHUNK].to(net.device)
            trace = forward_trace(net.head, run.features, yc, dtype=dtype)
            readable = readable_losses(trace.loss_vectors)[:, None]  # classified with probability 1: no ExAN
            saturated += int((~readable).sum())
            for h, (z, d) in enumerate(zip(trace.preactivations, trace.deltas)):
                inputs[h].append(trace.activations[h].to(torch.float32).cpu())
                on = z > 0
                active[h].append(on.cpu())
                effective[h].append((on & (d != 0) & readable).cpu())
                shares[h].append(row_shares(z, d, trace.activations[h]).cpu())
    dense = tuple(DenseActivity(layer.name, torch.cat(active[h]), torch.cat(effective[h]),
                                audible(torch.cat(active[h]), torch.cat(shares[h])),
                                widening(torch.cat(inputs[h]), layer.weight, layer.bias, seed=h))
                  for h, layer in enumerate(net.head.dense[:depth]))
    blocks = tuple(BlockActivity(blk.name, np.concatenate(nonzero[i]), np.concatenate(units[i]))
                   for i, blk in enumerate(net.blocks))
    return Activity(measured, int(x.shape[0]), description, dense, blocks, saturated)
