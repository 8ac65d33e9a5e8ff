"""The white-box features of Nasr, Shokri and Houmansadr (IEEE S&P 2019) for each record: the per-record gradient
of the loss w.r.t. the weights of the model's last weighted layers, those layers' inputs and outputs
(activations), the loss and the true label, all from real autograd and forward hooks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fedleak.errors import ModelError, OptionError
from fedleak.membership.base import Records
from fedleak.membership.signals import evaluating, per_record_gradients, record_losses

MAX_GRADIENT_ENTRIES = 20_000_000  # per-record gradient entries held at once (N x weights): 160 MB in float64


@dataclass(frozen=True)
class WhiteboxFeatures:
    """One row per record: ``gradients[l]`` N x out x in (layer ``l``'s weight gradient, conv kernels flattened
    into ``in``), ``activations[l]`` N x d (layer inputs and outputs, conv maps averaged over space), ``loss`` N,
    ``labels`` N."""

    gradients: tuple[torch.Tensor, ...]
    activations: tuple[torch.Tensor, ...]
    loss: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return int(self.loss.shape[0])

    def take(self, index: torch.Tensor) -> WhiteboxFeatures:
        return WhiteboxFeatures(tuple(g[index] for g in self.gradients), tuple(a[index] for a in self.activations),
                                self.loss[index], self.labels[index])

    @staticmethod
    def concat(parts: list[WhiteboxFeatures]) -> WhiteboxFeatures:
        return WhiteboxFeatures(
            tuple(torch.cat([p.gradients[i] for p in parts]) for i in range(len(parts[0].gradients))),
            tuple(torch.cat([p.activations[i] for p in parts]) for i in range(len(parts[0].activations))),
            torch.cat([p.loss for p in parts]), torch.cat([p.labels for p in parts]))

    def unit_invariant(self) -> WhiteboxFeatures:
        """The features with each gradient row's entries and each hidden activation's units sorted by magnitude,
        largest first; the model's output (the last activation) keeps its class order. Independently trained
        models order their hidden units arbitrarily, so only this form carries over from shadow models to the
        target; sorting keeps every value, only the unit order goes."""
        gradients = tuple(g.abs().sort(dim=-1, descending=True).values for g in self.gradients)
        hidden = tuple(a.abs().sort(dim=-1, descending=True).values for a in self.activations[:-1])
        return WhiteboxFeatures(gradients, hidden + self.activations[-1:], self.loss, self.labels)

    def gradient_norms(self) -> torch.Tensor:
        """N x L: each layer's per-record weight-gradient L2 norm."""
        return torch.stack([g.flatten(1).norm(dim=1) for g in self.gradients], dim=1)


def weighted_layers(model: nn.Module, layers: int) -> list[tuple[str, nn.Module]]:
    """The last ``layers`` modules that own a trainable ``weight`` of at least two dimensions (Linear, Conv),
    in forward order of registration, as ``(parameter name of the weight, module)``."""
    found = [(f"{name}.weight" if name else "weight", module) for name, module in model.named_modules()
             if isinstance(getattr(module, "weight", None), nn.Parameter) and module.weight.requires_grad
             and module.weight.ndim >= 2]
    if not found:
        raise ModelError("the white-box features need a model with a trainable Linear or Conv layer")
    if layers > len(found):
        raise OptionError(f"layers={layers} but the model has only {len(found)} weighted layer(s)")
    return found[-layers:]


def _flat(activation: torch.Tensor) -> torch.Tensor:
    return activation.flatten(2).mean(2) if activation.ndim > 2 else activation


def layer_activations(model: nn.Module, records: Records, modules: list[nn.Module]) -> tuple[torch.Tensor, ...]:
    """The first module's input, then every module's output, on the records (eval mode, no gradient)."""
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(modules) + 1)}

    def hook(index: int):
        def grab(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            if index == 0:
                seen[0].append(_flat(args[0].detach()))
            seen[index + 1].append(_flat(output.detach()))
        return grab

    handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(modules)]
    dtype = next(model.parameters()).dtype
    try:
        with evaluating(model), torch.no_grad():
            for start in range(0, len(records), 512):
                model(records.inputs[start:start + 512].to(dtype))
    finally:
        for h in handles:
            h.remove()
    return tuple(torch.cat(seen[i]).to(torch.float64) for i in seen)


def whitebox_features(model: nn.Module, records: Records, layers: int = 1) -> WhiteboxFeatures:
    """The white-box features of ``records`` under ``model`` for its last ``layers`` weighted layers."""
    chosen = weighted_layers(model, layers)
    size = sum(m.weight.numel() for _, m in chosen) * len(records)
    if size > MAX_GRADIENT_ENTRIES:
        raise OptionError(f"the per-record gradients of the last {layers} layer(s) hold {size:,} numbers for "
                          f"{len(records)} records (at most {MAX_GRADIENT_ENTRIES:,}); take fewer layers or records")
    names = [n for n, _ in chosen]
    grads = per_record_gradients(model, records, names)
    gradients = tuple(grads[n].flatten(2).to(torch.float64) for n in names)
    activations = layer_activations(model, records, [m for _, m in chosen])
    return WhiteboxFeatures(gradients, activations, record_losses(model, records), records.labels.long())
