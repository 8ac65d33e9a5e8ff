"""The shape of one input of a user's model: run a probe batch through it, or infer the shape from its layers.

A Linear layer first gives the input's width; a convolution first gives its channels, and the signal, square image
or cube that its layers take gives the rest (of several sizes that fit, the one the most halvings divide). The first
layer is the first one the traced ``forward`` calls (:func:`first_layer`), or, for a ``forward`` that does not trace,
the first one the model holds (:func:`untraced_input_shape`, checked by running the model).
"""

from __future__ import annotations

import contextlib
import io
import time

import torch
from torch import fx, nn

from fedleak.errors import ModelError
from fedleak.logits_of import per_sample_logits
from fedleak.loose_parameters import loose_parameters
from fedleak.nets.buffers import buffers_kept
from fedleak.nets.graph_reads import PRODUCTS, layer_weight, op_key, parameter_read, viewed_parameter

PROBE_BATCH = 2  # the probe batch has two samples, so an op that mixes samples shows in its shapes
MAX_SIDE = 512  # the largest square image side tried when the input shape must be inferred
MAX_ALSO_FITS = 64  # how many larger sides are tried after the smallest that fits


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


class _ShapeRecorder(fx.Interpreter):
    """Runs the graph and records every tensor node's shape and dtype in ``node.meta["shape"]``, ``["dtype"]``."""

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        tensor = isinstance(result, torch.Tensor)
        n.meta["shape"] = tuple(int(s) for s in result.shape) if tensor else None
        n.meta["dtype"] = result.dtype if tensor else None
        return result


def probe(model: nn.Module, gm: fx.GraphModule | None, shape: tuple[int, ...]) -> str | None:
    """Run a probe batch of ``shape``, recording every node's shape (through ``gm``; with ``gm`` None, a plain
    forward that records nothing, for a quick yes or no); why the model cannot take it, or None."""
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = torch.zeros(PROBE_BATCH, *shape, dtype=dtype, device=_device(model))
    # a traced model (torch.fx's GraphModule, as a federation's audit template is) prints its generated code to
    # stderr when it fails: a wrong shape tried here is an answer, not an error to show
    with buffers_kept(model), torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
        try:
            out = model(x) if gm is None else _ShapeRecorder(gm).run(x)
        except Exception as err:  # a wrong shape fails anywhere in the user's forward
            return (str(err).strip().splitlines() or [type(err).__name__])[0]
    out = per_sample_logits(out, PROBE_BATCH)  # a squeezed logit per sample as a column
    if out.dim() != 2 or out.shape[0] != PROBE_BATCH:
        return f"for a batch of {PROBE_BATCH} it returns {tuple(out.shape)}, not {PROBE_BATCH} x classes logits"
    return None


def first_layer(gm: fx.GraphModule) -> tuple[str, nn.Module | nn.Parameter] | None:
    """The first layer with weights the traced forward calls: a module that holds weights of its own (its name and
    the module), or a functional layer on a parameter of the model (``F.linear(x, self.w1, self.b1)``,
    ``F.conv2d(x, self.k)``: the parameter's name and the parameter, out x in for a Linear layer). None where a
    product with a parameter, or a functional layer on a view of one, comes first (``x @ self.W.T``,
    ``F.linear(x, self.W.T)``: layers that say no input shape); an elementwise op on a parameter (a learned scale)
    is passed by."""
    modules = dict(gm.named_modules())
    parameters = dict(gm.named_parameters())
    for node in gm.graph.nodes:
        if node.op == "call_module" and next(modules[node.target].parameters(recurse=False), None) is not None:
            return node.target, modules[node.target]
        weight = layer_weight(node)
        if name := parameter_read(weight, parameters):
            return name, parameters[name]
        if isinstance(weight, fx.Node) and viewed_parameter(weight, parameters):
            return None  # a view of a parameter (F.linear(x, self.W.T)): its shape need not be the layer's
        if op_key(node) in PRODUCTS and any(viewed_parameter(a, parameters) for a in node.all_input_nodes):
            return None
    return None


# where the input's last dimensions are not fixed by the first layer: the most of each tried (signals, images,
# volumes), a side at a time, when the input shape must be inferred
MAX_SIDES = {1: 4096, 2: MAX_SIDE, 3: 64}
INFER_SECONDS = 10.0  # ... for at most this long (a forward that fails slowly, e.g. in an unflatten, costs ms)
KINDS = {1: ("signals", "sample{} long", "length", "L"), 2: ("square images", "pixel{} a side", "size", "H, W"),
         3: ("cubic volumes", "voxel{} a side", "size", "D, H, W")}


def held_first_layer(model: nn.Module) -> tuple[str, nn.Module] | None:
    """The first module ``model`` holds (in the order they were set) that holds weights of its own."""
    return next(((n, m) for n, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None),
                None)


def untraced_input_shape(model: nn.Module) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """As :func:`layer_input_shape`, from the first layer with weights that ``model`` holds (its modules in the
    order they were set), for a forward that does not trace; checked by running the model on it."""
    first = held_first_layer(model)
    shape, notes, caveats = layer_input_shape(model, first)
    why = probe(model, None, shape)
    if why is not None:
        raise ModelError(f"the model does not run on inputs of shape {shape}, which its first layer '{first[0]}' "
                         f"suggests ({why}); pass input_shape= (the shape of one input)")
    return shape, notes, caveats


