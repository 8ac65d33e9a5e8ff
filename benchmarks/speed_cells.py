"""The speed benchmark's models and cells (``bench_speed.py`` times them): which models, at which batch sizes, on
which data, and what one cell runs: the client's own work (the reference of every ratio), one float64 copy of
its update, the attack, and, for the CNN, fishing and the attack on the fished batch.

A client sends its gradient (FedSGD) with the number of examples it reports, or (``local_steps``) a FedAvg weight
update of that many local SGD steps on its batch at learning rate ``LR``; the reference is then its local training,
timed the way a client runs it (plain autograd and an SGD step per local step, on a copy of the weights it
received).
"""

from __future__ import annotations

from dataclasses import dataclass

DATASET = "fashion-mnist"
LR = 0.01  # the FedAvg clients' learning rate (the attack does not know it)


@dataclass(frozen=True)
class ModelSpec:
    """One model of the table: an MLP (``conv`` empty) or a CNN (conv channels, kernel 3, padding 1, no pooling),
    with its dense hidden ``widths`` and the batch sizes it is timed at; or (``user``) a user's own ``nn.Module``
    of one hidden layer (:func:`user_net`); on ``dataset``, its batches ``normalise``d to zero mean and unit
    variance where asked; its clients send gradients, or (``local_steps``) FedAvg weight updates of that many
    local steps."""

    name: str
    widths: tuple[int, ...]
    batches: tuple[int, ...]
    conv: tuple[int, ...] = ()
    dataset: str = DATASET
    user: bool = False
    normalise: bool = False
    local_steps: int = 0


FULL = (
    ModelSpec("mlp-256", (256,), (1, 16, 64, 256)),
    ModelSpec("mlp-1024", (1024,), (1, 16, 64, 256)),
    ModelSpec("mlp-4096", (4096,), (1, 16, 64, 256)),
    ModelSpec("mlp-1024-1024", (1024, 1024), (1, 64, 256)),
    ModelSpec("mlp-1024-1024-1024", (1024, 1024, 1024), (1, 64, 256)),
    ModelSpec("cnn-6-32", (1024,), (32,), conv=(6, 32)),
    # users' models on data the attack was not tuned on: two classes (every blend of samples passes the top
    # layer's check), wider inputs, inputs normalised as users do
    ModelSpec("user-fashion", (2048,), (16,), user=True),
    ModelSpec("user-lfw", (2048,), (16,), dataset="lfw", user=True),
    ModelSpec("user-lfw-normalised", (2048,), (16,), dataset="lfw", user=True, normalise=True),
    ModelSpec("user-mni152", (2048,), (16,), dataset="mni152", user=True),
    ModelSpec("user-retina-normalised", (2048,), (16,), dataset="retina", user=True, normalise=True),
    # two hidden layers on two classes: hundreds of blends that find no exclusive row in the layer below
    ModelSpec("mlp-1024-1024-lfw", (1024, 1024), (16,), dataset="lfw"),
    # FedAvg weight updates of the user's module (the weights after local training, as Flower's clients send them)
    ModelSpec("user-lfw-fedavg-1", (2048,), (16,), dataset="lfw", user=True, local_steps=1),
    ModelSpec("user-mni152-fedavg-1", (2048,), (16,), dataset="mni152", user=True, local_steps=1),
    ModelSpec("user-retina-normalised-fedavg-1", (2048,), (16,), dataset="retina", user=True, normalise=True,
              local_steps=1),
    ModelSpec("user-retina-normalised-fedavg-3", (2048,), (32,), dataset="retina", user=True, normalise=True,
              local_steps=3),
)
QUICK = (
    ModelSpec("mlp-256", (256,), (1, 64)),
    ModelSpec("mlp-1024", (1024,), (1, 64)),
    ModelSpec("mlp-1024-1024", (1024, 1024), (1, 64)),
)


