"""What a model does to its input only in training mode, and why the certificates of the attacks that read the
input stop there.

In training mode a Dropout before the first layer with weights zeroes random values of each input and scales the
others by ``1 / (1 - p)``; a model may also add noise to its input while it trains (``if self.training: ...``).
The client's update is then exactly the eval-mode network's gradient at that changed copy of the input: every
check an exact attack makes (a first layer's row ratios, a recomputed gradient, the joint test) is passed by the
copy as exactly as by the sample in eval mode, so no certificate can say which of the two was rebuilt. The
exclusivity, first-layer, trap-weight and imprint attacks probe the model in training mode
(:func:`input_masking`: one input, the model's mode, buffers and random state restored) and withhold their
certificates where its first layer with weights reads the input otherwise, unless told that the client ran the
model in eval mode (``train_dropout=False``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedleak.clients.mode import client_mode
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.layer_calls import FunctionalCalls
from fedleak.nets.layers import Dropout

DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


@dataclass(frozen=True)
class InputMasking:
    """Whether the model's first layer with weights reads an input otherwise in training mode (``changed``), and
    the Dropout modules that ran before it there (``dropout``; none where something else changed it: a functional
    dropout, added noise)."""

    changed: bool = False
    dropout: tuple[Dropout, ...] = ()


def first_reader(net) -> nn.Module | torch.Tensor:
    """What reads the input of the first layer with weights of a network read by :func:`fedleak.nets.as_network`:
    its first conv module, or its head's first Linear module, or, for ``F.conv2d`` / ``F.linear`` of the model's
    parameters, that layer's weight (:func:`input_masking` takes either)."""
    first = net.blocks[0].conv if net.blocks else net.head.dense[0]
    if first.functional:
        return first.held_weight
    return first.owner


def input_masking(model: nn.Module, layer: nn.Module | torch.Tensor, input_shape: tuple[int, ...]) -> InputMasking:
    """:class:`InputMasking` of ``model``, whose first layer with weights is ``layer`` (a module, whose call is
    hooked; or the weight a functional layer reads, whose first call on it is caught), found by one probe input of
    ``input_shape`` run in training mode against the same input in eval mode (what the layer reads may differ from
    the input itself in both: a zero padding); the model's mode, buffers and random state are left as they were."""
    first = next(model.parameters())
    probe = torch.rand((1, *input_shape), generator=torch.Generator().manual_seed(0)).to(first.device, first.dtype)
    got, seen = _first_input(model, layer, probe, "train")
    changed = got is not None and not _same(got, probe)
    if changed:  # the layer may read something else than the input in eval mode too (a zero padding)
        read, _ = _first_input(model, layer, probe, "eval")
        changed = read is None or not _same(got, read)
    return InputMasking(changed, seen if changed else ())


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values in the same order, whatever their shapes."""
    return a.numel() == b.numel() and torch.equal(a.reshape(-1), b.reshape(-1))


def _first_input(model: nn.Module, layer: nn.Module | torch.Tensor, probe: torch.Tensor, mode: str
                 ) -> tuple[torch.Tensor | None, tuple[Dropout, ...]]:
    """What ``layer`` reads when ``model`` runs ``probe`` in ``mode`` (None where it does not run), and the Dropout
    modules that ran before it."""
    names = {id(m): n for n, m in model.named_modules()}
    seen: list[Dropout] = []
    got: list[torch.Tensor] = []  # what the first layer read

    def ran(mod: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not got and not reading.calls:
            seen.append(Dropout(names[id(mod)], float(mod.p)))

    module = isinstance(layer, nn.Module)  # a module's call is hooked, a functional layer's caught by its weight
    reading = FunctionalCalls({} if module else {id(layer): "first"}, first=True)
    hooks = [layer.register_forward_hook(lambda mod, args, out: got.append(args[0].detach()))] if module else []
    hooks += [m.register_forward_hook(ran) for m in model.modules() if isinstance(m, DROPOUTS) and m.p > 0]
    devices = [probe.device.index or 0] if probe.device.type == "cuda" else []
    try:
        with torch.no_grad(), buffers_kept(model), torch.random.fork_rng(devices=devices), \
                client_mode(model, mode), reading:
            model(probe)
    except Exception:  # a layer after it cannot run one sample in training mode (BatchNorm), or fails otherwise
        pass
    finally:
        for h in hooks:
            h.remove()
    got += [call.input for call in reading.calls]
    return (got[0] if got else None), tuple(seen)


def named(layers: tuple) -> str:
    """The Dropout ``layers`` (:class:`~fedleak.nets.Dropout`) in words, each once."""
    return ", ".join(dict.fromkeys(f"Dropout '{d.name}' (p = {d.p:g})" for d in layers)) or "Dropout"


def withheld(masking: InputMasking, train_dropout: bool | None) -> str:
    """Why an input of a model whose first layer reads it otherwise in training mode is not certified, in words,
    unless the client is known to run the model in eval mode (``train_dropout`` False); else empty."""
    if not masking.changed or train_dropout is False:
        return ""
    what = (f"the model's {named(masking.dropout)}" if masking.dropout
            else "something the model runs only in training mode (a functional dropout, added noise)")
    return (f"{what} changes its input in training mode: a client that runs the model so sends the gradient of a "
            "changed copy of its input (Dropout zeroes random values and scales the others by 1/(1 - p)), which "
            "reproduces the update as exactly as the sample would, so the rebuilt input may be that copy (pass "
            "train_dropout=False if the client ran the model in eval mode)")
