"""The exclusivity attack (algorithms spec §2, Pan et al., USENIX Security 2022, with our own grouping, checks
and certificate), registered as ``"exclusivity"``; ``"conv-exclusivity"`` names the same attack.

Any model :func:`fedleak.nets.as_network` reads (an MLP, or conv blocks then a dense ReLU head; written as an
``nn.Module`` class or an ``nn.Sequential``) runs through one pipeline (:mod:`fedleak.attacks.exact.pipeline`):
the dense head is attacked on the features, then, where the network has conv blocks, the features are walked
down them to the input.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from fedleak.adaptive_step import adaptive_step
from fedleak.attacks.at_before import model_at_before
from fedleak.attacks.defense_aware import ExactPlan, exact_plan
from fedleak.attacks.exact.decay import peel_decay, read_decay
from fedleak.attacks.exact.noise import RoundingNoise, gradient_noise, step_noises
from fedleak.attacks.exact.options import ExclusivityOptions, resolve_options
from fedleak.attacks.exact.penalty import read_penalty
from fedleak.attacks.exact.pipeline import run_exclusivity
from fedleak.attacks.exact.weight_norm_bound import decay_directions, loose_bounds, weight_norm_bounds
from fedleak.attacks.labels import with_negated_hint
from fedleak.attacks.read_defense import read_defense
from fedleak.attacks.registry import register_attack
from fedleak.defenses.stack import DefenseStack
from fedleak.errors import ModelError
from fedleak.nets import Network
from fedleak.nets.dense_norms import FoldedModel, fold_dense_norms
from fedleak.nets.exact_view import exact_view
from fedleak.nets.input_map import InputMap
from fedleak.nets.network import check_head_trainable
from fedleak.precision import Precision, update_precision
from fedleak.reconstruction import Reconstruction
from fedleak.updates import GradientUpdate, WeightUpdate, as_gradient_update
from fedleak.weight_change import UNSIGNED, either_sign

#: the note of a weight update that certified nothing and may be of several local steps
SEVERAL_STEPS = ("nothing was certified; if the client took several local steps (the update does not say), its "
                 "gradients were taken at moving weights, no certificate applies and a 'blend' in a sample's reason "
                 "may be a sample of such an update: attack='first-layer' (or 'auto') reads the inputs the first "
                 "Linear layer's rows still give")


#: the note of a weight update read with the learning rate the server knows
LEARNING_RATE = ("read with the learning rate given ({lr:g}): the change as that rate times the gradient, at the "
                 "gradient's own scale (1/M per sample)")


#: why a defense's model does not hold for a weight rebuilt from weight normalisation
REBUILT_DEFENDED = ("the client's defense acts on the tensors it sends, weight normalisation's g and v, which the "
                    "weight's gradient rebuilt from them does not follow (a clipped norm, for one, is theirs): "
                    "nothing is certified")


#: the note of a batch size read off the samples' common scale, not reported
INFERRED_SIZE = ("the batch size {m} is read off the samples' common scale 1/{m}, a mean-loss gradient's: an update "
                 "scaled otherwise (a weight change old - new passed as a gradient, whose scale is the learning rate "
                 "over the batch size; a gradient divided further) reads as another size, which only the count the "
                 "client reports settles (num_examples)")


@register_attack("exclusivity", update_kinds=("gradient", "weights"), needs_relu_network=True, takes_defense=True,
                 reads_range=True, takes_loss=True,
                 description="deterministic, certified reconstruction from exclusively activated neurons "
                             "(MLPs, and CNNs through their conv layers)")
def exclusivity_attack(
    model: nn.Module,
    update: GradientUpdate | WeightUpdate | dict[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None = None,
    options: ExclusivityOptions | None = None,
    **overrides,
) -> Reconstruction:
    """Rebuild every sample of a batch whose exclusively activated neurons allow it, with a certificate.

    ``update`` is the averaged gradient keyed like ``model.named_parameters()`` (a
    :class:`~fedleak.GradientUpdate` or a plain dict), or a one-step :class:`~fedleak.WeightUpdate`
    (:func:`exclusivity_on_weights`). Options are the fields of :class:`ExclusivityOptions`, passed as keywords
    or as an ``options`` object. ``input_shape`` (one sample, no batch dimension) defaults to what
    :func:`fedleak.nets.as_network` finds. An eval-mode ``BatchNorm1d`` on a ``Linear`` layer's features is read
    folded into that layer, the gradient with it (:mod:`fedleak.nets.dense_norms`): a gradient that shows the norm
    ran in training mode gives no input. One on the input is read as a map of it (:mod:`fedleak.nets.input_norm`),
    its inputs certified where the rebuilt batch shows eval mode.
    """
    if isinstance(update, WeightUpdate):
        return exclusivity_on_weights(model, update, input_shape=input_shape, options=options, **overrides)
    view = exact_view(model, input_shape=input_shape)
    update, folded, rebuilt = as_gradient_update(update), None, {}
    if view.fold is not None:  # BatchNorm1d on a Linear layer's features: read as one Linear layer, and the gradient
        folded = view.fold.gradient(update)
        rebuilt = weight_norm_bounds(view.fold, folded.update.gradients, None, update.error)
        update = folded.update
    asked = resolve_options(options, overrides)
    input_map = view.input_map
    rec = _on_gradient(view.model, view.net, update, in_first_layer(asked, input_map), rebuilt)
    if loose := loose_bounds(view.fold, rebuilt, asked.max_noise) if rebuilt else "":
        rec = replace(rec, notes=(*rec.notes, loose))
    if folded is not None and folded.misfit:  # a norm run in training mode: rows mix the samples, none is one
        rec = rec.without_samples(folded.misfit)
    elif folded is not None and folded.coarse:  # a format the fold hides: the inputs as read, uncertified
        rec = rec.withdraw(folded.coarse)
    unproven = "" if view.fold is None or view.fold.input_norm is None else view.fold.input_norm.unproven(rec)
    rec = rec.withdraw(unproven) if unproven else rec
    return input_map.restore(rec, asked.exact_tol, asked.data_range) if input_map is not None else rec


def _on_gradient(model: nn.Module, net: Network, update: GradientUpdate, opts: ExclusivityOptions,
                 rebuilt: dict[str, RoundingNoise]) -> Reconstruction:
    """The attack on a gradient of ``model`` (read as ``net``), every input the first layer's; ``rebuilt``: the bounds
    of the weights rebuilt from weight normalisation's gradients (:mod:`~fedleak.attacks.exact.weight_norm_bound`)."""
    noise = None
    precision = update_precision(update.gradients)
    if update.error or precision.coarse or rebuilt:  # the tolerances grow beyond the gradient's own float32 noise
        noise = {n: gradient_noise(g, update.error) for n, g in update.gradients.items()} | rebuilt
    rec = within_conv_model(run_exclusivity(model, net, update, opts, noise=noise, precision=precision), net,
                            precision)
    if rebuilt and opts.defense:
        rec = rec.withdraw(REBUILT_DEFENDED)
    rec = with_negated_hint(model, update.gradients, rec)
    if update.num_examples is None and rec.batch_size is not None and opts.known_scale and opts.class_weights is None:
        rec = replace(rec, notes=(*rec.notes, INFERRED_SIZE.format(m=rec.batch_size)))
    if rec.batch_certified or opts.defense or rebuilt:  # (a penalty or clipping acts on g and v: not read through them)
        return rec
    penalty = read_penalty(model, net, update, noise)
    if penalty is not None:  # an L2 penalty in the client's loss: every weight's gradient holds a multiple of it
        again = within_conv_model(run_exclusivity(model, net, penalty.update, opts, noise=penalty.noise,
                                                  precision=precision), net, precision)
        if (again.num_certified, len(again)) > (rec.num_certified, len(rec)):
            return replace(again, notes=(*again.notes, penalty.describe()))
    # an adaptive optimizer's step passed as a gradient (an uploaded change over the rate), whose entries of about
    # one size and a few at its largest a value clip's reading would take for clipped ones
    step = adaptive_step(update.gradients) if not rec.num_certified else None
    if step is not None and not step.one_value:
        return rec.without_samples(step.describe())
    # a defense the client did not declare, which the update shows (per-layer clipping leaves nothing certified)
    read = read_defense(update.gradients, per_layer=not rec.num_certified)
    if read is None:
        return rec
    plan = exact_plan(DefenseStack.of(read.defense), update.gradients, net)
    if plan.refusal:  # withdrawn where the values prove the defense; a mere hypothesis leaves the result as it is
        return ExactPlan(refusal=f"{read.evidence}; {plan.refusal}").finish(rec) if read.certain else rec
    again = within_conv_model(run_exclusivity(model, net, update, replace(opts, defense=DefenseStack.of(read.defense)),
                                              noise=noise, precision=precision), net, precision)
    if again.num_certified <= rec.num_certified:
        return rec
    return replace(again, notes=(*again.notes, f"{read.evidence}: read as {read.defense.label}, which the client did "
                                               "not declare"))


