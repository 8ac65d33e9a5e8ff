"""``fedleak.plan``: before any attack, which attacks apply to this model and update, and why, in numbers.

The plan reads the model as the exact route does (:func:`fedleak.as_network`), counts per sample what the route
needs on the user's inputs (or synthetic ones, saying so) -- conv blocks: equations vs unknowns
(:mod:`fedleak.plan.conv`); dense ReLU layers: exclusively activated neurons vs width (:mod:`fedleak.plan.exans`)
-- and estimates at every batch size asked the fraction of samples the route can certify. Where it does not
apply, it computes the smallest change that would make it (:mod:`fedleak.plan.proposal`) and checks it by the
same counting. The update's kind (:func:`fedleak.update_kind.describe_update`) decides whether the route can apply
at all, and which other attacks are worth running (:mod:`fedleak.plan.advice`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import numpy as np
import torch
from torch import nn

import fedleak.plan.verdict as verdict
from fedleak.attacks.first_linear import first_layer_changed
from fedleak.attacks.masked_input import InputMasking, first_reader, input_masking
from fedleak.captured import as_attacked
from fedleak.errors import FedleakError, ModelError, UpdateError
from fedleak.nets import NO_HIDDEN_RELU, Network, input_shape_of
from fedleak.nets.exact_view import exact_view
from fedleak.nets.network import check_head_trainable
from fedleak.plan.activity import DEFAULT_MAX_SAMPLES, measure
from fedleak.plan.advice import RouteFacts, advise, on_range
from fedleak.plan.conv import block_shape
from fedleak.plan.convgrow import choose_inputs, grow_block, own_block
from fedleak.plan.exans import HeadModel
from fedleak.plan.proof import ProofCheck, check_proofs
from fedleak.plan.proposal import propose
from fedleak.plan.result import (
    ROUTE_APPLIES,
    STATUS_DETERMINED,
    STATUS_UNDERDETERMINED,
    STATUS_UNPROVEN,
    BatchEstimate,
    ConvBlockPlan,
    DenseAtBatch,
    DenseLayerPlan,
    Evidence,
    Plan,
)
from fedleak.plan.samples import Samples, synthetic_samples, user_samples
from fedleak.update_facts import with_facts
from fedleak.updates import as_gradient_update
from fedleak.validation import check_float, check_int, check_module, check_seed

DEFAULT_BATCH_SIZES = (1, 8, 32)
DEFAULT_TARGET = 0.95
MAX_BATCH = 1 << 16


def _batch_sizes(batch_sizes: Iterable[int] | int | None, update_kind) -> tuple[int, ...]:
    if isinstance(batch_sizes, (int, np.integer)) and not isinstance(batch_sizes, bool):
        batch_sizes = (batch_sizes,)
    sizes = {check_int("batch size", b, low=1, high=MAX_BATCH) for b in (batch_sizes or ())}
    if update_kind is not None and update_kind.num_examples is not None and not update_kind.multi_step:
        sizes.add(min(update_kind.num_examples, MAX_BATCH))
    return tuple(sorted(sizes)) if sizes else DEFAULT_BATCH_SIZES


def _status(shape, fraction: float, target: float, proof: ProofCheck, i: int) -> str:
    if fraction < target:
        return STATUS_UNDERDETERMINED
    if proof.ran:
        return STATUS_DETERMINED if proof.proven[i] == proof.samples else STATUS_UNPROVEN
    return STATUS_UNPROVEN


def _conv_plans(net: Network, samples: Samples, x: torch.Tensor, act, target: float, proofs: int | None, seed: int):
    """Per block: its plan (equations measured vs unknowns, and the proof where tried), and per sample whether
    every block reaches its count."""
    shapes = [block_shape(b) for b in net.blocks]
    own = [own_block(b, s, i, seed) for i, (b, s) in enumerate(zip(net.blocks, shapes))]
    fractions = [float((a.nonzero >= s.needed).mean()) for s, a in zip(shapes, act.blocks)]
    counted = bool(shapes) and min(fractions) >= target
    proof = (check_proofs(net, x, samples.labels, shapes, proofs) if counted
             else ProofCheck(0, (), 0, "not run: a block has too few equations"))
    plans = []
    ok = np.ones(act.samples, dtype=bool)
    for i, (blk, shape, counts) in enumerate(zip(net.blocks, shapes, act.blocks)):
        eq = counts.nonzero
        ok &= eq >= shape.needed
        status = _status(shape, fractions[i], target, proof, i)
        keep = None
        if shape.pool is not None and status == STATUS_UNDERDETERMINED:
            grown = grow_block(blk, i, shape, choose_inputs(x), own[:i], target, seed)
            keep = None if grown is None else grown.shape.channels
        plans.append(ConvBlockPlan(
            name=shape.name, in_shape=shape.in_shape, conv_shape=shape.conv_shape, out_shape=shape.out_shape,
            pooling=shape.pool_text, unknowns=shape.unknowns, max_equations=shape.max_equations, needed=shape.needed,
            equations_median=float(np.median(eq)), equations_min=int(eq.min()), fraction=fractions[i],
            unpooled_median=None if shape.pool is None else float(np.median(counts.active_units)),
            channels_keeping_pool=keep, status=status, proof_samples=proof.samples,
            proven=proof.proven[i] if proof.ran else 0, proof_note=proof.note))
    return shapes, tuple(plans), ok, proof


def _dense_plans(head: HeadModel, sizes: tuple[int, ...], target: float) -> tuple[DenseLayerPlan, ...]:
    ones = torch.ones(head.samples, dtype=torch.bool)
    out = []
    for h, layer in enumerate(head.layers):
        best, capped = head.largest_batch(target, conv_ok=ones, layers=[h], peel=False)  # (the update as sent)
        at = tuple(DenseAtBatch(m, head.need[h] * m, head.layer(h, m).mean_exans, head.layer(h, m).fraction)
                   for m in sizes)
        out.append(DenseLayerPlan(
            name=layer.name, width=layer.width, last=h == len(head.layers) - 1, need=head.need[h],
            active_fraction=float(layer.active.double().mean()),
            dead_fraction=float((~layer.active.any(0)).double().mean()),
            counting_bound=layer.width // head.need[h], max_batch_size=best, capped=capped, at=at))
    return tuple(out)


def _estimate(head: HeadModel, m: int, blocks: tuple[ConvBlockPlan, ...]) -> BatchEstimate:
    ok = head.joint(m)
    failing = {blk.name: 1.0 - blk.fraction for blk in blocks}
    failing.update({layer.name: 1.0 - head.layer(h, m).fraction for h, layer in enumerate(head.layers)})
    worst = max(failing, key=failing.get)
    fraction = float(ok.double().mean())  # (with peeling, a layer short of the condition may limit nothing)
    sent = float(head.joint(m, peel=False).double().mean()) if head.peel else None
    return BatchEstimate(m, fraction, float(ok.all(1).double().mean()),
                         worst if failing[worst] > 0 and fraction < 1 else None, sent)


def plan(model: nn.Module, update: object = None, inputs: object = None, *, input_shape=None,
         batch_sizes: Iterable[int] | int | None = None, target: float = DEFAULT_TARGET,
         max_samples: int = DEFAULT_MAX_SAMPLES, proofs: int | None = None, name: str | None = None,
         seed: int = 0, num_examples: int | None = None, learning_rate: float | None = None,
         local_steps: int | None = None) -> Plan:
    """Say, before any attack, which attacks apply to ``model`` and ``update`` and why (a :class:`Plan`).

    ``update``: the client's update (:class:`~fedleak.GradientUpdate`, :class:`~fedleak.WeightUpdate`, a dict of
    gradients or of the client's weights, or a list of them: :func:`fedleak.captured.read_captured`), optional;
    its kind is described by :func:`fedleak.update_kind.describe_update` and its
    ``num_examples`` joins the batch sizes. ``inputs``: the user's data to measure activations on (a
    :class:`~fedleak.Dataset`, a batch tensor, or ``(inputs, labels)``; at most ``max_samples`` are used); without
    them, synthetic inputs uniform in [0, 1] stand in, and the plan says so. ``batch_sizes``: the batch sizes to
    judge (default: the update's, else 1, 8 and 32); the largest is the one the verdict and the proposed change
    are for. ``target``: the fraction of a batch's samples the route must certify to count as applying.
    ``num_examples``, ``learning_rate``, ``local_steps``: what the server knows of the update, as
    :func:`fedleak.reconstruct` takes them (:func:`fedleak.update_facts.with_facts`).
    """
    parameters = sum(p.numel() for p in check_module(model).parameters())
    label = name or type(model).__name__
    model, update, read_as = as_attacked(model, update)  # a list, a client's weights; one logit: its twin
    told: tuple[str, ...] = ()
    if update is not None:
        update, told = with_facts(model, update, num_examples=num_examples, learning_rate=learning_rate,
                                  local_steps=local_steps)
    elif (num_examples, learning_rate, local_steps) != (None, None, None):
        raise UpdateError("num_examples, learning_rate and local_steps describe an update: pass the update too")
    target = check_float("target", target, low=0.5, high=1.0)
    max_samples = check_int("max_samples", max_samples, low=2, high=1 << 20)
    seed = check_seed("seed", seed)
    if proofs is not None:
        proofs = check_int("proofs", proofs, low=0, high=1024)
    kind = None
    if update is not None:
        from fedleak.update_kind import describe_update

        kind = describe_update(update, model)
    sizes = _batch_sizes(batch_sizes, kind)
    samples = user_samples(inputs, max_samples, seed) if inputs is not None else None
    shape, shape_notes = input_shape_of(model, input_shape=input_shape, inputs=None if samples is None else samples.x)
    notes = (*shape_notes, *read_as, *told)
    try:
        view = exact_view(model, input_shape=shape)  # a normalisation inside forward peeled, BatchNorm1d folded
        model, input_map, net = view.model, view.input_map, view.net
        check_head_trainable(model, net)  # a frozen dense layer sends no gradient, which the exact route reads
    except ModelError as exc:
        return _on_range(verdict.unreadable(label, shape, parameters, f"it cannot read the model ({exc})", kind,
                                            sizes, target, notes, first_layer_changed(model, shape)), samples)
    if net.head.depth == 0:
        return _on_range(verdict.unreadable(label, shape, parameters, NO_HIDDEN_RELU, kind, sizes, target, notes,
                                            first_layer_changed(model, shape)), samples)
    if samples is None:
        samples = synthetic_samples(net.input_shape, max(sizes), seed)
    if samples.x[0].numel() != net.input_dim:
        raise FedleakError(f"each input has {samples.x[0].numel()} values but the model takes {net.input_shape}")
    if input_map is not None:  # measured on what the first layer reads (in the inputs' own layout first)
        x = samples.x.reshape(len(samples.x), *(input_map.shape or net.input_shape)).to(net.dtype)
        samples = replace(samples, x=input_map.to_first_layer(x))
        notes += (input_map.note(),)
    if view.fold is not None and kind is not None and kind.is_gradient:  # a norm run in training mode shows
        try:
            misfit = view.fold.gradient(as_gradient_update(update)).reason
        except FedleakError as exc:
            misfit = str(exc)
        notes += (f"the update: {misfit}",) if misfit else ()
    masking = input_masking(model, first_reader(net), net.input_shape)  # (:mod:`fedleak.attacks.masked_input`)
    from fedleak.attacks.malicious.class_fishing import fished_target

    result = _plan(net, label, parameters, samples, kind, sizes, target, proofs, seed, notes, masking,
                   fished_target(net))
    if input_map is not None and input_map.shape is not None:  # a change of layout: the model's own input shape
        result = replace(result, input_shape=input_map.shape)
    return _on_range(result, samples)


def _on_range(result: Plan, samples: Samples | None) -> Plan:
    """The plan, its search advice told the range of the user's inputs (:func:`~fedleak.plan.advice.on_range`)."""
    from fedleak import available_attacks

    span = samples.value_range if samples is not None and samples.measured else None
    return replace(result, attacks=on_range(result.attacks, available_attacks(), span))


def _plan(net: Network, label: str, parameters: int, samples: Samples, kind, sizes: tuple[int, ...], target: float,
          proofs: int | None, seed: int, notes: tuple[str, ...], masking: InputMasking, fished: int | None) -> Plan:
    """The plan of ``plan``'s readable model; ``fished``: the class its output layer is fished for (None: none)."""
    x = samples.x.reshape(samples.x.shape[0], *net.input_shape).to(torch.float32)
    if samples.labels is not None and int(samples.labels.max()) >= net.num_classes:
        raise FedleakError(f"the labels go up to {int(samples.labels.max())} but the model has {net.num_classes} "
                           "classes")
    act = measure(net, x, samples.labels, measured=samples.measured, description=samples.description)
    evidence = Evidence(samples.measured, act.samples, samples.description)
    shapes, blocks, conv_ok, proof = _conv_plans(net, samples, x, act, target, proofs, seed)
    # the attack peels an MLP's update where its scale is pinned (a gradient; a change at the rate the server set)
    pinned = kind is None or kind.is_gradient or kind.learning_rate is not None
    head = HeadModel(act.dense, conv_ok, peel=not net.blocks and pinned)
    if head.peel:
        notes += ("the estimates count the samples the exact route can certify by peeling the update (once samples "
                  "are certified, their terms subtracted and exclusivity counted among the samples left), so the whole "
                  "batch may exceed a layer's counting bound: an upper bound, which the attack's later rounds reach "
                  "less of where the subtracted terms' rounding leaves the inputs they read too uncertain (most where "
                  "logits are large: raw 0..255 pixels); the first reading's share and the dense layers' own figures "
                  "are the update's as sent",)
    usable = tuple(m for m in sizes if m <= act.samples)
    if len(usable) < len(sizes):
        notes += (f"batch sizes above {act.samples} (the samples measured) are not estimated; pass more inputs",)
    usable = usable or (act.samples,)
    dense = _dense_plans(head, usable, target)
    estimates = tuple(_estimate(head, m, blocks) for m in usable)
    best, capped = head.largest_batch(target)
    batch = usable[-1]
    fraction = estimates[-1].fraction
    route, blocker = verdict.route(blocks, estimates[-1], kind, target, proof)
    proposal = None
    if route != ROUTE_APPLIES and (kind is None or kind.exact_route_possible):
        proposal = propose(net=net, x=x, shapes=shapes, conv_ok=conv_ok, head=head, parameters=parameters,
                           batch_size=batch, target=target, seed=seed)
        if not proposal.changes and not proposal.blocked:  # the counts hold; the attack's proof is what fails
            proposal = None
            notes += ("no change is computed: every count holds, and what fails is the attack's proof of the conv "
                      "blocks; its error bound usually falls with more channels in the blocks above the unproven one "
                      "(docs/cnn.md, error amplification)",)
    from fedleak import available_attacks

    facts = RouteFacts(route, batch, fraction, best, blocker, net.is_conv,
                       any(b.pool_kind == "max" for b in shapes), kind, fished_class=fished,
                       one_reading=estimates[-1].one_reading)
    said = verdict.sentence(label, route, blocker, batch, fraction, best, capped, kind, target,
                            estimates[-1].one_reading)
    if fished is not None:  # the route a server that fished the model runs comes first
        said = verdict.fished(fished) + said
    if net.mode_dependent:  # counted as an eval-mode client computes
        said += ("; this holds for clients that compute their updates in eval mode: from clients that train with "
                 "the model's Dropout or BatchNorm active, the exact route certifies nothing")
        if net.dropout and not net.blocks:  # (:mod:`fedleak.attacks.exact.dropout`)
            said += " (from an MLP's Dropout it rebuilds what the exclusive rows give, uncertified)"
    if act.saturated:  # (:func:`fedleak.nets.readable_losses`)
        said += (f"; {act.saturated} of the {act.samples} samples measured are classified with probability 1 in the "
                 "model's dtype (their loss vectors have no negative entry): no batch size or width lets the exact "
                 "route rebuild them")
    if kind is not None and kind.too_fine:  # (:func:`fedleak.update_kind.describe_update`)
        said += (f"; but most rows of this weight change are finer than the rounding of the client's weights (the "
                 f"median row known to {kind.rounding:.1e} of its size): expect few certified samples or none")
    alike = ("a blend of samples that share all their active units and their label" if net.num_classes == 2 else
             "a blend of near-copies (samples that share all their active units, label and prediction)")
    if kind is not None and kind.is_gradient and kind.num_examples is None:
        said += (f"; this update certifies nothing without the batch size the client reported, since {alike} reads "
                 "as one sample without it: pass num_examples")
    elif kind is not None and kind.kind in ("weights", "one-step") and kind.learning_rate is None \
            and kind.adaptive is None:  # (no learning rate makes an adaptive optimizer's step a gradient)
        expect = (f" (at batch {batch} about {100 * fraction:.0f}% of the samples meet the condition, so expect none)"
                  if fraction <= 0.5 else "")
        said += (f"; a weight change at an unknown learning rate certifies only where more than half of its batch "
                 f"certifies at one factor, since {alike} reads as one sample at a multiple of it"
                 f"{expect}: pass learning_rate, the rate the server set")
    if masking.changed:
        said += ("; the model changes its input in training mode (a Dropout on it), so the attacks certify only when "
                 "told that the client computes in eval mode (train_dropout=False)")
    return Plan(
        model=label, input_shape=tuple(net.input_shape), parameters=parameters,
        verdict=said,
        route=route, target=target, batch_size=batch, max_batch_size=best, capped=capped, evidence=evidence,
        update=kind, blocks=blocks, dense=dense, estimates=estimates, proposal=proposal,
        attacks=advise(facts, available_attacks()), notes=notes + tuple(net.notes),
    )