def layer_input_shape(model: nn.Module, first: tuple[str, nn.Module | nn.Parameter] | None
                      ) -> tuple[tuple[int, ...], tuple[str, ...], tuple[str, ...]]:
    """The input shape that the first layer with weights, ``first`` (its name and module, or the weight a functional
    layer reads: for a traced forward, :func:`first_layer`), gives when nothing else gives it, the assumption made
    to get it, and (where larger inputs fit the layers too, as when pooling or a stride rounds down) how that
    assumption may keep the exact methods from certifying anything. A Linear (or a first LayerNorm or BatchNorm1d)
    layer gives it; a convolution gives its channels, and the signal, square image or cube that fits the layers
    after it gives the rest (:func:`most_halved` of the sizes that fit)."""
    if first is None:
        loose = loose_parameters(model)
        raise ModelError(f"{loose}; or pass input_shape= (the shape of one input)" if loose else
                         "no layer of the model says the shape of its input (it has none with weights, or the first "
                         "op that reads a parameter is a product such as x @ self.W.T); pass input_shape= (the shape "
                         "of one input)")
    name, layer = first
    if isinstance(layer, nn.Parameter):  # the weight a functional layer reads: Linear (out x in) or a convolution
        if layer.dim() == 2:
            return (int(layer.shape[1]),), (), ()
        return _conv_input_shape(model, int(layer.shape[1]), layer.dim() - 2)
    if isinstance(layer, nn.Linear):
        return (layer.in_features,), (), ()
    if isinstance(layer, nn.LayerNorm):
        return tuple(int(s) for s in layer.normalized_shape), (), ()
    if isinstance(layer, nn.BatchNorm1d):
        return (layer.num_features,), (), ()
    if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_input_shape(model, layer.in_channels, len(layer.kernel_size))
    raise ModelError(f"the model's first layer with weights, '{name}' ({type(layer).__name__}), does not say the "
                     "shape of the model's input (a Linear or a convolution does); pass input_shape= (the shape of "
                     "one input)")


def most_halved(low: int, high: int) -> int:
    """The size from ``low`` to ``high`` that the largest power of two divides (the smallest of those that tie):
    where several sizes fit a model because a stride or a pooling rounds its output size, the size it was built
    for is the one that its stride-2 steps halve without dropping or padding a row (28 of 27 to 28 for a 3x3
    convolution of stride 2 and padding 1; 32 of 32 to 35 for two 2x2 poolings)."""
    return max(range(low, high + 1), key=lambda n: ((n & -n), -n))


def _conv_input_shape(model: nn.Module, c: int, dims: int) -> tuple[tuple[int, ...], tuple[str, ...],
                                                                    tuple[str, ...]]:
    """``(c, side, ...)`` of the side (``dims`` of them) that fits the model (:func:`most_halved` of the sides that
    fit, which are consecutive), and the notes; with one channel, ``(side, ...)`` where only that fits (a model
    that adds the channel axis itself, ``x.unsqueeze(1)``)."""
    kind, units, size, sides = KINDS[dims]
    most = MAX_SIDES[dims]

    def unit(n: int) -> str:
        return units.format("" if n == 1 else "s")

    def shape(side: int) -> tuple[int, ...]:
        return (*lead, *(side,) * dims)

    # plain forwards: a failing fx run is slow (seconds, the first time)
    tried = ((lead, side) for side in range(1, most + 1) for lead in ((c,), ()) if lead or c == 1)
    deadline = time.monotonic() + INFER_SECONDS
    for lead, side in tried:
        if time.monotonic() > deadline:
            raise ModelError(f"no {kind.removesuffix('s')} of {c} channel(s) up to {side - 1} {unit(side - 1)} fits "
                             f"the model, and trying more takes too long; pass input_shape=({c}, {sides})")
        if probe(model, None, shape(side)) is None:
            top = side  # the sizes that fit are consecutive: a larger input gives larger maps, until none fits
            while top < min(side + MAX_ALSO_FITS, most) and probe(model, None, shape(top + 1)) is None:
                top += 1
            if top == side + MAX_ALSO_FITS:  # no layer fixes the size (adaptive or global pooling)
                raise ModelError(f"the model takes {kind} of any {size} from {side} {unit(side)} up (no layer "
                                 f"fixes the {size}: adaptive or global pooling), so their {size} cannot be "
                                 f"inferred; pass input_shape=({', '.join([*map(str, lead), sides])}) or the inputs")
            if top == side:
                return shape(side), (f"input shape {shape(side)} inferred from the layer shapes, assuming {kind} "
                                     f"of the only {size} that fits; pass input_shape= (or inputs) if yours "
                                     "differ",), ()
            pick = most_halved(side, top)
            note = (f"input shape {shape(pick)} inferred from the layer shapes: {kind} of {side} to {top} "
                    f"{unit(top)} fit, and {pick} is the one that the most halvings divide (a stride or pooling "
                    f"of 2 then drops no row); pass input_shape= (or inputs) if yours differ")
            caveats = (f"your inputs are not the {shape(pick)} inferred for the model: {kind} of {side} to {top} "
                       f"{unit(top)} fit its layers (pass input_shape=)",)
            return shape(pick), (note,), caveats
    raise ModelError(f"no {kind.removesuffix('s')} of {c} channel(s) up to {most} {unit(most)} fits the model; pass "
                     f"input_shape=({c}, {sides})")


