"""Class fishing ("Fishing for User Data in Large-Batch Federated Learning via Gradient Magnification", Wen et al.,
ICML 2022): the server-side change of the output layer, and the ``"class-fishing"`` attack that reads it.

The server keeps the network below the output layer as it is. It zeroes every output row but the target class's,
sets that row to one value ``m`` (the multiplier) and gives every other class a bias at least ``margin`` above the
largest target logit any input of the data's range can reach. The target class's probability is then below
``exp(-margin)`` for every input: zero in float32. A sample of another class sends no gradient below the output
layer (its factor on the target logit is that probability), and a sample of the target class sends exactly
``-m / M`` to every first-layer unit it opens (``M`` the batch size), where the network has one hidden layer.

So the first layer's bias gradient counts: row ``j`` is ``-m / M`` times the number of target samples that open
unit ``j``, an integer read off the update, and the target's output bias is ``-k / M`` for the batch's ``k``
target samples. A row whose count is one holds one sample's input times ``-m / M`` (Phong et al.'s
``x = dW_j / db_j``), exactly: the count, an integer, is the proof, and no blend of samples can have it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedleak.attacks.exact.grouping import group_rows
from fedleak.attacks.malicious.certify import (
    Candidates,
    MaliciousOptions,
    Verdict,
    finish,
    resolve_options,
)
from fedleak.attacks.malicious.read_layer import first_layer, first_two_dense
from fedleak.attacks.masked_input import first_reader, input_masking
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError, ModelError, UpdateError
from fedleak.model_copy import copy_model
from fedleak.nets import Network, ReluMLP
from fedleak.nets.layers import Dense
from fedleak.reconstruction import Reconstruction
from fedleak.updates import WeightUpdate
from fedleak.validation import check_data_range, check_float, check_int
from fedleak.weight_change import either_sign

F64 = torch.float64
MARGIN = 150.0  # exp(-150) ~ 7e-66: zero in float32, and far below every tolerance in float64
GAP = 110.0  # the least margin the proof accepts: exp(-110) ~ 2e-48 rounds to zero in float32
EPS32 = float(torch.finfo(torch.float32).eps)
COUNT_TOL = 0.05  # a row's count must lie this close to an integer (float rounding is orders of magnitude below)


def _layers(head: ReluMLP, what: str) -> tuple[Dense, Dense]:
    """The head's first and output Linear layers; the count proof reads a network with one hidden layer."""
    if head.depth != 1:
        raise ModelError(f"{what} reads a network with one hidden ReLU layer (its first layer's units then each get "
                         f"the same signal from every target sample); this one has {head.depth}")
    first, out = head.dense
    if out.bias is None:
        raise ModelError(f"{what} needs a bias in the output layer '{out.name}'")
    return first, out


def _largest_logit(first, out_row: torch.Tensor, target_bias: float, data_range: tuple[float, float]) -> float:
    """The largest target logit ``sum_j w_j relu(W_j x + b_j) + b_t`` over inputs in the box ``data_range``
    (``w``: the target row, non-negative)."""
    lo, hi = data_range
    W = first.weight.detach().to(F64).reshape(first.out_features, -1)
    top = torch.where(W > 0, W * hi, W * lo).sum(1) + first.bias.detach().to(F64)  # each unit's largest input
    return float((out_row.to(F64) * top.clamp_min(0)).sum()) + target_bias


def _check_range(data_range: object) -> tuple[float, float]:
    checked = check_data_range(data_range)
    if checked is None:
        raise FedleakError("data_range must be (low, high): the range of the data, on which the margin is proven")
    return checked


def class_fishing_weights(model: nn.Module, target: int, *, data_range: tuple[float, float] = (0.0, 1.0),
                          multiplier: float = 2.0, margin: float = MARGIN, inplace: bool = False) -> nn.Module:
    """Return ``model`` with its output layer set for class fishing on class ``target`` (same architecture).

    The target row becomes ``multiplier`` everywhere (its bias is kept), every other row zero, and every other
    class's bias the largest target logit an input in ``data_range`` can reach plus ``margin`` (Wen et al. use
    1000 for every image model; this one is proven for the model's own weights). Wen et al.'s multiplier is 0.5; a
    larger one lifts what a one-step weight update carries above the float32 rounding of the returned weights at
    small learning rates. The model is copied unless ``inplace``."""
    multiplier = check_float("multiplier", multiplier, low=1e-12)
    margin = check_float("margin", margin, low=GAP)
    data_range = _check_range(data_range)
    model = model if inplace else copy_model(model)
    training = model.training
    first, out = _layers(first_two_dense(model.eval())[0], "class fishing")  # read in eval mode; its mode is kept
    model.train(training)
    own = {id(p) for p in model.parameters()}
    if id(out.weight) not in own or id(out.bias) not in own:
        raise ModelError(f"the output layer '{out.name}' computes its weights (a folded norm, a derived tensor): "
                         "class fishing sets them, so they must be the layer's own parameters")
    classes = out.out_features
    target = check_int("target", target, low=0, high=classes - 1)
    row = torch.full((first.out_features,), multiplier, dtype=F64)
    top = _largest_logit(first, row, float(out.bias.detach()[target]), data_range)
    with torch.no_grad():
        weight = torch.zeros_like(out.weight)
        weight[target] = multiplier
        out.weight.copy_(weight)
        bias = torch.full_like(out.bias, top + margin)
        bias[target] = out.bias[target]
        out.bias.copy_(bias)
    return model


