"""One representation of the user's network, read from the ``nn.Module`` as written.

:func:`as_network` traces any ``nn.Module`` (or ``nn.Sequential``) with ``torch.fx`` into a
:class:`Network`: typed layers (:mod:`fedleak.nets.layers`), grouped into conv blocks and a fully connected
ReLU head. Exclusivity analysis, the exact attack, fishing and exclusivity reduction all read it.
"""

from fedleak.nets import converters as _converters  # noqa: F401  (registers the built-in converters)
from fedleak.nets.blocks import ConvBlock
from fedleak.nets.forward import Trace, forward_trace, readable_losses
from fedleak.nets.frontend import as_network, input_shape_of
from fedleak.nets.head import ReluMLP
from fedleak.nets.layers import BatchNorm, Conv, Dense, Dropout, Layer, Pool, Relu, Reshape
from fedleak.nets.network import NO_HIDDEN_RELU, Network, Step
from fedleak.nets.ops import CONVERTERS, Op, converts

__all__ = ["NO_HIDDEN_RELU", "as_network", "input_shape_of", "Network", "Step", "ConvBlock", "ReluMLP", "Trace",
           "forward_trace", "readable_losses", "Layer", "Dense", "Conv", "BatchNorm", "Pool", "Relu", "Reshape",
           "Dropout", "Op", "CONVERTERS", "converts"]
