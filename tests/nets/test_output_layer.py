"""The layer whose output a model returns, found in its traced forward: a Linear module, or F.linear of the model's
parameters; nothing where no Linear layer leads to the output."""

import torch
from torch import nn
from torch.nn import functional as F

from fedleak.nets.output_layer import OutputLayer, output_layer, traced_without_one


class Logits(nn.Module):
    """Logits from F.linear of parameters, written in each way a forward can pass them."""

    def __init__(self, style: str) -> None:
        super().__init__()
        self.style = style
        self.w = nn.Parameter(torch.randn(5, 6))
        self.b = nn.Parameter(torch.zeros(5))
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        h = torch.relu(self.fc(x))
        if self.style == "positional":
            return F.linear(h, self.w, self.b) / 2  # a scaling after the layer
        if self.style == "keywords":
            return F.log_softmax(F.linear(h, weight=self.w, bias=self.b), 1)
        if self.style == "no bias":
            return F.linear(h, self.w)
        return h @ self.w.T + self.b  # a matmul: no layer


def test_the_output_layer_is_the_linear_layer_whose_output_the_forward_returns():
    assert output_layer(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))) == OutputLayer("2.weight", "2.bias")
    assert output_layer(nn.Linear(4, 3, bias=False)) == OutputLayer("weight", None)  # the model is the layer
    assert output_layer(Logits("positional")) == OutputLayer("w", "b")
    assert output_layer(Logits("keywords")) == OutputLayer("w", "b")
    assert output_layer(Logits("no bias")) == OutputLayer("w", None)
    # a product with a parameter is a layer without a name: not the Linear module before it
    assert output_layer(Logits("matmul")) is None and traced_without_one(Logits("matmul"))


def test_a_forward_that_does_not_trace_has_none():
    class Branching(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else -self.fc(x)  # control flow on the input's values

    assert output_layer(Branching()) is None and not traced_without_one(Branching())


def test_the_model_s_class_count_is_its_output_layer_s():
    from fedleak.validation import output_features

    class Mixed(nn.Module):  # a Linear module inside, logits from F.linear of a parameter
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 16)
            self.w = nn.Parameter(torch.randn(3, 16))

        def forward(self, x):
            return F.linear(torch.relu(self.fc(x)), self.w)

    assert output_features(Mixed()) == 3  # not the 16 of the last nn.Linear registered
    assert output_features(nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 5))) == 5
