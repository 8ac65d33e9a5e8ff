"""The first layer of a one-sample gradient (Phong et al., 2017): any model whose input enters a Linear layer with a
bias gives that input away, whatever the layers after it compute.

For one sample, a Linear layer ``z = W x + b`` has ``dL/dW = (dL/dz) x^T`` and ``dL/db = dL/dz``: every row with
``dL/db_i != 0`` is the input times ``dL/db_i``, through GELU, tanh or leaky ReLU activations, LayerNorm, residual
connections or attention after it, none of which the exact exclusivity route reads. The attack takes the input
from the row with the largest bias gradient (the client's float32 product ``dL/dz_i * x_j`` is rounded once, so
the row gives every ``x_j`` to within two units in the last place) and certifies it when

1. the update is the gradient of **one** sample (``num_examples`` 1): for two, each row is ``d_ai x_a + d_bi x_b``,
   and rows can agree on a blend of them;
2. the layer reads the sample as it is (flattened), and its weight and bias serve no other layer: a forward pass
   of a probe input checks that the layer's input is the probe and that the layer runs once, and the parameters
   are registered once;
3. the model's gradient at the rebuilt input, for one of its classes (the one its output layer's bias gradient
   marks, else each in turn), times one positive scale (1 for a client's gradient, the learning rate for the
   change of one SGD step), reproduces every tensor of the update to :data:`RESIDUAL_TOL` relative. This
   rejects updates that are not the plain gradient but whose first layer still looks like one sample's (the
   rows of a sign-compressed gradient give ``sign(x)``), and a client whose model computes otherwise (Dropout in
   training mode, another loss);
4. in training mode the layer reads the sample as it is too (:func:`fedleak.attacks.masked_input.input_masking`),
   unless the client is known to run the model in eval mode (``train_dropout=False``): a Dropout on the input (a
   module or a functional one), or noise the model adds while it trains, changes it there, and the update is
   exactly the gradient of the changed copy, which check 3 cannot tell from the sample.

Then every single sample with this gradient (at any scale) is the rebuilt one, to rounding: the certificate's
claim is the standard one (exact to :data:`fedleak.metrics.EXACT_TOL` of the data range).

A batch's gradient, and a FedAvg client's weight change (one local step or several, at any learning rate), are
read row by row instead, uncertified (:mod:`fedleak.attacks.first_layer_rows`). The layer itself is found by a probe
forward pass (:mod:`fedleak.attacks.first_linear`).

A gradient clipped by value (``torch.nn.utils.clip_grad_value_``, read off the update: :mod:`fedleak.clipped_values`)
holds entries cut to the bound: the input is read off a row none of whose entries reach it, and check 3 compares the
update with the model's gradient clipped alike (the scale fitted on the entries below the bound); where the plain
check fails and no clipping shows (a clip that cut one unit's entries only), the update's largest magnitude is tried
as the bound. A batch's rows that hold an entry at the bound are left out.

A gradient whose values carry a format coarser than float32 (sent in float16 or bfloat16, or computed under
autocast: :mod:`fedleak.precision`) is known to that rounding only: every tolerance grows with it
(:func:`within_rounding`), one sample's input is read off all its rows weighed together (their roundings average
out), and nothing is certified: the input is the sample's to within the rounding, not exactly.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from torch import nn

from fedleak.adaptive_step import adaptive_step
from fedleak.attacks.at_before import model_at_before
from fedleak.attacks.class_fit import ClassGradients, Fit, Observed, class_fit
from fedleak.attacks.first_layer_rows import ROUNDED_ROUTE, LayerRows, least_squares, rebuild_rows
from fedleak.attacks.first_linear import FirstLinear, layer_rows
from fedleak.attacks.label_sign import without_unsigned_labels
from fedleak.attacks.labels import class_signal, with_negated_hint
from fedleak.attacks.masked_input import withheld
from fedleak.attacks.registry import register_attack
from fedleak.attacks.row_decay import peel_row_decay, read_row_decay
from fedleak.attacks.zero_sum import UNKNOWN_SIZE, zero_sum_breach
from fedleak.clipped_values import ValueClip, read_value_clip
from fedleak.errors import FedleakError, OptionError
from fedleak.logits_of import per_sample_logits
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.input_map import first_layer_shape
from fedleak.nets.input_peel import peel_input_map
from fedleak.nets.output_layer import output_layer_names
from fedleak.option_fields import options_from, validate_fields
from fedleak.precision import Precision, update_precision
from fedleak.reconstruction import Reconstruction, SampleRecovery
from fedleak.update_kind import describe_update
from fedleak.updates import (
    GradientUpdate,
    WeightUpdate,
    as_gradient_update,
    check_matches_model,
)
from fedleak.validation import check_module

F64 = torch.float64
RESIDUAL_TOL = 1e-5  # the most relative mismatch, per tensor, between the update and the rebuilt sample's gradient
ROUNDING_TOL = 4.0  # an update's epsilons the tolerances allow where it carries a format coarser than float32
#: ... and a class's fit: computed in that format (autocast), the client's loss vector is off by several of them
FIT_ROUNDING_TOL = 16.0
ROUTE = "first-layer"


@dataclass(frozen=True)
class FirstLayerOptions:
    """``tolerance``: the most relative mismatch, per tensor, between the update and the gradient of the rebuilt
    sample for a certificate. ``train_dropout``: whether the client ran the model's Dropout in training mode; where
    a Dropout acts on the input before the Linear layer, the input is certified only when told False (the client
    ran the model in eval mode): in training mode the update is that of a masked copy of the input. For a batch
    (``num_examples`` other than 1): rows whose implied inputs agree within ``group_tol`` (relative) are one
    candidate, kept where a class's recomputed gradient fits its rows' bias gradients within ``fit_tol`` at the
    batch's common scale within ``scale_tol`` (:mod:`fedleak.attacks.first_layer_rows`; uncertified)."""

    tolerance: float = RESIDUAL_TOL
    train_dropout: bool | None = None
    group_tol: float = 1e-4
    fit_tol: float = 1e-3
    scale_tol: float = 1e-4

    def __post_init__(self) -> None:
        validate_fields(self)
        for name in ("tolerance", "group_tol", "fit_tol", "scale_tol"):
            if not 0 < getattr(self, name) < 1:
                raise OptionError(f"{name} must lie in (0, 1), got {getattr(self, name)}")


