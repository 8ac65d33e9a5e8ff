"""Reading the gradient of a client that ran the model's Dropout in training mode (``train_dropout``).

In training mode Dropout zeroes each unit with probability ``p`` and scales the others by ``1 / (1 - p)``, a new
random mask per sample and pass. For a neuron ``j`` of the last ReLU layer that fires for sample ``n`` only and
that the mask kept, the gradient rows still read ``G[j,:] = c_j a_n`` and ``g[j] = c_j`` (``a_n`` the sample's
input to the layer) and the output layer's column ``j`` is still ``e_n`` times the unit's (scaled) activation:
the implied input ``G[j,:] / g[j]`` is the sample's, exactly, and every column of the sample's exclusive rows is
parallel to one loss vector ``e_n``. What the mask changes is ``e_n`` itself: it is the softmax of the logits of
the *masked* hidden layer, which the eval-mode forward pass does not compute. So the check reads each group's
loss vector off its own columns (:func:`read_loss_vectors`; the label is its one negative entry) and keeps the
groups whose columns are parallel to it, each scaled by its unit's activation.

Nothing is certified: the certificate recomputes every sample's gradient, and with the masks unknown neither
its per-sample scale ``1/M`` (which tells a sample from a blend of samples whose loss vectors lie on one line,
as two classes' do) nor its joint test can be applied. A Dropout on the network's input masks the input
itself: the rebuilt input is then the masked one, and so is the eval-mode reading's, whose certificates are
withheld there (:mod:`fedleak.attacks.masked_input`).
"""

from __future__ import annotations

import torch

from fedleak.attacks.masked_input import named
from fedleak.nets.network import training_mode_cause, training_mode_note

TRAINING = "train-mode dropout"  # the route of a sample read so (:func:`route`)


def reason(layers: tuple = ()) -> str:
    """Why a sample read as the gradient of a client in training mode is not certified, naming the model's Dropout
    ``layers`` (:class:`~fedleak.nets.Dropout`)."""
    return (f"read as the gradient of a client that ran the model's {named(layers)} in training mode "
            "(train_dropout): its exclusive rows give this input, but with the dropped units unknown no certificate "
            "can be had (on two classes a blend of samples passes the same reading)")


def read_loss_vectors(columns: torch.Tensor, activations: torch.Tensor, owner: torch.Tensor, groups: int
                      ) -> torch.Tensor:
    """Each group's loss vector as its member rows' output-layer ``columns`` (rows x K) show it: the least-squares
    ``e`` of ``columns[r] = activations[r] * e`` over the group's rows (``owner[r]`` its group), up to one positive
    factor (the check fits each row's scale)."""
    h = activations[:, None]
    num = torch.zeros(groups, columns.shape[1], dtype=columns.dtype, device=columns.device).index_add_(
        0, owner, h * columns)
    den = torch.zeros(groups, dtype=columns.dtype, device=columns.device).index_add_(0, owner, h.square().squeeze(1))
    return num / den.clamp_min(1e-300)[:, None]


def route(name: str, certified: bool, opts) -> str:
    """What produced a sample of the exclusivity attack ``name``, as its record says (``SampleRecovery.route``)."""
    return f"{name} ({'certified' if certified else 'uncertified'}{', ' + TRAINING if opts.train_dropout else ''})"


def read_in_training_mode(record) -> bool:
    """Whether the exclusivity attack rebuilt this sample (a :class:`~fedleak.SampleRecovery`) reading the client as
    one in training mode."""
    return record.route.endswith(f", {TRAINING})")


def settle_all(complete: list) -> dict[int, str]:
    """Every candidate, settled uncertified (:func:`reason`; the pipeline names the model's layers in it)."""
    return dict.fromkeys(range(len(complete)), reason())


def rebuilt_strongly(rec, min_last: int) -> int:
    """How many samples ``rec`` rebuilt with at least ``min_last`` witness rows at the last ReLU layer."""
    return sum(r.rebuilt and bool(r.witnesses) and r.witnesses[-1] >= min_last for r in rec.samples)


def worth_rereading(net, opts, rec) -> bool:
    """Whether to read the update again as a client's in training mode: the option is left to the attack (None),
    the model is an MLP with Dropout and more than two classes, and the eval-mode reading ``rec`` certified
    nothing. With two classes every loss vector lies on one line, ``(1, -1)`` times a scalar, so the eval-mode
    check of a group's columns is already the training-mode one (which in addition drops groups of one row)."""
    return (opts.train_dropout is None and bool(net.dropout) and not net.blocks and net.num_classes > 2
            and not rec.num_certified)


def as_read(net, opts) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The network's notes (how it was read) and caveats (why nothing may be certified), less the two that say its
    Dropout is read in eval mode where the update is read as a client's in training mode."""
    if not opts.train_dropout:
        return net.notes, net.caveats
    note, cause = training_mode_note(net.dropout, ()), training_mode_cause(net.dropout, ())
    return tuple(n for n in net.notes if n != note), tuple(c for c in net.caveats if c != cause)


def note(rec, min_last: int) -> str:
    """The note of a reconstruction ``rec`` read with ``train_dropout`` where the eval-mode reading certified
    nothing."""
    rebuilt, strongly = len(rec.samples), rebuilt_strongly(rec, min_last)
    return (f"nothing was certified as the gradient of the model in eval mode; read as the gradient of a client that "
            f"ran its Dropout in training mode (train_dropout), {rebuilt} input(s) were rebuilt ({strongly} from at "
            "least two exclusive rows each), none certified (pass train_dropout=False to read it in eval mode only)")
