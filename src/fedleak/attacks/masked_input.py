"""Dropout on a model's input, and why the certificates of the attacks that read the input stop there.

In training mode a Dropout before the first Linear or conv layer zeroes random values of each input and scales the
others by ``1 / (1 - p)``. The client's update is then exactly the eval-mode network's gradient at that masked copy
of the input: every check an exact attack makes (a first layer's row ratios, a recomputed gradient, the joint test)
is passed by the masked copy as exactly as by the sample in eval mode, so no certificate can say which of the two
was rebuilt. The exclusivity, first-layer, trap-weight and imprint attacks withhold their certificates there unless
told that the client ran the model in eval mode (``train_dropout=False``).
"""

from __future__ import annotations


def named(layers: tuple) -> str:
    """The Dropout ``layers`` (:class:`~fedleak.nets.Dropout`) in words, each once."""
    return ", ".join(dict.fromkeys(f"Dropout '{d.name}' (p = {d.p:g})" for d in layers)) or "Dropout"


def masked_input(layers: tuple) -> str:
    """Why an input read through Dropout ``layers`` on the model's input (none named: something else the model
    runs only in training mode) is not certified, in words."""
    what = f"the model's {named(layers)}" if layers else "something the model runs only in training mode"
    return (f"{what} acts on its input: a client that runs it in training mode sends the gradient of its input with "
            "random values zeroed and the others scaled by 1/(1 - p), which reproduces the update as exactly as the "
            "sample would, so the rebuilt input may be that masked copy (pass train_dropout=False if the client ran "
            "the model in eval mode)")


def withheld(masked: bool, layers: tuple, train_dropout: bool | None) -> str:
    """:func:`masked_input` of ``layers`` where the model's input is ``masked`` in training mode and the client is not
    known to run the model in eval mode (``train_dropout`` False); else empty."""
    return masked_input(layers) if masked and train_dropout is not False else ""