@register_attack(ROUTE, update_kinds=("gradient", "weights"),
                 description="one sample's gradient: x = dW_i/db_i from the first Linear layer of any model (Phong "
                             "et al. 2017), certified by reproducing the whole update; a batch's agreeing rows "
                             "(gradients, and FedAvg weight changes of any number of local steps), uncertified")
def first_layer_attack(model: nn.Module, update, *, input_shape: tuple[int, ...] | None = None,
                       **options) -> Reconstruction:
    """Rebuild the one sample of a FedSGD gradient from the first Linear layer of any model (see the module).

    ``update``: a :class:`~fedleak.GradientUpdate` or a dict of gradients; its ``num_examples`` must be 1 for a
    certificate. A :class:`~fedleak.WeightUpdate` is read row by row, uncertified, at its ``before`` weights.
    ``input_shape``: one sample's shape (default: what fedleak infers from the model).
    ``options``: the fields of :class:`FirstLayerOptions`.
    """
    start = time.perf_counter()
    opts = options_from(FirstLayerOptions, options, what="first-layer option")
    model = check_module(model)
    if isinstance(update, WeightUpdate):
        update.parameters_of(model)
        model = model_at_before(model, update)
    # a normalisation inside forward: the layer reads what it makes of the sample, mapped back after
    model, input_map = peel_input_map(model, input_shape=input_shape)
    input_shape = first_layer_shape(input_map, input_shape)  # (what the model without the map reads)
    with buffers_kept(model):  # a model in training mode moves its BatchNorm statistics in every pass
        if isinstance(update, WeightUpdate):
            rec = _weight_rows(model, update, input_shape, opts, start)
        else:
            update = as_gradient_update(update)
            check_matches_model(model, update.gradients)
            rec = _attack(model, update, input_shape, opts, start)
    if input_map is None:
        return rec
    from fedleak.metrics import EXACT_TOL  # (scipy: imported only here)

    return input_map.restore(rec, EXACT_TOL)