BUILD = "build it with fedleak.class_fishing_weights(model, target)"


def _fished_row(out) -> tuple[int, float]:
    """The target class and multiplier of a fished output layer: every row zero but one, which holds one positive
    value; :class:`ModelError` otherwise."""
    W = out.weight.detach().to(F64)
    live = torch.nonzero(W.abs().amax(1) > 0).flatten().tolist()
    if len(live) != 1 or float(W[live[0]].min()) != float(W[live[0]].max()) or float(W[live[0], 0]) <= 0:
        raise ModelError("the model's output layer is not class-fished: it needs every row zero but the target "
                         f"class's, which holds one positive value; {BUILD}")
    return live[0], float(W[live[0], 0])


def fished_target(net: Network) -> int | None:
    """The class a class-fished network targets (an MLP, its output layer so built, one hidden layer), else None."""
    try:
        return None if net.blocks else _fished_row(_layers(net.head, "class fishing")[1])[0]
    except ModelError:
        return None


def fished_class(head: ReluMLP, data_range: tuple[float, float]) -> tuple[int, float]:
    """The target class and multiplier of a class-fished network (its dense ``head``), proven to silence every other
    class's samples on ``data_range``; :class:`ModelError` saying what is missing otherwise."""
    first, out = _layers(head, "the class-fishing attack")
    target, multiplier = _fished_row(out)
    W, b = out.weight.detach().to(F64), out.bias.detach().to(F64)
    top = _largest_logit(first, W[target], float(b[target]), data_range)
    others = torch.cat([b[:target], b[target + 1:]])
    if float(others.min()) - top < GAP:
        raise ModelError(f"the other classes' biases lie {float(others.min()) - top:.3g} above the largest target "
                         f"logit an input in {data_range} can reach; the proof needs {GAP:g} (a target "
                         f"probability that float32 rounds to zero): {BUILD}, data_range={data_range}")
    return target, multiplier


@register_attack("class-fishing", update_kinds=("gradient", "weights"), needs_relu_network=True, reads_range=True,
                 description="malicious class-fishing output layer (Wen et al.): the target class's samples, "
                             "certified by counting")
def class_fishing_attack(model: nn.Module, update, *, input_shape: tuple[int, ...] | None = None,
                         data_range: tuple[float, float] = (0.0, 1.0), options: MaliciousOptions | None = None,
                         **overrides) -> Reconstruction:
    """Rebuild the target class's samples from an update of a class-fished model (:func:`class_fishing_weights`).

    ``update``: a gradient with its ``num_examples``, or a weight update with ``num_examples`` and the
    ``learning_rate`` and the one local step the server set. Each first-layer row's count of target samples is read
    off its bias entry; rows of count one whose implied inputs ``dW_j / db_j`` coincide are one sample, read off the
    row with the smallest worst-case error bound, and certified when it opens every one of them, lies in
    ``data_range`` and that bound is below ``exact_tol`` of the range. Certified samples are then peeled off every
    row they open (each unit's count drops by one), which leaves more rows of count one, until nothing new is
    certified. Samples of other classes send nothing below the output layer and are not rebuilt. A change whose sign
    was not read (two or three classes) is tried with the other sign where this one certifies nothing
    (:func:`~fedleak.weight_change.either_sign`).
    """
    opts = resolve_options(options, overrides)
    data_range = _check_range(data_range)
    return either_sign(lambda u: _fished(model, u, input_shape, data_range, opts), update)