@register_attack("conv-exclusivity", update_kinds=("gradient", "weights"), needs_relu_network=True,
                 takes_defense=True, reads_range=True, takes_loss=True,
                 description="the exclusivity attack under the name it had for CNNs (FC head, then conv inversion)")
def conv_exclusivity_attack(
    model: nn.Module,
    update: GradientUpdate | WeightUpdate | dict[str, torch.Tensor],
    *,
    input_shape: tuple[int, ...] | None = None,
    options: ExclusivityOptions | None = None,
    **overrides,
) -> Reconstruction:
    """:func:`exclusivity_attack` (one attack for MLPs and CNNs), under the name the CNN attack was registered as."""
    return exclusivity_attack(model, update, input_shape=input_shape, options=options, **overrides)


def exclusivity_on_weights(
    model: nn.Module, update: WeightUpdate, *, input_shape: tuple[int, ...] | None = None,
    options: ExclusivityOptions | None = None, **overrides,
) -> Reconstruction:
    """The exclusivity attack on a one-step FedAvg weight delta with an unknown learning rate.

    For one local SGD step ``before - after = lr * gradient``; the learning rate cancels in every
    ``dW_i / db_i`` ratio, so the attack runs on the delta at the ``before`` weights with
    ``known_scale=False`` and takes the batch size from ``num_examples``. SGD's weight decay (``lr lambda w`` on
    every weight) is read off the units no sample activated and peeled first
    (:mod:`fedleak.attacks.exact.decay`). The client rounded ``before - lr * g`` to its dtype, an error of up to
    ``eps/2 |after| + eps |delta|`` per entry (:meth:`~fedleak.attacks.exact.noise.RoundingNoise.of_step`): at a
    small learning rate that is large relative to ``lr * g``, and the certificate's tolerances grow with it. Several
    local steps mix the samples' contributions over changing weights: the samples of later mini-batches, whose
    gradients were taken at other weights than ``before``, fail the certificate rather than mislead; those of the
    first mini-batch, taken at ``before``, may pass.
    """
    fold = fold_dense_norms(model)
    if fold is not None and fold.weights_unread:
        raise ModelError(fold.weights_unread)
    return either_sign(lambda u: _on_weights(model, u, input_shape, options, overrides), update)