def _weight_rows(model: nn.Module, update: WeightUpdate, input_shape: tuple[int, ...] | None,
                 opts: FirstLayerOptions, start: float) -> Reconstruction:
    """A weight change's first-layer rows: the learning rate, unknown, leaves no scale to check; several local steps
    (or an unknown number) leave no exact class fit either (:class:`~fedleak.attacks.first_layer_rows.LayerRows`)."""
    layer, G, g, shape, notes = layer_rows(model, update.delta(), input_shape, "change")
    G, g = G.to(F64), g.to(F64)
    # what SGD's weight decay moves each row by, up to its factor: the row (the rebuilt one's own direction)
    W = (update.before[layer.weight] if layer.normed is None else layer.normed.decay_direction(model)).to(F64)
    b = update.before[layer.bias].to(F64)
    decay = read_row_decay(G, g, W, b)  # SGD's weight decay, over any number of steps
    if decay is not None:
        G, g = peel_row_decay(decay, G, g, W, b)
        notes = (*notes, decay.describe())
    caveat = _caveat(layer, opts)
    rows = LayerRows(G, g, update.num_examples, None, update.local_steps != 1, caveat, _compressed(model, update))
    rec = rebuild_rows(model, layer.name, rows, shape, opts, notes, start)
    step = adaptive_step(update.delta())
    return rec if step is None else rec.without_samples(step.describe())  # (its rows hold signs: no input)


def _caveat(layer: FirstLinear, opts: FirstLayerOptions) -> str:
    """Why the input the layer reads may not be the client's sample, in words (empty where it is): the model changes
    it in training mode (a Dropout on it), or computes it from the sample by ops that may give other samples the same
    one (a clamp, a ReLU, a branch on the values)."""
    changed = (f"{layer.changed}: the rebuilt values are what '{layer.name}' read, not certified as the client's "
               "sample") if layer.changed else ""
    return "; ".join(c for c in (withheld(layer.masking, opts.train_dropout), changed) if c)


def within_rounding(opts: FirstLayerOptions, precision: Precision) -> FirstLayerOptions:
    """``opts`` with every tolerance raised to :data:`ROUNDING_TOL` (a gradient's fit: :data:`FIT_ROUNDING_TOL`)
    times the update's epsilon where its values carry a format coarser than float32
    (:class:`~fedleak.precision.Precision`): a row's ratios, a class's fit and a scale are known to that rounding
    only."""
    eps = 2 * precision.roundoff
    floors = {"group_tol": ROUNDING_TOL * eps, "scale_tol": ROUNDING_TOL * eps, "fit_tol": FIT_ROUNDING_TOL * eps,
              "tolerance": FIT_ROUNDING_TOL * eps}
    return replace(opts, **{name: max(getattr(opts, name), floor) for name, floor in floors.items()})


def _other_loss(model: nn.Module, observed: dict[str, torch.Tensor], batch_size: int | None,
                precision: Precision) -> str:
    """Why a gradient is no softmax cross-entropy's, in words (its output layer's bias does not sum to zero:
    :func:`~fedleak.attacks.zero_sum.zero_sum_breach`, for a mean or a summed loss over ``batch_size``), or empty."""
    try:
        bias = output_layer_names(model)[1]
    except FedleakError:
        return ""
    if bias is None or bias not in observed:
        return ""
    b = observed[bias]
    return zero_sum_breach(b, float(batch_size or UNKNOWN_SIZE), samples=batch_size or UNKNOWN_SIZE,
                           bound=b.detach().abs().to(F64) * precision.roundoff)


