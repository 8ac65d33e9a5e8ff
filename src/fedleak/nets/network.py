"""A network as fedleak's exact methods read it: conv blocks, then a fully connected ReLU head.

:func:`assemble` groups the typed chain of layers traced from the user's model into
``( Conv [BatchNorm] ReLU [Pool] )*  Linear (ReLU Linear)*`` (reshapes in between are free: they never
change the flat order). An MLP is a network without conv blocks; there is one path for both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from fedleak.errors import ModelError
from fedleak.nets.blocks import ConvBlock
from fedleak.nets.head import ReluMLP
from fedleak.nets.layers import BatchNorm, Conv, Dense, Dropout, Layer, Pad, Pool, Relu, Reshape
from fedleak.validation import check_num_classes

# why the exact methods have nothing to read in a model whose dense head has no hidden ReLU layer
NO_HIDDEN_RELU = ("the model has no hidden ReLU layer in its dense head (a Linear layer and a ReLU before the output "
                  "layer), so the exact methods have no exclusively activated neurons to read")


@dataclass(frozen=True)
class Step:
    """One typed layer of the chain with its per-sample input and output shapes."""

    layer: Layer
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]


@dataclass(frozen=True)
class ConvPass:
    """One pass through the conv blocks: each block's pre-activations (n x C x H x W) and output, and the
    features (the flattened input of the first Linear layer, n x feature_dim)."""

    preacts: list[torch.Tensor]
    outputs: list[torch.Tensor]
    features: torch.Tensor


@dataclass(frozen=True, eq=False)
class Network:
    """The user's model as a chain: ``blocks`` (conv, possibly none) then the ReLU ``head``.

    ``input_shape`` is the shape of one input sample; ``notes`` say what was assumed to read the model: how the
    input shape was found (nothing when it came from the inputs, the caller or the model) and that its Dropout
    and BatchNorm are read in eval mode (:func:`training_mode_note`). ``dropout``: the model's eval-mode Dropout
    layers (rate > 0), which are not in ``steps``; ``folded_norms``: its eval-mode BatchNorm1d layers on Linear
    features, folded into those layers before it was read (not in ``steps`` either). ``caveats``: how the way the
    model was read may keep the exact methods from certifying anything (a client running its Dropout or BatchNorm
    in training mode; images larger than the inferred input shape that fit the layers too), in words, for their
    reasons when nothing is certified.
    """

    input_shape: tuple[int, ...]
    steps: tuple[Step, ...]
    blocks: tuple[ConvBlock, ...]
    head: ReluMLP
    notes: tuple[str, ...] = ()
    dropout: tuple[Dropout, ...] = ()
    caveats: tuple[str, ...] = ()
    folded_norms: tuple[BatchNorm, ...] = ()

    @property
    def norms(self) -> tuple[BatchNorm, ...]:
        """The model's eval-mode BatchNorm layers: in its conv blocks, and on its Linear layers' features (folded
        into them, :mod:`fedleak.nets.dense_norms`)."""
        return (*batch_norms(self.blocks), *self.folded_norms)

    @property
    def mode_dependent(self) -> bool:
        """Whether the model computes otherwise in training mode (it has Dropout or BatchNorm)."""
        return bool(self.dropout or self.norms)

    @property
    def uncertifiable(self) -> str:
        """Why no input of this model can be certified at any batch size, in words (empty when no conv block
        stands in the way): blocks whose output cannot determine their input (:attr:`ConvBlock.never_determined`),
        such as Flower's quickstart ``Net``, whose pooled conv layers have fewer outputs than inputs."""
        short = [b.shortfall() for b in self.blocks if b.never_determined]
        return f"no input of this model can be certified at any batch size: {'; '.join(short)}" if short else ""

    @property
    def is_conv(self) -> bool:
        return bool(self.blocks)

    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def feature_dim(self) -> int:
        return self.head.input_dim

    @property
    def feature_shape(self) -> tuple[int, ...]:
        return self.blocks[-1].out_shape if self.blocks else self.input_shape

    @property
    def num_classes(self) -> int:
        return self.head.num_classes

    @property
    def device(self) -> torch.device:
        return self.head.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the model's weights (what the client computes in)."""
        return self.head.dense[0].weight.dtype

    def conv_pass(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> ConvPass:
        """The one forward pass through the conv blocks, in ``dtype`` on the model's device (autograd flows
        through it); for an MLP the features are the flattened inputs."""
        a = x.to(device=self.device, dtype=dtype).reshape(x.shape[0], -1)
        preacts, outputs = [], []
        for blk in self.blocks:
            z = blk.preact(a, dtype)
            a = blk.apply_pool(torch.relu(z))  # = blk.forward(a), keeping the pre-activations
            preacts.append(z)
            outputs.append(a)
        return ConvPass(preacts, outputs, a.reshape(a.shape[0], -1))

    def features(self, x: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The flattened input of the first Linear layer (n x feature_dim) for inputs ``x`` (n x input_shape)."""
        return self.conv_pass(x, dtype).features

    def parameter_names(self) -> list[str]:
        return [n for blk in self.blocks for n in blk.parameter_names()] + self.head.parameter_names()


def _maps(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """A block's (C, H, W) maps; (C, L) signals (a ``Conv1d``'s) as (C, 1, L)."""
    return (shape[0], 1, shape[1]) if len(shape) == 2 else shape


def _group_blocks(steps: list[Step]) -> tuple[list[ConvBlock], int]:
    """Conv blocks from the front of ``steps``; returns them and the index of the first step after them."""
    blocks: list[ConvBlock] = []
    i = 0
    body = [s for s in steps]
    while True:
        after = next((j for j in range(i, len(body)) if not isinstance(body[j].layer, (Reshape, Pad))), len(body))
        pads: list[Step] = []
        if after < len(body) and isinstance(body[after].layer, Conv):
            pads = _pads_before(body[i:after])  # zero padding read into the conv's own
            i = after  # reshapes of the input (or of a block's output) into (C, H, W) maps
        if i >= len(body) or not isinstance(body[i].layer, Conv):
            return blocks, i
        conv_step = body[i]
        conv = conv_step.layer
        if pads:
            geometry = conv.geometry
            conv = replace(conv, padding=_added(geometry.padding, [s.layer.padding for s in pads]),
                           after=_added(geometry.after, [s.layer.after for s in pads]))
            conv_step = Step(conv, pads[0].in_shape, conv_step.out_shape)
        i += 1
        bn = None
        if i < len(body) and isinstance(body[i].layer, BatchNorm):
            bn = body[i].layer
            i += 1
        pool = None
        if i < len(body) and isinstance(body[i].layer, Pool) and body[i].layer.kind == "max":
            pool = body[i].layer  # max pooling commutes with the ReLU after it
            i += 1
        if i >= len(body) or not isinstance(body[i].layer, Relu):
            got = "the end of the model" if i >= len(body) else f"'{body[i].layer.name}'"
            raise ModelError(f"node '{conv.name}' (Conv2d) must be followed by a ReLU (after an optional eval-mode "
                             f"BatchNorm2d); got {got}")
        i += 1
        if pool is None and i < len(body) and isinstance(body[i].layer, Pool):
            pool = body[i].layer
            i += 1
        c, h, w = _maps(conv_step.out_shape)  # the pool's maps (a global pool written x.mean((2, 3)) gives (C,))
        out_shape = (c, h, w) if pool is None else (c, h // pool.kernel[0], w // pool.kernel[1])
        blocks.append(ConvBlock(conv, bn, pool, _maps(conv_step.in_shape), (c, h, w), out_shape))
        if i < len(body) and isinstance(body[i].layer, (Pool, Relu, BatchNorm)):
            raise ModelError(f"node '{body[i].layer.name}': a conv block is Conv2d [BatchNorm2d] ReLU [one pool]; "
                             "this layer does not fit")


def _added(own: tuple[int, int], pads: list[tuple[int, int]]) -> tuple[int, int]:
    """A conv's ``own`` padding on one side with the zero ``pads`` before it added."""
    return (own[0] + sum(p[0] for p in pads), own[1] + sum(p[1] for p in pads))


def _pads_before(steps: list[Step]) -> list[Step]:
    """The zero paddings among ``steps`` (reshapes and paddings before a conv), which must come last: a reshape after
    one would move the padded values."""
    pads = [s for s in steps if isinstance(s.layer, Pad)]
    if pads and not all(isinstance(s.layer, Pad) for s in steps[steps.index(pads[0]):]):
        raise ModelError(f"node '{pads[0].layer.name}': zero padding is read into the conv that follows it, directly; "
                         "here a reshape comes between them")
    return pads


def check_head_trainable(model: torch.nn.Module, net: Network) -> None:
    """Raise :class:`ModelError` when a parameter of ``net``'s dense head is frozen (``requires_grad=False``): the
    exact methods read every head layer's gradient, which an update holds only for trainable parameters. Frozen
    conv layers (a fine-tuned head on a frozen backbone) are fine: they are inverted from their weights."""
    head = set(net.head.parameter_names())
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad and n in head]
    if frozen:
        shown = ", ".join(frozen[:5]) + (", ..." if len(frozen) > 5 else "")
        raise ModelError(f"the model's dense layers have {len(frozen)} frozen parameter(s) (requires_grad=False: "
                         f"{shown}), so a client update holds no gradient for them; the exact methods read the "
                         "gradient of every Linear layer (frozen conv layers are inverted from their weights); "
                         "'auto', the first-layer attack (where the first Linear layer is trained) and the "
                         "optimisation attacks (dlg, idlg, ig, dlm, dlm+) take the update of the trainable ones")