def _fished(model: nn.Module, update, input_shape: tuple[int, ...] | None, data_range: tuple[float, float],
            opts: MaliciousOptions) -> Reconstruction:
    """:func:`class_fishing_attack` on ``update`` as it is."""
    start = time.perf_counter()
    net, G, g, n_examples, (nG, ng), _ = first_layer(model, update, "class-fishing", input_shape)
    target, multiplier = fished_class(net.head, data_range)
    if not n_examples:
        raise UpdateError("the class-fishing attack reads counts at the scale multiplier / num_examples: give the "
                          "number of examples the client reported (GradientUpdate(grads, num_examples=M))")
    rate = 1.0
    if isinstance(update, WeightUpdate):
        if update.learning_rate is None or update.local_steps != 1:
            raise UpdateError("the class-fishing attack reads a weight update of one local SGD step, at the scale "
                              "lr x multiplier / num_examples: give learning_rate=lr and local_steps=1 with the update "
                              "(the rate and the one step the server set); after a first step the fished output layer "
                              "has moved and other classes' samples reach the first layer")
        rate = update.learning_rate
    unit = rate * multiplier / n_examples  # what one target sample puts on the bias of a unit it opens
    counts = -g / unit
    nearest = counts.round()
    off = (counts - nearest).abs()
    broken = (off > COUNT_TOL + ng / unit) & (nearest.abs() + off > 0.5)
    notes: list[str] = []
    sent = _target_count(update, net.head.dense[1].bias_name, target, n_examples, rate)
    if sent is not None and sent > n_examples:
        notes.append(f"the target's output bias counts {sent} samples in a batch of {n_examples}: the update is not "
                     "the gradient of a mean loss over num_examples samples")
        sent = None
    elif sent is not None:
        notes.append(f"the batch holds {sent} sample(s) of the fished class {target} (its output bias gradient); "
                     f"the other {n_examples - sent} send nothing below the output layer and are not rebuilt")
    refused = ""
    if bool((nearest < 0).any()) or bool(broken.any()):
        refused = (f"{int(broken.sum())} first-layer row(s) hold no whole count of target samples at the scale "
                   f"{unit:.3g}: the update is not one mean-loss gradient (or one SGD step) of this model as it "
                   "reads (a client that ran Dropout in training mode, or trained with label smoothing or class "
                   "weights, sends other counts); nothing is certified")
        notes.append(refused)
    # each row's error: the update's rounding, plus the client's float32 arithmetic on its c samples' terms (each at
    # most unit x the data's largest magnitude): any order of summing them errs by at most (c - 1) half-epsilons of
    # their total, the products and a weight update's lr x gradient by one more half-epsilon each
    count = nearest.abs().clamp_min(1)
    summed = count * (count + 1) / 2 * EPS32 * unit
    reading = _Rows(G.clone(), g.clone(), nearest, nG + summed * max(abs(v) for v in data_range), ng + summed,
                    net.head.weights(F64)[0].to(G.device), net.head.biases(F64)[0].to(G.device), unit)
    scale = rate / n_examples  # each target sample's factor on its logit, as the exact attack reports it
    found, last = _peel_all(reading, lambda c: _verdict(c, target, data_range, opts.exact_tol, refused, scale),
                            opts.group_tol, sent)
    if sent is not None and len(found) < sent and not refused:
        notes.append(f"{sent - len(found)} sample(s) of class {target} open no unit alone, even after the "
                     "certified ones are peeled off: not rebuilt")
    chosen = found + last
    X = (torch.stack([c.x for c, _ in chosen]) if chosen else torch.empty(0, G.shape[1], dtype=F64, device=G.device))
    cands = Candidates(X, [c.rows for c, _ in chosen], [g[c.rows] for c, _ in chosen], [[] for _ in chosen], None,
                       torch.tensor([c.error for c, _ in chosen], dtype=F64))
    masking = input_masking(model, first_reader(net), net.input_shape)
    rec = finish(net, "class-fishing", cands, [v for _, v in chosen], n_examples, opts, start, notes, masking)
    if sent is not None and int(rec.certified.sum()) > sent:  # cannot happen for a mean-loss gradient of the model
        raise UpdateError(f"{int(rec.certified.sum())} target samples certified, but the output bias counts {sent}: "
                          "the update is not a gradient of this model")
    return rec


@dataclass(frozen=True)
class _Candidate:
    """Rows of count one that agree on one input ``x`` (max-abs error at most ``error``); ``opens``: whether ``x``
    opens every one of them; ``peeled``: samples subtracted from these rows before."""

    x: torch.Tensor
    rows: list[int]
    error: float
    opens: bool
    peeled: int


