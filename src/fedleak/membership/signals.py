"""What a model says about each record, computed in batches: logits, per-record losses, and per-record gradients
of the loss (real autograd, batched with :func:`torch.func.vmap`). Every membership attack reads its signals from
here, so there is one forward pass and one per-sample gradient in the package.

A binary classifier with one logit ``z`` (trained with binary cross-entropy) gives the logits of its two-class
softmax twin, ``(0, z)``: their cross-entropy is its binary cross-entropy, and their softmax its probabilities
(:mod:`fedleak.binary`); a forward that ends with a sigmoid gives ``p``, whose logit is ``log p - log(1 - p)``."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from fedleak.client_loss import ends_in_sigmoid
from fedleak.membership.base import Records
from fedleak.updates import forward_logits, trainable_parameters

CHUNK = 512


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode (dropout off, batch-norm statistics frozen), its former mode restored after."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


def _dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def record_logits(model: nn.Module, records: Records, chunk: int = CHUNK) -> torch.Tensor:
    """N x K logits of ``model`` on the records (eval mode, no gradient); a single-logit model's as its twin's, N x 2
    (module docstring)."""
    out = []
    with evaluating(model), torch.no_grad():
        for start in range(0, len(records), chunk):
            x = records.inputs[start:start + chunk].to(_dtype(model))
            out.append(forward_logits(model, x, records.labels[start:start + chunk]))
    logits = torch.cat(out).to(torch.float64)
    return class_logits(logits, ends_in_sigmoid(model, logits))


def class_logits(outputs: torch.Tensor, probability: bool) -> torch.Tensor:
    """``outputs`` (N x K logits) as they are; N x 1 of a binary classifier as its twin's ``(0, z)``, ``z`` the
    logit, or, where the forward ends with a sigmoid (``probability``), the logit of the probability it gives (a
    probability that rounds to 0 or 1 taken one epsilon inside, so that its logit and gradient stay finite)."""
    if outputs.shape[-1] != 1:
        return outputs
    z = torch.logit(outputs, eps=float(torch.finfo(outputs.dtype).eps)) if probability else outputs
    return torch.cat([torch.zeros_like(z), z], -1)


def record_losses(model: nn.Module, records: Records, chunk: int = CHUNK) -> torch.Tensor:
    """The cross-entropy of each record (N)."""
    logits = record_logits(model, records, chunk)
    return nn.functional.cross_entropy(logits, records.labels.long(), reduction="none")


def scaled_logit(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LiRA's statistic: ``log p_y - log(1 - p_y)`` computed stably from the logits (N)."""
    log_p = torch.log_softmax(logits, dim=1)
    true = log_p.gather(1, labels.long().view(-1, 1)).squeeze(1)
    others = log_p.clone()
    others.scatter_(1, labels.long().view(-1, 1), float("-inf"))
    return true - torch.logsumexp(others, dim=1)


def parameter_names(model: nn.Module, last: int | None = None) -> list[str]:
    """The names of the model's trainable parameters, all or the ``last`` tensors (the last layers' weights and
    biases)."""
    names = list(trainable_parameters(model))
    return names if last is None else names[-last:]


def per_record_gradients(model: nn.Module, records: Records, names: Sequence[str] | None = None,
                         chunk: int = 256) -> dict[str, torch.Tensor]:
    """Per-record gradients of the cross-entropy w.r.t. the parameters ``names`` (all trainable ones by default):
    ``{name: N x *param.shape}``, by :func:`torch.func.vmap` over :func:`torch.func.grad` (eval mode)."""
    params = trainable_parameters(model)
    chosen = list(params) if names is None else list(names)
    fixed = {n: p.detach() for n, p in model.named_parameters() if n not in chosen}
    buffers = dict(model.named_buffers())
    dtype = _dtype(model)
    with evaluating(model), torch.no_grad():
        probe = forward_logits(model, records.inputs[:1].to(dtype), records.labels[:1])
    probability = ends_in_sigmoid(model, probe)

    def loss(free: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, {**fixed, **free, **buffers}, (x.unsqueeze(0),))
        logits = class_logits(out.reshape(1, -1), probability)  # a squeezed logit: one value
        return nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_record = vmap(grad(loss), in_dims=(None, 0, 0))
    free = {n: params[n].detach() for n in chosen}
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in chosen}
    with evaluating(model):
        for start in range(0, len(records), chunk):
            x = records.inputs[start:start + chunk].to(dtype)
            y = records.labels[start:start + chunk].long()
            for name, g in per_record(free, x, y).items():
                parts[name].append(g.detach())
    return {n: torch.cat(parts[n]) for n in chosen}


def flat_gradients(model: nn.Module, records: Records, chunk: int = 64) -> Iterator[tuple[int, torch.Tensor]]:
    """``(start, G)`` per chunk of records: ``G`` is chunk x P, each record's gradient of its loss w.r.t. every
    trainable parameter, flattened in the model's parameter order (chunked so memory stays at chunk x P)."""
    names = parameter_names(model)
    for start in range(0, len(records), chunk):
        part = records.take(torch.arange(start, min(start + chunk, len(records))))
        grads = per_record_gradients(model, part, names, chunk=chunk)
        yield start, torch.cat([grads[n].flatten(1) for n in names], dim=1).to(torch.float64)


def gradient_norms(model: nn.Module, records: Records, chunk: int = 64) -> dict[str, torch.Tensor]:
    """Each record's gradient L2 norm per trainable parameter tensor (``{name: N}``) and in total (``""``)."""
    names = parameter_names(model)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for start in range(0, len(records), chunk):
        part = records.take(torch.arange(start, min(start + chunk, len(records))))
        for name, g in per_record_gradients(model, part, names, chunk=chunk).items():
            parts[name].append(g.flatten(1).to(torch.float64).norm(dim=1))
    norms = {n: torch.cat(v) for n, v in parts.items()}
    norms[""] = torch.stack(list(norms.values())).pow(2).sum(0).sqrt()
    return norms