def _on_weights(model: nn.Module, update: WeightUpdate, input_shape: tuple[int, ...] | None,
                options: ExclusivityOptions | None, overrides: dict) -> Reconstruction:
    """:func:`exclusivity_on_weights` on ``update`` as it is."""
    names = list(update.parameters_of(model))
    delta = update.delta()
    view = exact_view(model_at_before(model, update), input_shape=input_shape)
    at_before, input_map, net = view.model, view.input_map, view.net
    lr = update.learning_rate  # known: the change is lr times the gradient at its own scale, 1/M per sample
    asked = resolve_options(options, {**overrides, "known_scale": lr is not None})
    opts = in_first_layer(asked, input_map)
    check_head_trainable(model, net)  # a frozen layer's weights do not move: the change holds nothing of it
    delta = {n: delta[n] for n in names}
    noise = step_noises(update.after, delta, update.error)
    normed = view.fold is not None and bool(view.fold.weight_norms)
    decay = None if normed else read_decay(net, update.before, delta, noise)
    if decay is not None:  # SGD's weight decay (on the user's weights), peeled off with its bound in the noise
        delta, noise = peel_decay(decay, update.before, delta, noise)
    unfit = ""
    if view.fold is not None:  # constant arithmetic on a layer's output, weight normalisation: read as the twin's
        delta, noise, unfit = folded_change(view.fold, delta, noise)
    if normed and not view.fold.folds:  # the decay of g and v, read on the twin's change (each slice its own factor)
        directions = decay_directions(view.fold, update.before)
        decay = read_decay(net, directions, delta, noise)
        if decay is not None:
            delta, noise = peel_decay(decay, directions, delta, noise)
    if lr is not None:
        delta, noise = at_learning_rate(delta, noise, lr)
    grads = GradientUpdate(delta, num_examples=update.num_examples)
    positive = not update.metadata.get(UNSIGNED)  # before - after is the learning rate times the gradient
    rec = run_exclusivity(at_before, net, grads, opts, noise=noise, positive=positive, unsigned=not positive)
    rec = rec.withdraw(unfit) if unfit else rec
    notes = (decay.describe(),) if decay is not None else ()
    if lr is not None:
        notes += (LEARNING_RATE.format(lr=lr),)
    step = adaptive_step(update.delta()) if not rec.num_certified else None
    if step is not None:  # no scaled gradient: what its rows give is no input
        rec = rec.without_samples(step.describe())
    elif not rec.num_certified and update.local_steps != 1:
        notes += (SEVERAL_STEPS,)
    rec = replace(rec, notes=(*rec.notes, *notes)) if notes else rec
    return input_map.restore(rec, asked.exact_tol, asked.data_range) if input_map is not None else rec


