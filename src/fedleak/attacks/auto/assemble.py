"""From the exact route's result to ``auto``'s: what the search starts from, and the merged reconstruction.

The exact route's certified samples are held fixed in the search and returned as they are, and so are the inputs
it read exactly off the update's rows without a certificate (:func:`held_indices`); its other uncertified samples
become
:class:`~fedleak.attacks.inversion.prior.Estimate` s (a rebuilt input starts the search of a sample of its label;
a sample found but not rebuilt lends its label and its reason); the batch's label counts it inferred are the
search's. Every returned sample says which route produced it and, uncertified, why.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from fedleak.attacks.exact.dropout import read_in_training_mode
from fedleak.attacks.exact.like_blends import blend_unexcluded
from fedleak.attacks.exact.multiplicity import read_off_scale
from fedleak.attacks.first_layer_rows import HELD_ROUTES
from fedleak.attacks.inversion import Estimate, Prior
from fedleak.attacks.label_sign import label_unproven
from fedleak.reconstruction import Reconstruction, SampleRecovery


def certified_indices(exact: Reconstruction) -> list[int]:
    return exact.certified.nonzero().flatten().tolist()


def anchored_indices(exact: Reconstruction) -> list[int]:
    """The exact route's certified samples, then those it would have certified but for a blend of like samples it
    cannot exclude (:func:`fedleak.attacks.exact.like_blends.blend_unexcluded`: the batch size not reported, say):
    both passed every check of a sample's reading."""
    read = [k for k, r in enumerate(exact.samples) if not r.certified and blend_unexcluded(r)]
    return certified_indices(exact) + read


def held_indices(exact: Reconstruction) -> list[int]:
    """The exact route's samples the search holds fixed: the certified ones, then the inputs read exactly off the
    update's rows without a certificate: read as a client's in training mode
    (:func:`fedleak.attacks.exact.dropout.read_in_training_mode`: the search simulates an eval-mode client, which
    would move them), read off their scale (:func:`fedleak.attacks.exact.multiplicity.read_off_scale`: at the
    batch's common scale, or copies of an input the batch holds more than once), or off the first-layer rows of a
    batch, or of an update in a coarser format than float32 (:data:`~fedleak.attacks.first_layer_rows.HELD_ROUTES`;
    not those of an update that looks sparsified or quantised, :data:`~fedleak.attacks.first_layer_rows.
    COMPRESSED_ROUTE`, which start the search instead), or exact inputs whose two-class label rests on the update's
    sign (:func:`fedleak.attacks.label_sign.label_unproven`), or that a blend of like samples would give as well
    (:func:`fedleak.attacks.exact.like_blends.blend_unexcluded`: a search cannot tell them apart either)."""
    read = [k for k, r in enumerate(exact.samples) if not r.certified and r.rebuilt
            and (read_in_training_mode(r) or read_off_scale(r) or label_unproven(r) or blend_unexcluded(r)
                 or r.route in HELD_ROUTES)]
    return certified_indices(exact) + read


def prior_from(exact: Reconstruction | None, skipped: str) -> Prior:
    """What the search knows from the exact route (or, when it was skipped, why nothing is known)."""
    if exact is None:
        return Prior(reason=f"exact route skipped: {skipped}" if skipped else "the exact route could not run")
    estimates = []
    held = set(held_indices(exact))
    for k, r in enumerate(exact.samples):
        if k in held:
            continue
        if r.rebuilt:
            estimates.append(Estimate(r.label, f"the exact route rebuilt it but did not certify it: {r.reason}",
                                      exact.inputs[k]))
        else:
            estimates.append(Estimate(r.label, f"the exact route found it but could not rebuild it: {r.reason}"))
    missing = exact.missing_reason or "it left no exclusively activated neuron of its own"
    return Prior(tuple(estimates), exact.label_counts, f"not found by the exact route: {missing}")


def exact_part(exact: Reconstruction, batch_size: int | None, notes: list[str], why_not_searched: str = "",
               held_only: bool = False) -> Reconstruction:
    """The exact route's result as ``auto``'s: the samples a search holds fixed (:func:`held_indices`) and (unless
    ``held_only``) the other inputs it rebuilt uncertified, at most ``batch_size``; ``why_not_searched`` is added
    to the uncertified ones' reasons."""
    held = held_indices(exact)
    keep = held + ([] if held_only else [k for k, r in enumerate(exact.samples) if r.rebuilt and k not in held])
    if batch_size is not None:
        keep = keep[:batch_size]
    samples = []
    for k in keep:
        r = exact.samples[k]
        if not r.certified and why_not_searched:
            r = replace(r, reason=f"{r.reason}; not optimised: {why_not_searched}")
        samples.append(r)
    index = torch.tensor(keep, dtype=torch.long)
    missing = exact.missing_reason
    if why_not_searched and batch_size is not None and len(keep) < batch_size:
        missing = "; ".join(w for w in (missing, f"not searched: {why_not_searched}") if w)
    return replace(exact, attack=f"auto:{exact.attack}", inputs=exact.inputs[index], labels=exact.labels[index],
                   certified=exact.certified[index], samples=tuple(samples), notes=tuple(notes),
                   missing_reason=missing)


def merge(exact: Reconstruction | None, rest: Reconstruction, optimiser: str, notes: list[str]) -> Reconstruction:
    """The search's result with the exact route's held samples (:func:`held_indices`: held fixed, so first in
    ``rest``) restored exactly, as the exact route returned them."""
    fixed = held_indices(exact) if exact is not None else []
    n = len(fixed)
    inputs = rest.inputs.clone()
    samples: tuple[SampleRecovery, ...] = rest.samples
    certified = torch.zeros(len(rest), dtype=torch.bool)
    if n:
        inputs[:n] = exact.inputs[fixed].to(inputs.dtype)
        samples = tuple(exact.samples[k] for k in fixed) + rest.samples[n:]
        certified[:n] = exact.certified[fixed]
    return replace(rest, attack=f"auto:{exact.attack}+{optimiser}" if n else f"auto:{optimiser}", inputs=inputs,
                   certified=certified, samples=samples,
                   joint_residual=exact.joint_residual if bool(certified.any()) else float("nan"),
                   notes=tuple(notes + list(rest.notes)))
