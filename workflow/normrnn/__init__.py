"""normrnn: normalized and quantized recurrent networks, selectable by name.

Public surface: ``NORMS``, ``QUANTIZERS``, ``CELLS``, ``MODELS`` (registries: dicts from name to
implementation) and :func:`build_model`.
"""

from .cells import CELLS, GRULayer, LSTMLayer, RecurrentLayer, StackedRNN
from .models import MODELS, build_model, model_bits, recurrent_layers
from .norms import NORMS, CellNorm, tanh_variance
from .quantizers import QUANTIZERS, quantize_blocks
from .registry import Registry, UnknownNameError

__version__ = "0.1.0"

__all__ = [
    "CELLS",
    "MODELS",
    "NORMS",
    "QUANTIZERS",
    "CellNorm",
    "GRULayer",
    "LSTMLayer",
    "RecurrentLayer",
    "Registry",
    "StackedRNN",
    "UnknownNameError",
    "build_model",
    "model_bits",
    "quantize_blocks",
    "recurrent_layers",
    "tanh_variance",
]
