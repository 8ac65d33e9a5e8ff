"""Models whose weights are parameters used through functions (``F.linear(x, self.W1, self.b1)``, ``x @ self.W.T``),
not layer modules: what fedleak says where it looks for their layers."""

from __future__ import annotations

from torch import nn

LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding, nn.EmbeddingBag)


def loose_parameters(model: nn.Module) -> str:
    """Why no layer of ``model`` is found, where its parameters are held outside layer modules; else empty."""
    names = [name for name, _ in model.named_parameters()]
    if not names or any(isinstance(m, LAYERS) for m in model.modules()):
        return ""
    shown = ", ".join(names[:4]) + (", ..." if len(names) > 4 else "")
    return (f"the model's weights ({shown}) are parameters its forward uses through functions (F.linear(x, self.W), "
            "x @ self.W.T), not layers: fedleak reads the weights of layer modules (nn.Linear, nn.Conv2d); hold each "
            "weight and bias in one (self.fc1 = nn.Linear(784, 1024): its parameters are then fc1.weight, fc1.bias)")