def _compressed(model: nn.Module, update: GradientUpdate | WeightUpdate) -> str:
    """Why a batch's rows are not the client's, in words: the update looks sparsified (dropped entries read as 0)
    or quantised (:func:`~fedleak.update_kind.describe_update`); else empty."""
    kind = describe_update(update, model)
    if kind.sparsified is not None:
        return (f"the update looks sparsified ({kind.sparsified:.0%} of its entries are exactly 0): entries the "
                "client dropped read as 0 in these rows, so the input differs from the sample wherever its rows' "
                "smallest entries were dropped")
    if kind.quantised is not None:
        return (f"the update looks quantised ({kind.quantised} distinct values in its largest tensor): the rows "
                "carry that rounding, so the input is the sample's only to within it")
    return ""


def _attack(model: nn.Module, update: GradientUpdate, input_shape: tuple[int, ...] | None, opts: FirstLayerOptions,
            start: float) -> Reconstruction:
    layer, G, g, shape, notes = layer_rows(model, dict(update.gradients), input_shape, "gradient")
    precision = update_precision(update.gradients)
    rounded = ""
    if precision.coarse:  # sent in half precision, or computed under autocast: the rows agree to its rounding only
        opts = within_rounding(opts, precision)
        rounded = (f"{precision.describe()}: the rows, and so the input, are known to its rounding only "
                   f"({precision.roundoff:.1e} relative)")
    observed = dict(update.gradients)
    clip = read_value_clip(observed)  # clip_grad_value_: rows with an entry at the bound are not the sample's
    if update.num_examples != 1:  # a batch (or a count not reported): the rows that agree, uncertified
        caveat, G, g = _caveat(layer, opts), G.to(F64), g.to(F64)
        if clip is not None:  # read as silent: the rows no entry at the bound touches stay exact
            whole = ~(clip.censored(G).any(1) | clip.censored(g))
            G, g = G * whole[:, None], g * whole
            caveat = "; ".join(c for c in (caveat, f"{clip.describe()}: the rows holding an entry at it were left "
                                                   "out, and no certificate covers a batch clipped so") if c)
        m = update.num_examples
        compressed = _compressed(model, update)  # dropped entries break the bias's sum too: read as before
        rows = LayerRows(G, g, m, None if m is None else 1.0 / m, caveat=caveat, compressed=compressed,
                         rounded=rounded, other_loss="" if compressed else _other_loss(model, observed, m, precision))
        return with_negated_hint(model, observed, rebuild_rows(model, layer.name, rows, shape, opts, notes, start))
    read = _read_one(model, G, g, shape, observed, opts, rounded, clip)
    if clip is None and isinstance(read, tuple) and min(f.residual for f in read[1].values()) > opts.tolerance:
        # a clip that cut one unit's entries does not show in the values: tried as the hypothesis it is
        top = read_value_clip(observed, min_units=1)
        again = _read_one(model, G, g, shape, observed, opts, rounded, top, read[2]) if top is not None else ""
        if isinstance(again, tuple) and min(f.residual for f in again[1].values()) <= opts.tolerance:
            read, clip = again, top
    if isinstance(read, str):
        return _result(model, shape, None, 0, False, read, update.num_examples, notes, start)
    x, fits, _ = read
    label = min(fits, key=lambda c: fits[c].residual)
    fit = fits[label]
    masked = _caveat(layer, opts)
    if masked:
        why = masked
    elif rounded and fit.residual <= opts.tolerance:  # the gradient fits, to the rounding the input carries too
        why = (f"{rounded}; the rebuilt input's gradient fits the update to within it (relative residual "
               f"{fit.residual:.1e}), but the input is not known exactly, so it is not certified")
        return _result(model, shape, x, label, False, why, update.num_examples, notes, start, fit, ROUNDED_ROUTE)
    elif fit.residual > opts.tolerance:
        why = (f"the model's gradient at the rebuilt input differs from the update (relative residual "
               f"{fit.residual:.1e} > {opts.tolerance:g}, at any positive scale): it is not one plain gradient of "
               "this model as given (a defense, Dropout or BatchNorm in training mode, another loss)")
    else:
        why = ""
        if clip is not None:
            notes = (*notes, f"{clip.describe()}: the input is read off a row none of whose entries reaches it, and "
                             "the model's gradient at it, clipped alike, reproduces the update")
        if fit.scale < 0:
            notes = (*notes, f"the update is the gradient's negative (scale {fit.scale:.4g}): a weight change new - "
                             "old (minus the learning rate times the gradient) reads so; the input is the sample's all "
                             "the same")
    rec = _result(model, shape, x, label, not why, why, update.num_examples, notes, start, fit)
    return without_unsigned_labels(model, rec, 1, own_scale=1.0)  # two classes: the factor's sign tells the label


