"""normrnn: normalized and quantized recurrent networks, selectable by name.

Public surface: ``NORMS``, ``QUANTIZERS``, ``CELLS``, ``MODELS`` (registries: dicts from name to
implementation) and :func:`build_model`. They load on first use: importing the package imports
no torch, so the jobs that table and plot results, and the worker's client, start fast.
"""

import importlib

__version__ = "0.1.0"

_WHERE = {
    "CELLS": "methods.cells",
    "GRULayer": "methods.cells",
    "LSTMLayer": "methods.cells",
    "RecurrentLayer": "methods.cells",
    "StackedRNN": "methods.cells",
    "MODELS": "methods.models",
    "build_model": "methods.models",
    "model_bits": "methods.models",
    "recurrent_layers": "methods.models",
    "NORMS": "methods.norms",
    "CellNorm": "methods.norms",
    "tanh_variance": "methods.norms",
    "QUANTIZERS": "methods.quantizers",
    "quantize_blocks": "methods.quantizers",
    "Registry": "registry",
    "UnknownNameError": "registry",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