@dataclass
class _Rows:
    """The first layer's rows still to explain: weights ``G`` and biases ``g`` less the samples peeled off,
    ``left`` their counts, ``err`` and ``err_bias`` bounds on the error of each row's weight and bias entries, the
    first layer ``W``, ``b``, and the ``unit`` one target sample puts on a bias entry."""

    G: torch.Tensor
    g: torch.Tensor
    left: torch.Tensor
    err: torch.Tensor
    err_bias: torch.Tensor
    W: torch.Tensor
    b: torch.Tensor
    unit: float
    peeled: torch.Tensor | None = None  # per row: samples subtracted from it
    unsure: torch.Tensor | None = None  # per row: a peeled sample may or may not open it

    def candidates(self, group_tol: float) -> list[_Candidate]:
        unsure = self.unsure if self.unsure is not None else torch.zeros_like(self.left, dtype=torch.bool)
        peeled = self.peeled if self.peeled is not None else torch.zeros_like(self.left)
        ones = torch.nonzero((self.left == 1) & ~unsure).flatten()
        if not len(ones):
            return []
        groups = group_rows(self.G[ones] / self.g[ones, None], torch.argsort(-self.g[ones].abs()), group_tol)
        out = []
        for grp in groups:
            r = ones[grp.rows]
            # each row reads the sample on its own, within its own bound; the rows' average is within no less than
            # the best one's (in the worst case the errors do not cancel): the best row's reading is the sample's
            rows = self.G[r] / self.g[r, None]
            slack = self.g[r].abs() - self.err_bias[r]  # each bias entry is at least this far from 0
            bounds = torch.where(slack > 0, (self.err[r] + rows.abs().amax(1) * self.err_bias[r])
                                 / slack.clamp_min(1e-300), torch.full_like(slack, math.inf))
            best = int(torch.argmin(bounds))
            x = rows[best]
            opens = bool(((self.W[r] @ x + self.b[r]) > 0).all())
            out.append(_Candidate(x, r.tolist(), float(bounds[best]), opens, int(peeled[r].max())))
        return out

    def peel(self, c: _Candidate) -> None:
        """Take sample ``c`` off every row it opens; a row it may or may not open (within its error) is set aside."""
        pre = self.W @ c.x + self.b
        reach = c.error * self.W.abs().sum(1)
        opens = pre > reach
        self.unsure = (self.unsure if self.unsure is not None else torch.zeros_like(opens)) | (pre.abs() <= reach)
        self.peeled = (self.peeled if self.peeled is not None else torch.zeros_like(self.left)) + opens.to(F64)
        self.G[opens] += self.unit * c.x
        self.g[opens] += self.unit
        self.left[opens] -= 1
        self.err[opens] += self.unit * c.error  # its rows less unit x its rebuilt input, which errs by c.error


def _peel_all(reading: _Rows, verdict_of: Callable[[_Candidate], Verdict], group_tol: float, sent: int | None
              ) -> tuple[list[tuple[_Candidate, Verdict]], list[tuple[_Candidate, Verdict]]]:
    """Read the rows of count one, certify, peel the certified samples off and read again, until nothing new is
    certified (or every one of the ``sent`` target samples is): the certified samples, one per sample, and the last
    pass's uncertified candidates."""
    found: list[tuple[_Candidate, Verdict]] = []
    last: list[tuple[_Candidate, Verdict]] = []
    while True:
        judged = [(c, verdict_of(c)) for c in reading.candidates(group_tol)]
        last = [(c, v) for c, v in judged if not v.certified]
        peeled = 0
        for c, v in judged:
            if not v.certified or any(float((c.x - k.x).abs().max()) <= c.error + k.error for k, _ in found):
                continue  # one sample read off other rows, or a copy of one within the bounds: kept and peeled once
            found.append((c, v))
            reading.peel(c)
            peeled += 1
        if not peeled or (sent is not None and len(found) >= sent):
            return found, last


def _verdict(c: _Candidate, target: int, data_range: tuple[float, float], exact_tol: float, refused: str,
             scale: float) -> Verdict:
    lo, hi = data_range
    tol = exact_tol * (hi - lo)
    inside = bool(((c.x >= lo - tol) & (c.x <= hi + tol)).all())
    after = f", after {c.peeled} certified sample(s) were taken off them" if c.peeled else ""
    if refused:
        cert, why = False, refused
    elif not c.opens:
        cert, why = False, "the rebuilt input does not open the units it was read from"
    elif not inside:
        cert, why = False, f"the rebuilt input leaves the data range {data_range}, on which the margin is proven"
    elif c.error > tol:
        cert, why = False, f"rounding in the update may put an error of {c.error:.1e} on it (> {tol:.1e})"
    else:
        cert, why = True, (f"alone among the target samples on {len(c.rows)} first-layer unit(s){after}: each counts "
                           f"one sample of class {target}, so its row is that sample")
    return Verdict(target, cert, why, scale, 0.0, cert)


def _target_count(update, out_bias: str | None, target: int, n_examples: int, rate: float) -> int | None:
    """The number of target samples, ``-M / rate`` times the target's output bias gradient, where it is a whole
    number (None otherwise)."""
    if out_bias is None:
        return None
    if isinstance(update, WeightUpdate):
        entry = update.before[out_bias].reshape(-1)[target].to(F64) - update.after[out_bias].reshape(-1)[target].to(F64)
    else:
        entry = update.gradients[out_bias].reshape(-1)[target].to(F64)
    count = -float(entry) * n_examples / rate
    return round(count) if round(count) >= 0 and abs(count - round(count)) <= COUNT_TOL else None