def folded_change(fold: FoldedModel, delta: dict[str, torch.Tensor], noise: dict[str, RoundingNoise]
                  ) -> tuple[dict[str, torch.Tensor], dict[str, RoundingNoise], str]:
    """A one-step change of the user's model (the learning rate times its gradient) as the change of ``fold``'s twin
    at the same rate, and why it does not fit the twin (empty where it does): each folded row over its scale ``a``
    (:meth:`~fedleak.nets.dense_norms.FoldedModel.gradient`), each folded layer's bounds times its largest ``1 / |a|``
    (the fold's ``row_gain``), plus ``eps/2`` of the change for the quotient's rounding; a layer's columns reordered
    where a change of layout before it is folded (:mod:`~fedleak.nets.layout_fold`), its bounds with them; a weight
    rebuilt from weight normalisation's ``g`` and ``v`` with its own bound
    (:mod:`~fedleak.attacks.exact.weight_norm_bound`)."""
    folded = fold.gradient(GradientUpdate(delta), {f.v: noise[f.v].read() for f in fold.weight_norms if f.v in noise})
    grads = folded.update.gradients
    bounds = dict(noise) | weight_norm_bounds(fold, grads, noise)
    for f in fold.weight_norms:
        for name in f.parameter_names():
            bounds.pop(name, None)
    for f in fold.folds:  # (in order: a layer's columns reordered after its rows are scaled)
        for name in (n for n in f.parameter_names() if n in bounds):
            e, half = bounds[name], float(torch.finfo(delta[name].dtype).eps) / 2
            if f.rounds:
                e = replace(e, plus=delta[name], plus_scale=half) if e.plus is None else \
                    replace(e, plus_scale=e.plus_scale + half)
            e = e * f.row_gain
            bounds[name] = e.reordered(f.columns) if f.columns is not None and name == f.weight else e
    return dict(grads), bounds, folded.misfit


def at_learning_rate(delta: dict[str, torch.Tensor], noise: dict[str, RoundingNoise], lr: float
                     ) -> tuple[dict[str, torch.Tensor], dict[str, RoundingNoise]]:
    """A one-step change divided by the learning rate the server knows: the gradient, in the change's dtype (the
    quotient rounded once, ``eps/2`` of it, added to each entry's bound), and its noise."""
    grads, bounds = {}, {}
    for name, d in delta.items():
        half = float(torch.finfo(d.dtype).eps) / 2
        e = noise[name]
        e = replace(e, plus=d, plus_scale=half) if e.plus is None else replace(e, plus_scale=e.plus_scale + half)
        grads[name], bounds[name] = (d.double() / lr).to(d.dtype), e * (1 / lr)
    return grads, bounds


def in_first_layer(opts: ExclusivityOptions, input_map: InputMap | None) -> ExclusivityOptions:
    """``opts`` for the first layer's inputs (:meth:`~fedleak.nets.input_map.InputMap.tolerance_in_first_layer`):
    ``exact_tol`` and ``data_range`` that leave room for the client's rounding of the model's arithmetic."""
    if input_map is None:
        return opts
    tol, data_range = input_map.tolerance_in_first_layer(opts.exact_tol, opts.data_range)
    return replace(opts, exact_tol=tol, data_range=data_range)


def within_conv_model(rec: Reconstruction, net, precision: Precision) -> Reconstruction:
    """``rec``, with its certificates withdrawn where the network has conv blocks and the update's values carry a
    coarser format than float32 (``precision``: sent in float16, computed under autocast): the conv inversion's
    error bound models a float32 forward pass of the client's. The update's other noise beyond a gradient's own
    float32 rounding (a weight change's, a known transport error, a dense weight rebuilt from weight normalisation's
    gradients) enters the head's tolerances and the features' proven error the inversion starts from
    (:mod:`~fedleak.attacks.exact.feature_noise`); a conv layer's rebuilt gradient is read by the whole batch's check
    only, at its own fixed tolerance: the rebuild's error can make that check fail, not pass."""
    if not net.blocks:
        return rec
    if precision.coarse:
        return rec.withdraw(f"{precision.describe()}, whose rounding ({precision.roundoff:.1e} relative) the conv "
                            "inversion's certificate does not model: nothing is certified")
    return rec
