"""Models as users write them: ``nn.Module`` classes with functional ops, not fedleak's builders; and
:func:`in_main`, a class as if written in the user's own script (``__main__``)."""

from __future__ import annotations

import copy
import sys

import torch
from torch import nn
from torch.nn import functional as F

import fedleak
from fedleak.models.flower import FlowerNet  # Flower's quickstart-pytorch Net, exactly as Flower writes it


def hidden_layer_scaled(model: nn.Module, factor: float) -> nn.Module:
    """A copy of a one-hidden-layer MLP computing the same logits with its hidden pre-activations ``factor`` times
    larger (the first Linear layer times ``factor``, the output layer's weights divided by it)."""
    twin = copy.deepcopy(model)
    first, out = [m for m in twin.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        first.weight.mul_(factor)
        first.bias.mul_(factor)
        out.weight.div_(factor)
    return twin


def flower_net_twin(net: FlowerNet) -> nn.Sequential:
    """The same network as an ``nn.Sequential`` with the same weights."""
    twin = nn.Sequential(net.conv1, nn.ReLU(), nn.MaxPool2d(2, 2), net.conv2, nn.ReLU(), nn.MaxPool2d(2, 2),
                         nn.Flatten(), net.fc1, nn.ReLU(), net.fc2, nn.ReLU(), net.fc3)
    return twin


class DropoutMLP(nn.Module):
    """An MLP class with ``torch.flatten``, ``F.relu`` and Dropout (use it in eval mode)."""

    def __init__(self, in_features: int, hidden: int, num_classes: int, p: float = 0.25) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.dropout = nn.Dropout(p)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = self.dropout(F.relu(self.fc1(x)))
        return self.fc2(x)


def dropout_mlp_twin(net: DropoutMLP) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), net.fc1, nn.ReLU(), net.fc2)


class FrozenHeadMLP(nn.Module):
    """FedBABU's client model: the body trains under a fixed output layer (``requires_grad=False``), so its updates
    hold nothing of that layer."""

    def __init__(self, in_features: int = 64, hidden: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.fc2.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.view(x.size(0), -1))))


class ResidualMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x)) + x)


class TiedMLP(nn.Module):
    """One hidden Linear module called twice (shared weights), one ReLU module reused."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.hidden = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.fc1(x))
        return self.fc2(self.relu(self.hidden(self.relu(self.hidden(x)))))


class ReusedReluMLP(nn.Module):
    """Two hidden layers sharing one ``nn.ReLU`` module (no weights shared)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 16)
        self.relu = nn.ReLU()
        self.fc3 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


class BatchNormMLP(nn.Module):
    """BatchNorm1d on a dense layer's features: the client trains it on its batch's statistics."""

    def __init__(self, in_features: int = 64, width: int = 32, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.bn = nn.BatchNorm1d(width)
        self.fc2 = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.bn(self.fc1(x.flatten(1)))))


class LayerNormMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.norm(self.fc1(x))))


class GeluMLP(nn.Module):
    """An MLP class with ``F.gelu``, which the exact methods do not read."""

    def __init__(self, in_features: int = 784, width: int = 256, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, width)
        self.fc2 = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x.flatten(1))))


def confident_mlp(width: int = 1024, scale: float = 3000.0, seed: int = 0) -> nn.Sequential:
    """A digits MLP (8 x 8 inputs, 10 classes) that classifies most inputs with probability 1 in float32, as a model
    trained to confidence does: fedleak's MLP with its output weights scaled up."""
    import fedleak

    model = fedleak.make_mlp((1, 8, 8), [width], 10, seed=seed)
    with torch.no_grad():
        model[-1].weight.mul_(scale)
    return model


def mixed_precision_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype
                             ) -> list[torch.Tensor]:
    """The gradient a client computes under ``torch.autocast`` (CPU, ``dtype``), as ``model.parameters()`` lists it:
    float32 tensors whose values are products in ``dtype``."""
    with torch.autocast("cpu", dtype=dtype):
        logits = model(x)
    return list(torch.autograd.grad(F.cross_entropy(logits.float(), y), list(model.parameters())))


class PrefixedMLP(nn.Module):
    """An MLP on 8 x 8 images whose forward first runs ``prefix`` (a function of x) then flattens with ``flat``."""

    def __init__(self, prefix, flat=lambda x: x.view(x.size(0), -1)) -> None:
        super().__init__()
        self.prefix, self.flat = prefix, flat
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(self.flat(self.prefix(x)))))


def named_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str = "eval") -> dict[str, torch.Tensor]:
    """The gradient of the mean cross-entropy by parameter name, computed in ``mode`` ("train": the model's norms on
    the batch's own statistics); the model is left in eval mode."""
    model.train(mode == "train")
    grads = torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
    model.eval()
    return {n: g for (n, _), g in zip(model.named_parameters(), grads)}


def sized_gradient(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str = "eval") -> fedleak.GradientUpdate:
    """:func:`named_gradient` with the batch size the client reports (Flower's ``num_examples``): without it, a batch
    of near-copies of fewer samples would give the same gradient, and the exact route certifies nothing."""
    return fedleak.GradientUpdate(named_gradient(model, x, y, mode), num_examples=len(x))


def warmed_norms(model: nn.Module, data: fedleak.Dataset, seed: int = 0) -> nn.Module:
    """``model`` in eval mode, its BatchNorm1d layers' statistics those of 256 samples and their gamma, beta drawn
    around 1 and 0 (as a trained model's are, away from the initial 1 and 0)."""
    torch.manual_seed(seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm1d)]
    with torch.no_grad():
        for m in norms:
            m.momentum = None
            if m.affine:
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
        model.train()(data.batch(256, seed=seed + 100)[0])
    return model.eval()


def certified_exactly(model: nn.Module, digits: fedleak.Dataset, seed: int = 3) -> fedleak.Reconstruction:
    """The exact attack on a batch of 6 of ``digits``: at least 4 certified, every one exact, none false."""
    x, y = digits.batch(6, seed=seed)
    rec = fedleak.reconstruct(model, sized_gradient(model, x, y))
    result = fedleak.metrics.match(rec, x, y, data_range=digits.value_range)
    assert rec.num_certified >= 4 and result.false_certificates == 0
    assert int(result.exact.sum()) >= rec.num_certified
    return rec


def in_main(cls: type, monkeypatch) -> type:
    """A subclass of ``cls`` that pickles as ``__main__.<name>``, like a class written in a user's server script:
    it pickles here, but the audit worker (which never imports ``__main__``) could not unpickle it."""
    name = f"Script{cls.__name__}"
    script_cls = type(name, (cls,), {"__module__": "__main__", "__qualname__": name})
    monkeypatch.setattr(sys.modules["__main__"], name, script_cls, raising=False)
    return script_cls