def _read_one(model: nn.Module, G: torch.Tensor, g: torch.Tensor, shape: tuple[int, ...],
              observed: dict[str, torch.Tensor], opts: FirstLayerOptions, rounded: str, clip: ValueClip | None,
              known: ClassGradients | None = None) -> tuple[torch.Tensor, dict[int, Fit], ClassGradients] | str:
    """One sample's input read off the first layer's rows (the row with the largest bias gradient; a rounded update's
    rows weighed together; with ``clip``, rows none of whose entries reach the bound), each class's fit and the
    class gradients they took (``known``: those of an earlier reading, reused where the input is the same); or why
    no row gives it."""
    whole = g.abs() if clip is None else g.abs() * ~(clip.censored(G).any(1) | clip.censored(g))
    row = int(whole.argmax())
    if float(whole[row]) == 0.0:
        return ("every bias gradient of the first layer is zero: the sample left no trace there" if clip is None else
                f"{clip.describe()}, and every row of the first layer with a bias gradient holds an entry at it: no "
                "row gives the sample whole")
    # every row is the sample times its bias gradient: a rounded update's rows, weighed together, round out
    if rounded:
        x = least_squares(G.to(F64), g.to(F64), torch.nonzero(whole).flatten())
    else:
        x = G[row].to(F64) / float(g[row])
    x = x.reshape(1, *shape).to(next(model.parameters()).dtype)
    label = _label(model, observed)  # one sample's output bias gradient: p - onehot(y), negative only at y
    classes = _classes(model, x)
    signed = classes >= 3  # a gradient's negative (a weight change new - old) tells its label from three classes on
    read = Observed.of(observed, clip)
    gradients = known if known is not None and known.reads(x, read.names) else ClassGradients(model, x, read.names)
    fits = {label: class_fit(gradients, label, read, signed)}
    if fits[label].residual > opts.tolerance:  # no bias, or another loss: every class is tried
        fits.update({c: class_fit(gradients, c, read, signed) for c in range(classes) if c != label})
    return x, fits, gradients


def _label(model: nn.Module, observed: dict[str, torch.Tensor]) -> int:
    try:
        return int(class_signal(model, observed).argmin())
    except FedleakError:
        return 0


def _classes(model: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad():
        out = per_sample_logits(model(x), len(x))
    return 2 if out.shape[1] == 1 else int(out.shape[1])


def _result(model: nn.Module, shape: tuple[int, ...], x: torch.Tensor | None, label: int, certified: bool,
            reason: str, batch_size: int | None, notes: tuple[str, ...], start: float,
            fit: Fit | None = None, route: str = "") -> Reconstruction:
    rebuilt = x is not None
    inputs = x.detach().cpu() if rebuilt else torch.zeros((0, *shape))
    route = route or f"{ROUTE} ({'certified' if certified else 'uncertified'})"
    fit = fit or Fit(math.nan, math.nan)
    samples = ((SampleRecovery(label, certified, reason, residual=fit.residual, scale=fit.scale, route=route),)
               if rebuilt else ())
    return Reconstruction(
        inputs=inputs, labels=torch.tensor([label] if rebuilt else [], dtype=torch.long),
        certified=torch.tensor([certified] if rebuilt else [], dtype=torch.bool), attack=ROUTE, samples=samples,
        batch_size=batch_size, batch_certified=certified, seconds=time.perf_counter() - start, notes=notes,
        missing_reason="" if rebuilt else reason)
