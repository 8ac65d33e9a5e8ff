"""Fishing for CNNs: give every sample its own ExANs in the FC head of a conv net (docs/cnn.md).

The conv stack is piecewise linear in the input: inside the activation region of the conv units of a
sample, the features are ``f = J x + c`` and every head pre-activation is an affine function of the
pixels. The MLP fishing machinery (:mod:`fedleak.fishing.lp`, :mod:`fedleak.fishing.targets`) therefore
runs unchanged on a per-sample *linearised network* whose layers are the conv units of every block
followed by the head's hidden layers:

* targets are chosen on the head, from the real features of the batch (``choose_targets`` on the head);
* a target row is ``W_h[j]`` pulled back to the pixels through the head and the masked, transposed convs
  (``conv2d_input``), never a dense Jacobian;
* every LP solution is checked by a real forward pass of the CNN (float64 and float32); when a written
  row fails, the conv (and lower head) units whose sign flipped are added as region rows, lazily, as in
  the MLP code. Conv units whose sign does not change need no row.

Blocks may pool by averaging (linear) or not at all; max pooling is refused.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from torch import nn

from fedleak.errors import FedleakError, ModelError
from fedleak.fishing.lp import NetArrays, Requirement, SampleOutcome, solve_sample
from fedleak.fishing.perturb import (
    FishingOptions,
    FishingResult,
    _Fisher,
    sample_records,
    single_threaded_blas,
)
from fedleak.fishing.targets import choose_targets, retarget
from fedleak.models.convnet import ReluCNN, as_relu_cnn


CLEAR_FRACTION = 0.2  # lower conv units stay at least margin*CLEAR_FRACTION away from zero
CLEAR_WATCH = 0.5  # ... watched when their clean pre-activation is within this of zero


class _ConvStack:
    """float64 / float32 views of the conv blocks of a :class:`ReluCNN` (BN folded)."""

    def __init__(self, net: ReluCNN):
        self.net = net
        self.blocks = net.blocks
        for blk in self.blocks:
            if blk.pool is not None and blk.pool.kind != "avg":
                raise ModelError(f"layer '{blk.pool.name}': fishing supports average pooling or none, not "
                                 f"{blk.pool.kind} pooling")
        self.w64 = [blk.folded(torch.float64) for blk in self.blocks]
        self.w32 = [tuple(t.to(torch.float32) for t in wb) for wb in self.w64]

    def _conv(self, i: int, a: torch.Tensor, f32: bool, bias: bool = True) -> torch.Tensor:
        blk = self.blocks[i]
        W, b = (self.w32 if f32 else self.w64)[i]
        return torch.nn.functional.conv2d(a, W, b if bias else None, padding=blk.conv.padding,
                                          stride=blk.conv.module.stride)

    def _pool(self, i: int, a: torch.Tensor) -> torch.Tensor:
        blk = self.blocks[i]
        if blk.pool is None:
            return a
        return torch.nn.functional.avg_pool2d(a, blk.pool.kernel, blk.pool.kernel)

    def forward(self, x: np.ndarray, f32: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
        """Conv pre-activations (flattened, per block) and the features, for one sample or a batch."""
        dt = torch.float32 if f32 else torch.float64
        a = torch.from_numpy(np.atleast_2d(x)).to(dt).reshape(-1, *self.net.input_shape)
        zs = []
        with torch.no_grad():
            for i in range(len(self.blocks)):
                z = self._conv(i, a, f32)
                zs.append(z.reshape(z.shape[0], -1).numpy())
                a = self._pool(i, torch.relu(z))
        return zs, a.reshape(a.shape[0], -1).numpy()

    def offsets(self, masks: list[np.ndarray]) -> tuple[list[np.ndarray], np.ndarray]:
        """Conv pre-activation offsets and feature offset of the linearised stack (input 0)."""
        a = torch.zeros(1, *self.net.input_shape, dtype=torch.float64)
        out = []
        with torch.no_grad():
            for i, blk in enumerate(self.blocks):
                z = self._conv(i, a, False)
                out.append(z.reshape(-1).numpy().copy())
                a = self._pool(i, z * torch.from_numpy(masks[i]).reshape(1, *blk.conv_shape))
        return out, a.reshape(-1).numpy()

    def pull_back(self, R: np.ndarray, block: int, masks: list[np.ndarray], at_output: bool) -> np.ndarray:
        """Rows ``R`` over block ``block``'s output (``at_output``) or its conv pre-activations, pulled
        back to the pixels through the masked linear conv stack (transposed convs)."""
        with torch.no_grad():
            g = torch.from_numpy(np.ascontiguousarray(R)).to(torch.float64)
            for i in range(block, -1, -1):
                blk = self.blocks[i]
                if at_output or i < block:
                    g = g.reshape(-1, *blk.out_shape)
                    if blk.pool is not None:
                        ky, kx = blk.pool.kernel
                        up = g.repeat_interleave(ky, 2).repeat_interleave(kx, 3) / (ky * kx)
                        full = torch.zeros(g.shape[0], *blk.conv_shape, dtype=torch.float64)
                        full[:, :, : up.shape[2], : up.shape[3]] = up
                        g = full
                    g = g.reshape(-1, *blk.conv_shape) * torch.from_numpy(masks[i]).reshape(1, *blk.conv_shape)
                g = g.reshape(-1, *blk.conv_shape)
                W, _ = self.w64[i]
                g = torch.nn.grad.conv2d_input((g.shape[0], *blk.in_shape), W, g, stride=blk.conv.module.stride,
                                               padding=blk.conv.padding)
            return g.reshape(g.shape[0], -1).numpy()


class _HeadView:
    """What the batch-level fishing loop needs: head pre-activations computed from the pixels."""

    def __init__(self, stack: _ConvStack, head: NetArrays):
        self.stack, self.head = stack, head
        self.depth, self.widths = head.depth, head.widths
        self.W, self.b = head.W, head.b

    def features(self, x: np.ndarray, f32: bool = False) -> np.ndarray:
        return self.stack.forward(x, f32)[1]

    def preacts(self, x: np.ndarray, f32: bool = False) -> list[np.ndarray]:
        single = np.ndim(x) == 1
        out = self.head.preacts(self.features(x, f32), f32=f32)
        return [z[0] for z in out] if single else out


class _SampleNet:
    """The linearised network of one sample: layers = conv units of every block, then the head's hidden
    layers. ``preacts`` is the real (piecewise-linear) forward pass; ``rows``/``offsets`` are exact inside
    the region ``pattern``. This is the interface :func:`fedleak.fishing.lp.solve_sample` uses."""

    def __init__(self, stack: _ConvStack, head: NetArrays):
        self.stack, self.head = stack, head
        self.nc = len(stack.blocks)

    def preacts(self, x: np.ndarray, f32: bool = False) -> list[np.ndarray]:
        zs, f = self.stack.forward(x, f32)
        hz = self.head.preacts(f, f32=f32)
        out = zs + hz
        return [z[0] for z in out] if np.ndim(x) == 1 else out

    def offsets(self, pattern: list[np.ndarray]) -> list[np.ndarray]:
        conv_off, f0 = self.stack.offsets(pattern[: self.nc])
        out = list(conv_off)
        a = f0
        for h in range(self.head.depth):
            c = self.head.W[h] @ a
            if self.head.b[h] is not None:
                c = c + self.head.b[h]
            out.append(c)
            a = pattern[self.nc + h] * c
        return out

    def rows(self, layer: int, neurons: np.ndarray, pattern: list[np.ndarray]) -> np.ndarray:
        neurons = np.asarray(neurons, dtype=np.int64)
        if layer < self.nc:
            R = _onehot(neurons, self.stack.blocks[layer].conv_dim)
            return self.stack.pull_back(R, layer, pattern[: self.nc], at_output=False)
        h = layer - self.nc
        R = self.head.W[h][neurons]
        for k in range(h - 1, -1, -1):
            R = (R * pattern[self.nc + k]) @ self.head.W[k]
        return self.stack.pull_back(R, self.nc - 1, pattern[: self.nc], at_output=True)


def _onehot(neurons: np.ndarray, dim: int) -> np.ndarray:
    R = np.zeros((len(neurons), dim))
    R[np.arange(len(neurons)), neurons] = 1.0
    return R


class _ConvFisher(_Fisher):
    """The batch loop of :class:`fedleak.fishing.perturb._Fisher` with head targets and conv regions."""

    def __init__(self, stack: _ConvStack, head: NetArrays, X: np.ndarray, y: np.ndarray, opts: FishingOptions):
        view = _HeadView(stack, head)
        super().__init__(None, view, X, y, opts)
        self.stack, self.head = stack, head
        self.sample_net = _SampleNet(stack, head)
        self.zc, _ = stack.forward(X)
        self.conv_patterns = [[(z[m] > 0).astype(np.float64) for z in self.zc] for m in range(self.M)]
        self.shift = len(stack.blocks)
        self.clear = opts.margin * CLEAR_FRACTION

    def solvability(self, m: int) -> list[Requirement]:
        """Rows that keep the lower conv blocks provably invertible: the attack solves a block from the
        units of its output that are active *beyond the error propagated from the block above*, and all
        units it uses must be proven active. A unit barely above zero breaks that proof, so every unit of
        a lower block must stay clear of zero by ``margin * CLEAR_FRACTION`` on its current side (lazy
        rows: written only near zero or when a forward pass shows a violation)."""
        reqs = []
        for i in range(self.shift - 1):
            z = self.zc[i][m]
            for j in np.nonzero(np.abs(z) < CLEAR_WATCH)[0]:
                reqs.append(Requirement(i, int(j), 1 if z[j] > 0 else -1, self.clear))
        return reqs

    def solve(self, m: int) -> SampleOutcome:
        if any((T < 0).any() for T in self.targets[m]):
            return SampleOutcome("no_target", self.X[m].copy(), message="no neuron left that this sample could own")
        own, lazy = self.requirements(m)
        s = self.shift
        own = [Requirement(r.layer + s, r.neuron, r.sign, r.margin) for r in own]
        lazy = [Requirement(r.layer + s, r.neuron, r.sign, r.margin) for r in lazy] + self.solvability(m)
        pattern = list(self.conv_patterns[m]) + list(self.patterns[m])
        try:
            return solve_sample(self.sample_net, self.X[m], pattern, own, lazy, self.settings)
        except Exception as exc:  # a solver crash must not take the batch down; the sample stays clean
            return SampleOutcome(f"error:{type(exc).__name__}", self.X[m].copy(), message=str(exc))

    def retarget(self, m: int, banned: list[set[int]] | None = None) -> None:
        zs, used = self.others_state(m)
        f = self.A.features(self.X[m])[0]
        T, P = retarget(self.head, f, int(self.y[m]), zs, used, self.k, self.o.margin, gamma=self.o.gamma,
                        banned=banned)
        self.targets[m] = T
        self.patterns[m] = P

    def run(self) -> None:
        F = self.A.features(self.X)
        asg = choose_targets(self.head, F, self.y, self.k, self.o.margin, gamma=self.o.gamma, burden=self.o.burden)
        self._run_from(asg)


def fish_cnn(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None = None, *, solve_check: bool = True,
             **options) -> FishingResult:
    """:func:`fedleak.fish` for CNNs (``as_relu_cnn`` models): ExANs in the FC head, the lower conv blocks
    kept provably invertible, conv regions kept where they matter. Same options and result as the MLP
    version; ``certifiable_before/after`` are the CNN condition of
    :func:`~fedleak.analysis.conv_exclusivity.analyze_conv_exclusivity` (head ExANs **and** every conv
    block solvable with a proof). That check runs the attack's block solves for every sample (most of the
    wall time at batch 32); ``solve_check=False`` skips it, and then ``certifiable_*`` is the head
    condition alone."""
    from fedleak.analysis.conv_exclusivity import analyze_conv_exclusivity

    start = time.perf_counter()
    opts = options.pop("options", None) or FishingOptions.from_kwargs(**options)
    if not isinstance(inputs, torch.Tensor) or inputs.ndim < 2 or inputs.shape[0] == 0:
        raise FedleakError("inputs must be a non-empty batch tensor (M x C x H x W)")
    net = as_relu_cnn(model)
    if inputs[0].numel() != int(np.prod(net.input_shape)):
        raise FedleakError(f"each input has {inputs[0].numel()} values but the model takes {net.input_shape}")
    if not torch.isfinite(inputs).all():
        raise FedleakError("the inputs hold NaN or inf values")
    if float(inputs.min()) < 0 or float(inputs.max()) > 1:
        raise FedleakError("fishing works on data in [0, 1]; the inputs leave that range")
    dtype = net.blocks[0].conv.module.weight.dtype
    shaped = inputs.reshape(inputs.shape[0], *net.input_shape)
    with torch.no_grad():
        if labels is None:
            labels = model(shaped.to(dtype)).argmax(1)
        labels = torch.as_tensor(labels).long().reshape(-1)
    if labels.shape[0] != inputs.shape[0]:
        raise FedleakError(f"{inputs.shape[0]} inputs but {labels.shape[0]} labels")
    min_other = min(1, opts.targets_other)
    before = analyze_conv_exclusivity(model, shaped.to(dtype), labels, min_last=opts.targets_last,
                                      min_other=min_other, solve=solve_check)
    X = inputs.detach().reshape(inputs.shape[0], -1).to(torch.float64).numpy().copy()
    stack = _ConvStack(net)
    head = NetArrays(net.head)
    fisher = _ConvFisher(stack, head, X, labels.numpy(), opts)
    with single_threaded_blas():
        fisher.run()
    Xp = np.clip(fisher.Xp, 0.0, 1.0)
    out = torch.from_numpy(Xp).to(inputs.dtype).reshape(inputs.shape).clamp(0, 1)
    out_shaped = out.reshape(inputs.shape[0], *net.input_shape)
    after = analyze_conv_exclusivity(model, out_shaped.to(dtype), labels, min_last=opts.targets_last,
                                     min_other=min_other, solve=solve_check)
    with torch.no_grad():
        pred0 = model(shaped.to(dtype)).argmax(1)
        pred1 = model(out_shaped.to(dtype)).argmax(1)
    samples = sample_records(fisher, X, Xp, out, before.certifiable if solve_check else before.head_certifiable,
                             after.certifiable if solve_check else after.head_certifiable, pred0, pred1)
    return FishingResult(out, labels, samples, opts, time.perf_counter() - start)
