"""normrnn: normalized and quantized recurrent networks, selectable by name.

Public surface: ``NORMS``, ``QUANTIZERS``, ``CELLS``, ``MODELS`` (registries: dicts from name to
implementation) and :func:`build_model`. They load on first use: importing the package imports
no torch, so the jobs that table and plot results, and the worker's client, start fast.
"""

import importlib

__version__ = "0.1.0"

_WHERE = {
    "CELLS": "cells",
    "GRULayer": "cells",
    "LSTMLayer": "cells",
    "RecurrentLayer": "cells",
    "StackedRNN": "cells",
    "MODELS": "models",
    "build_model": "models",
    "model_bits": "models",
    "recurrent_layers": "models",
    "NORMS": "norms",
    "CellNorm": "norms",
    "tanh_variance": "norms",
    "QUANTIZERS": "quantizers",
    "quantize_blocks": "quantizers",
    "Registry": "registry",
    "UnknownNameError": "registry",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
