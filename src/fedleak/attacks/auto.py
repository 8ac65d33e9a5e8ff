"""``attack="auto"``: the strongest applicable attack, exact route first.

1. **Exact route.** When the model is a ReLU network the exact attack reads (an MLP, or conv blocks then a
   dense head; :func:`fedleak.nets.as_network`) with biases in its head and the update is a
   FedSGD gradient or a one-step FedAvg weight delta (``local_steps`` 1 or unknown), the certified
   exclusivity attack runs first. For a one-step weight delta ``ΔW = η ∇W`` the unknown learning rate
   cancels in every ratio ``ΔW_i / Δb_i``, so the attack runs on ``ΔW`` with ``known_scale=False`` and
   the batch size from ``num_examples``; its certificate rejects anything a multi-step update would
   corrupt, so running it when ``local_steps`` is unknown is safe.
2. **Optimisation for the rest.** Samples the exclusivity attack certified are kept exactly and held
   fixed; the remaining ones are searched by DLM+ (weight updates) or Inverting Gradients (gradients),
   with the certified samples taking part in the simulated update and their labels discounted from the
   inferred label counts. The fallback searches inputs of the shape the exact route rebuilt (so a model that
   records no input shape still gets one); should it fail on the model, the certified samples are returned.

``Reconstruction.attack`` names what produced the result (``"auto:exclusivity"``,
``"auto:exclusivity+dlm+"``, ``"auto:ig"``, ...) and ``notes`` say why and which samples came from where.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from fedleak.attacks.dlm import dlm_plus_attack
from fedleak.attacks.exact import exclusivity_attack, exclusivity_on_weights
from fedleak.attacks.inversion import ig_attack
from fedleak.attacks.registry import register_attack
from fedleak.errors import FedleakError, ModelError
from fedleak.nets import as_network
from fedleak.reconstruction import Reconstruction
from fedleak.updates import WeightUpdate, as_gradient_update


def exact_route_reason(model: nn.Module, update: Any, input_shape: tuple[int, ...] | None = None) -> str | None:
    """``None`` when the certified exclusivity attack applies to ``(model, update)``, else why not."""
    try:
        net = as_network(model, input_shape=input_shape).head
    except FedleakError as exc:
        return f"the model is not a ReLU network the exact attack reads ({exc})"
    if net.depth == 0:
        return "the model has no hidden ReLU layer"
    if not net.has_all_biases:
        return "the network has layers without bias, so a weight delta's learning rate does not cancel row by row" \
            if isinstance(update, WeightUpdate) else None
    if isinstance(update, WeightUpdate) and update.local_steps is not None and int(update.local_steps) > 1:
        return f"the client took {update.local_steps} local steps: ΔW is no longer a scaled gradient"
    return None


@register_attack("auto", update_kinds=("gradient", "weights"),
                 description="exact exclusivity route where it applies, then DLM+ (weights) / IG (gradients)")
def auto_attack(
    model: nn.Module,
    update: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    batch_size: int | None = None,
    exclusivity_options: dict[str, Any] | None = None,
    **options: Any,
) -> Reconstruction:
    """Run the exact exclusivity attack where it applies, then optimise what it did not certify.

    ``options`` go to the fallback attack (DLM+ for weight updates, IG for gradients: ``iterations``,
    ``time_budget``, ``progress``, ``seed``, ...); ``exclusivity_options`` to the exclusivity attack (where a
    conv block is underdetermined it skips feature matching, ``fallback="none"``, unless they say otherwise:
    only certified samples are kept from it).
    """
    is_weights = isinstance(update, WeightUpdate)
    if not is_weights:
        update = as_gradient_update(update)
    fallback_name = "dlm+" if is_weights else "ig"
    fallback = dlm_plus_attack if is_weights else ig_attack
    notes: list[str] = []
    exact: Reconstruction | None = None
    reason = exact_route_reason(model, update, input_shape)
    if reason is None:
        exact_options = {"fallback": "none", **(exclusivity_options or {})}
        try:
            if is_weights:
                exact = exclusivity_on_weights(model, update, input_shape=input_shape, **exact_options)
            else:
                exact = exclusivity_attack(model, update, input_shape=input_shape, **exact_options)
        except FedleakError as exc:
            if "does not match" in str(exc) or "shape" in str(exc):
                raise
            notes.append(f"auto: the exclusivity attack could not run ({exc}); falling back to {fallback_name}")
    else:
        notes.append(f"auto: exact route skipped: {reason}")

    m = batch_size
    if m is None and exact is not None and exact.batch_size is not None:
        m = exact.batch_size
    if m is None:
        m = update.num_examples
    # the fallback searches inputs of the shape the exact route rebuilt (known even when the model records none)
    shape = input_shape if input_shape is not None or exact is None else tuple(exact.inputs.shape[1:])
    if exact is not None:
        certified = exact.certified
        n_cert = int(certified.sum())
        unit = "one-step weight delta (learning rate cancels in ΔW_i/Δb_i)" if is_weights else "gradient"
        notes.append(f"auto: exclusivity attack on the {unit}: {n_cert} sample(s) certified exact"
                     + (f" of a batch of {m}" if m is not None else " (batch size unknown)"))
        notes.extend(f"exclusivity: {n}" for n in exact.notes)
        if n_cert and (m is None or n_cert >= m or exact.batch_certified):
            notes.append("auto: every sample certified by the exclusivity attack; no optimisation needed")
            return replace(exact, attack="auto:exclusivity", notes=tuple(notes))
        if n_cert:
            fixed_x = exact.inputs[certified]
            fixed_y = exact.labels[certified]
            if m is None:
                notes.append("auto: the batch size is unknown, so it is unknown whether samples are missing: "
                             "returning the certified samples only (pass batch_size=... to search for the rest)")
                return certified_only(exact, notes)
            try:
                rest = fallback(model, update, input_shape=shape, batch_size=m,
                                fixed_inputs=fixed_x, fixed_labels=fixed_y, **options)
            except ModelError as exc:  # the certified samples stand on their own
                notes.append(f"auto: {fallback_name} could not search for the other samples ({exc}); returning the "
                             "certified samples only")
                return certified_only(exact, notes)
            free = ~torch.cat([torch.ones(n_cert, dtype=torch.bool), torch.zeros(len(rest) - n_cert, dtype=torch.bool)])
            samples = tuple(s for s, c in zip(exact.samples, certified.tolist()) if c) + rest.samples[n_cert:]
            notes.append(f"auto: samples 0-{n_cert - 1} come from the exclusivity attack (certified exact); "
                         f"{int(free.sum())} more from {fallback_name}, optimised with the certified ones held fixed")
            return replace(rest, attack=f"auto:exclusivity+{fallback_name}", certified=~free, samples=samples,
                           label_counts=rest.label_counts, notes=tuple(notes + list(rest.notes)))
        notes.append(f"auto: nothing certified; every sample comes from {fallback_name}")
    rest = fallback(model, update, input_shape=shape, batch_size=m, **options)
    return replace(rest, attack=f"auto:{fallback_name}", notes=tuple(notes + list(rest.notes)))


def certified_only(exact: Reconstruction, notes: list[str]) -> Reconstruction:
    """The exact route's certified samples alone, as the ``auto`` result."""
    keep = exact.certified.nonzero().flatten()
    return replace(exact, attack="auto:exclusivity", inputs=exact.inputs[keep], labels=exact.labels[keep],
                   certified=exact.certified[keep], samples=tuple(exact.samples[i] for i in keep.tolist()),
                   notes=tuple(notes))
