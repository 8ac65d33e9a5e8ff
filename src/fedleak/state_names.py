"""Names of a state dict saved through a wrapper, matched to the model's.

A model trained inside a wrapper saves its tensors under the wrapper's prefix: ``module.`` (``DataParallel``,
``DistributedDataParallel``), ``_orig_mod.`` (``torch.compile``), ``_module.``
(Opacus's ``GradSampleModule``), ``model.`` (a Lightning module holding the
network). A user's class may in turn hold the network the file was saved from (``self.net = ...``). Where every
name of a file differs from the model's by one such common prefix, the file's tensors are the model's; anything
else is left for the caller to report as a mismatch.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Renaming:
    """A common prefix taken off (``removed``) or put on (``added``) every name of a file."""

    removed: str = ""
    added: str = ""

    def name(self, key: str) -> str:
        return self.added + key[len(self.removed):]

    def said(self, whose: str) -> str:
        """The difference in words; ``whose``: the file's owner ("the update's")."""
        if self.removed:
            return (f"{whose} names carry the prefix '{self.removed}' (a wrapper's: DataParallel, "
                    "DistributedDataParallel, torch.compile, Opacus)")
        return f"the model's names carry the prefix '{self.added}', which {whose} lack"


def renaming(names: Collection[str], own: Collection[str]) -> Renaming | None:
    """The one prefix that maps every name of ``names`` onto a distinct name of ``own``, where no name of ``names``
    is already one of ``own``; else None."""
    names, own = list(names), set(own)
    if not names or own.intersection(names):
        return None
    for change in (*(Renaming(removed=p) for p in _prefixes(names)), *(Renaming(added=p) for p in _prefixes(own))):
        mapped = {change.name(k) for k in names if k.startswith(change.removed)}
        if len(mapped) == len(names) and mapped <= own:
            return change
    return None


def renamed(tensors: Mapping[str, T], own: Collection[str]) -> tuple[dict[str, T], Renaming | None]:
    """``tensors`` keyed by ``own``'s names where :func:`renaming` finds the prefix that explains them, else as
    they are."""
    change = renaming(tensors, own)
    if change is None:
        return dict(tensors), None
    return {change.name(k): v for k, v in tensors.items()}, change


def _prefixes(names: Collection[str]) -> list[str]:
    """The dotted prefixes (``"a."``, ``"a.b."``) every name shares, shortest first."""
    first = next(iter(names))
    parts = first.split(".")[:-1]
    candidates = [".".join(parts[: i + 1]) + "." for i in range(len(parts))]
    return [p for p in candidates if all(n.startswith(p) for n in names)]
