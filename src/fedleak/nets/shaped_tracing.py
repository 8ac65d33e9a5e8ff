"""Tracing a ``forward`` that reads its input's shape, for inputs of one shape.

``torch.fx`` traces symbolically: ``x.size()`` is a node, so a forward that computes with a shape in Python refuses
to trace, although nothing in it depends on the values:

- PyTorch's older LeNet tutorial: ``x.view(-1, self.num_flat_features(x))``, which loops over ``x.size()[1:]``;
- ``if x.dim() == 3: x = x.unsqueeze(1)``, ``assert x.shape[1:] == (1, 28, 28)``, ``int(np.prod(x.shape[1:]))``.

:class:`ShapedTracer` traces such a forward for inputs of one given shape. Alongside the graph it runs a probe batch
of that shape (zeros, without autograd, buffers restored afterwards) through each op, and answers shape queries
of a value computed from the input from it: every dimension but the batch's (the first) is a number, the batch size
stays a node of the graph, so the graph takes any batch. The number of dimensions (``x.dim()``, ``x.ndim``) is a
number too. A forward that branches on the values (``if x.max() > 1``), the batch size or the dtype (which the
client's data, not the probe, would settle) still does not trace.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx, nn

from fedleak.nets.buffers import buffers_kept

PROBE_SAMPLES = 2  # the batch that runs alongside the trace: its size never reaches the graph


class SampleShape(tuple):
    """``x.size()`` of a traced batch: the batch size (a node of the graph) and then numbers."""


class _ShapedProxy(fx.Proxy):
    """A traced value that knows what it is on the probe batch (``value``) and whether it is computed from the
    input (``from_input``: its first dimension is then the batch's)."""

    value: Any = None  # class defaults: fx.Proxy answers any other attribute with a node
    from_input: bool = False

    def _known(self) -> torch.Tensor | None:
        value = self.value
        return value if isinstance(value, torch.Tensor) and value.dim() > 0 else None

    def _batch_size(self) -> Any:
        return self.tracer.batch_size(self)

    def size(self, dim: int | None = None) -> Any:
        t = self._known()
        if t is None:
            return self.tracer.create_proxy("call_method", "size", (self,) if dim is None else (self, dim), {})
        if dim is None:
            sizes = [int(s) for s in t.shape]
            return SampleShape([self._batch_size(), *sizes[1:]] if self.from_input else sizes)
        if self.from_input and dim % t.dim() == 0:
            return self._batch_size()
        return int(t.shape[dim])

    @property
    def shape(self) -> Any:
        return self.size()

    def dim(self) -> Any:
        t = self._known()
        return t.dim() if t is not None else self.tracer.create_proxy("call_method", "dim", (self,), {})

    def ndimension(self) -> Any:
        return self.dim()

    @property
    def ndim(self) -> Any:
        return self.dim()


class ShapedTracer(fx.Tracer):
    """``torch.fx``'s tracer, answering shape queries from a probe batch of ``(PROBE_SAMPLES, *shape)``."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self._probe = torch.zeros(PROBE_SAMPLES, *shape, dtype=dtype, device=device)
        self._values: dict[fx.Node, Any] = {}
        self._from_input: set[fx.Node] = set()
        self._batch_sizes: dict[fx.Node, fx.Node] = {}
        self._evaluating = False

    # -- values on the probe batch ------------------------------------------------------------------------------
    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ShapedProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     name: str | None = None, type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, _ShapedProxy):
            node = proxy.node
            sources: list[fx.Node] = []
            fx.node.map_arg((node.args, node.kwargs), sources.append)
            first_input = kind == "placeholder" and not self._from_input  # the batch: forward's first input
            if first_input or any(n in self._from_input for n in sources):
                self._from_input.add(node)
            self._values[node] = self._probe if first_input else self._evaluate(node)
            proxy.value = self._values[node]
            proxy.from_input = node in self._from_input
        return proxy

    def _evaluate(self, node: fx.Node) -> Any:
        """``node``'s value on the probe batch; None where it cannot be computed (an input traced at its default,
        an op that fails on zeros)."""
        missing = object()
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: self._values.get(n, missing))
        if any(a is missing for a in (*args, *kwargs.values())) or node.op == "placeholder":
            return None
        self._evaluating = True
        try:
            with torch.no_grad():
                if node.op == "get_attr":
                    return _attribute(self.root, str(node.target))
                if node.op == "call_function":
                    return node.target(*args, **kwargs)
                if node.op == "call_method":
                    return getattr(args[0], node.target)(*args[1:], **kwargs)
                if node.op == "call_module":
                    return self.root.get_submodule(str(node.target))(*args, **kwargs)
        except Exception:  # an op the zeros do not suit: its shape is then read as a node, as fx does
            return None
        finally:
            self._evaluating = False
        return None

    def batch_size(self, proxy: _ShapedProxy) -> fx.Proxy:
        """The node of ``proxy``'s batch size (one per value, made when first asked for)."""
        node = self._batch_sizes.get(proxy.node)
        if node is None:
            node = self.create_proxy("call_method", "size", (proxy, 0), {}).node
            self._batch_sizes[proxy.node] = node
        return self._proxy_of(node)

    def _proxy_of(self, node: fx.Node) -> _ShapedProxy:
        proxy = _ShapedProxy(node, self)
        proxy.value = self._values.get(node)
        return proxy

    # -- while a value is computed, modules run as they are ------------------------------------------------------
    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, fx.Proxy]) -> Any:
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        return forward(*args, **kwargs) if self._evaluating else super().call_module(m, forward, args, kwargs)

    def unused_batch_sizes(self) -> list[fx.Node]:
        """The batch-size nodes made for a shape query whose batch size nothing read (``x.size()[1:]``)."""
        return [n for n in self._batch_sizes.values() if not n.users]


def _attribute(root: nn.Module, target: str) -> Any:
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


def shaped_trace(model: nn.Module, shape: tuple[int, ...], concrete_args: dict[str, Any] | None = None
                 ) -> fx.GraphModule:
    """``model``'s forward traced for inputs of ``shape`` (see the module's docstring); raises what ``torch.fx``
    raises where it still does not trace. ``model``'s buffers are as they were afterwards."""
    p = next(model.parameters(), None)
    tracer = ShapedTracer(shape, p.dtype if p is not None else torch.float32,
                          p.device if p is not None else torch.device("cpu"))
    with buffers_kept(model):
        graph = tracer.trace(model, concrete_args=concrete_args)
    for node in tracer.unused_batch_sizes():
        graph.erase_node(node)
    # a graph of torch.fx's own, whose code holds the shapes as numbers: a GraphModule rebuilt from it elsewhere
    # (unpickled in an audit worker) is traced again by torch.fx's tracer, not by one that needs a probe
    plain = fx.Graph()
    plain.output(plain.graph_copy(graph, {}))
    return fx.GraphModule(tracer.root, plain, type(model).__name__)