def batch_norms(blocks: tuple[ConvBlock, ...] | list[ConvBlock]) -> tuple[BatchNorm, ...]:
    """The eval-mode BatchNorm layers folded into ``blocks``."""
    return tuple(blk.bn for blk in blocks if blk.bn is not None)


def training_mode_cause(dropout: tuple[Dropout, ...], norms: tuple[BatchNorm, ...]) -> str:
    """Why an update of a model with these Dropout and BatchNorm layers may certify nothing, in words (a
    caveat): its client may have run them in training mode."""
    layers = [f"Dropout '{d.name}' (p = {d.p:g})" for d in dropout] + [f"BatchNorm '{b.name}'" for b in norms]
    effects = (["drops random units of every sample"] if dropout else []) + (
        ["normalises by each batch's own statistics instead of the running ones"] if norms else [])
    return (f"a client that runs the model's {', '.join(layers)} in training mode (model.train(), as training "
            f"loops do) {' and '.join(effects)}, which the exact methods do not model: they certify nothing from "
            "its update")


def training_mode_note(dropout: tuple[Dropout, ...], norms: tuple[BatchNorm, ...]) -> str:
    """How a model with these Dropout and BatchNorm layers is read, in words (a note)."""
    read = (["Dropout is read in eval mode, where it is the identity"] if dropout else []) + (
        ["BatchNorm is read in eval mode, with its running statistics"] if norms else [])
    return f"{'; '.join(read)}; {training_mode_cause(dropout, norms)}"


