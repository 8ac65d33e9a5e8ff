"""Defense-aware optimisation attacks (DLG, iDLG, IG, DLM, DLM+; option ``defense``): the defense stack's forward
model, after ROG (Yue et al., USENIX Security 2023).

A defense the server knows is a known function, so the simulated update goes through the stack's update filters
(:meth:`~fedleak.defenses.stack.DefenseStack.observe`) before it is matched: a top-k client's dropped entries are
masked out instead of matched as zeros (:class:`ForwardModel`). :func:`search_notes` says what such a search
modelled and what it left out. What the exact attack certifies under each defense is
:mod:`fedleak.attacks.defense_aware`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedleak.defenses.stack import DefenseStack

Tensors = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class ForwardModel:
    """The stack's forward model on a simulated update given as a list of tensors ordered like ``names``;
    ``observed`` is the update the client sent (what the filters revealed: masks, scales)."""

    stack: DefenseStack
    names: tuple[str, ...]
    observed: Tensors

    def __call__(self, simulated: list[torch.Tensor]) -> list[torch.Tensor]:
        out = self.stack.observe(dict(zip(self.names, simulated)), self.observed)
        return [out[n] for n in self.names]


def forward_model(stack: DefenseStack, names: Iterable[str], observed: Tensors) -> ForwardModel | None:
    """The forward model of ``stack``'s update filters (None when it has none: nothing to simulate)."""
    if not stack.filters:
        return None
    return ForwardModel(stack, tuple(names), dict(observed))


def search_notes(stack: DefenseStack, labels_inferred: bool, unboxed: bool = False) -> list[str]:
    """What a defense-aware search says about ``stack``: the forward model it used, the defenses outside it,
    (``labels_inferred``) that labels read from a filtered update may be wrong, and (``unboxed``: a search that
    keeps its inputs in no box) that a forward model may leave directions unconstrained."""
    if not stack:
        return []
    notes = []
    filters = stack.filters
    known = [f.label for f in filters if f.known_function]
    unknown = [f.label for f in filters if not f.known_function]
    if known:
        notes.append(f"forward model: the simulated update goes through {' then '.join(known)} before it is matched "
                     "(defense-aware, as ROG)")
        if unboxed:
            notes.append("this search keeps the inputs in no box: a forward model that discards scale or entries "
                         "(clipping, top-k) leaves directions it cannot see unconstrained, where the values may run "
                         "off (measured: iDLG diverges under clipping); ig (box, total variation) suits it better")
    else:
        notes.append("forward model: the plain update (no defense of the stack is a function the attacker can replay)")
    if unknown:
        notes.append(f"{', '.join(unknown)}: randomness the attacker cannot replay; modelled as the identity")
    if stack.step is not None:
        notes.append(f"{stack.step.label} computes the gradient itself (per-sample clipping, noise); it is not part "
                     "of the forward model: the search matches a plain gradient")
    if stack.batch:
        notes.append(f"batch defense(s) {', '.join(d.label for d in stack.batch)} are not part of the forward model: "
                     "they change the data before the gradient and the attacker cannot undo them, so the search "
                     "targets the changed batch")
    if labels_inferred and filters:
        notes.append(f"labels were inferred from an update that went through {', '.join(f.label for f in filters)}: "
                     "the output-layer rule may be unreliable there (pass labels=... if they are known)")
    return notes


__all__ = ["ForwardModel", "forward_model", "search_notes"]