def user_net(in_features: int, width: int, classes: int):
    """A model as users write it: an ``nn.Module`` class with ``x.view``, ``F.relu`` and Dropout (in eval mode)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class UserNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(in_features, width)
            self.drop = nn.Dropout(0.2)
            self.fc2 = nn.Linear(width, classes)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.drop(F.relu(self.fc1(x.view(x.shape[0], -1)))))

    return UserNet().eval()


class Cell:
    """One cell: the model (seeded), a batch of ``m`` from the model's data, the client's update and the steps
    timed."""

    def __init__(self, spec: ModelSpec, m: int, data, seed: int):
        import copy
        import math

        import torch

        import fedleak

        self.spec, self.m, self.data = spec, m, data
        if spec.conv:
            self.model = fedleak.make_convnet(data.input_shape, data.num_classes, channels=spec.conv, kernel=3,
                                              padding=1, pool=None, fc_widths=spec.widths, seed=seed)
        elif spec.user:
            torch.manual_seed(seed)
            self.model = user_net(math.prod(data.input_shape), spec.widths[0], data.num_classes)
        else:
            self.model = fedleak.make_mlp(data.input_shape, list(spec.widths), data.num_classes, seed=seed)
        self.x, self.y = data.batch(m, seed=1000 * seed + m)
        self.value_range = data.value_range
        if spec.normalise:
            self.x = (self.x - self.x.mean()) / self.x.std()
            self.value_range = (float(self.x.min()), float(self.x.max()))
        self.local = copy.deepcopy(self.model)  # a FedAvg client's own copy, trained locally
        self.names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        # what the client sends: its gradient and the number of examples it reports, as Flower's clients do (two
        # classes certify only at a reported batch size), or its weights after local training
        self.update = fedleak.GradientUpdate(self.client(), num_examples=m) if not spec.local_steps else \
            fedleak.fedavg_update(self.model, self.x, self.y, lr=LR, local_steps=spec.local_steps)
        self.sent = self.update.after if spec.local_steps else self.update.gradients  # what the client sends, by name
        self.fished = self.fished_update = None
        if spec.conv:
            self.fished = self.fish()
            loss = torch.nn.functional.cross_entropy(self.model(self.fished.inputs), self.y)
            self.fished_update = fedleak.GradientUpdate(dict(zip(self.names, torch.autograd.grad(loss, self.params))),
                                                        num_examples=m)

    def client(self) -> dict:
        """What the client computes: plain autograd of the mean cross-entropy over the batch (its gradient), or,
        for a FedAvg client, that many local SGD steps on its own copy of the model, from the weights it received
        (its new weights)."""
        import torch

        if not self.spec.local_steps:
            loss = torch.nn.functional.cross_entropy(self.model(self.x), self.y)
            return dict(zip(self.names, torch.autograd.grad(loss, self.params)))
        weights = [p for p in self.local.parameters() if p.requires_grad]
        with torch.no_grad():  # the weights it received
            for w, p in zip(weights, self.params):
                w.copy_(p)
        for _ in range(self.spec.local_steps):
            loss = torch.nn.functional.cross_entropy(self.local(self.x), self.y)
            grads = torch.autograd.grad(loss, weights)
            with torch.no_grad():
                for w, g in zip(weights, grads):
                    w.add_(g, alpha=-LR)  # as torch.optim.SGD steps
        return {n: w.detach() for n, w in zip(self.names, weights)}

    def copy64(self) -> list:
        import torch

        return [v.to(torch.float64) for v in self.sent.values()]

    def attack(self):
        import fedleak

        return fedleak.reconstruct(self.model, self.update)

    def one_reading(self):
        """The attack reading the update once (``peel=False``): the default peels it round after round."""
        import fedleak

        return fedleak.reconstruct(self.model, self.update, peel=False)

    def fish(self):
        import fedleak

        return fedleak.fish(self.model, self.x, self.y, solve_check=False)

    def fished_attack(self):
        import fedleak

        return fedleak.reconstruct(self.model, self.fished_update)

    def steps(self) -> dict:
        out = {"gradient": self.client, "f64_copy": self.copy64, "attack": self.attack, "one_reading": self.one_reading}
        if self.spec.conv:
            out.update(fish=self.fish, fished_attack=self.fished_attack)
        return out