def assemble(steps: list[Step], input_shape: tuple[int, ...], notes: tuple[str, ...] = (),
             caveats: tuple[str, ...] = ()) -> Network:
    """Group the traced chain into conv blocks and a ReLU head (raises :class:`ModelError` naming the node)."""
    dropout = tuple(s.layer for s in steps if isinstance(s.layer, Dropout))
    steps = [s for s in steps if not isinstance(s.layer, Dropout)]
    blocks, i = _group_blocks(steps)
    norms = batch_norms(blocks)
    if dropout or norms:
        notes = (*notes, training_mode_note(dropout, norms))
        caveats = (*caveats, training_mode_cause(dropout, norms))
    dense: list[Dense] = []
    expect_dense = True
    for step in steps[i:]:
        layer = step.layer
        if isinstance(layer, Reshape):
            continue
        want = Dense if expect_dense else Relu
        if not isinstance(layer, want):
            where = "after the conv blocks the model " if blocks else "the model "
            raise ModelError(f"node '{layer.name}' ({type(layer).__name__}) does not fit here: {where}must alternate "
                             "Linear and ReLU layers and end with a Linear layer (the logits)")
        if isinstance(layer, Dense):
            dense.append(layer)
        expect_dense = not expect_dense
    if not dense:
        raise ModelError("the model has no Linear layer after its last conv block; fedleak's exact methods read "
                         "the logits from a Linear layer")
    if expect_dense:
        raise ModelError("the model must end with a Linear layer (the logits); "
                         f"it ends with node '{steps[-1].layer.name}'")
    check_num_classes(dense[-1].out_features, f"the output layer '{dense[-1].name}'")
    head = ReluMLP(tuple(dense), None if blocks else input_shape)
    return Network(input_shape, tuple(steps), tuple(blocks), head, notes, dropout, caveats)
