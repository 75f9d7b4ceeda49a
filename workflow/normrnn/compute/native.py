"""The batch norms' steps as compiled loops (``csrc/batchnorm_step.cpp``), for the sequence
path on the CPU (on a GPU, the same steps as Triton kernels: ``triton_steps.py``, with the
same functions; ``norms.compiled_steps`` picks one by device).

One step of L1 or L∞ batch norm in torch's ops is 7 ops forward and 9 (L1) to 18 (L∞)
backward, each a pass over the step and a few µs of dispatch; at a recurrent step's size
(64 × 400) those, not the arithmetic, set the speed. A compiled step is one call each way,
four or five passes over the step. Its math is that of ``norms.BatchNormTerm`` and its
subclasses (per-step batch statistics, x̂ = (x - mean) / den); ``tests/unit/test_native.py``
holds it to their definitions and to autograd.

The library is built on first use with the C++ compiler (``$CXX``, else ``c++``), a few
seconds, into ``$NORMRNN_NATIVE_CACHE`` (else ``~/.cache/normrnn``) under a name hashed from
the source, the flags and the machine, written atomically so that parallel jobs may build it
at once, and loaded with ctypes. On x86-64 the loops are compiled for AVX2 and for the
baseline, the CPU picking one at load time, so one file serves every node of a cluster.
Without a compiler, or with ``NORMRNN_NATIVE=0``, :func:`library` is None (with a warning
saying why, once) and the batch norms run torch's ops: the same numbers to rounding, slower.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import NamedTuple

import torch

from ..methods.norms.base import KERNELS

CSRC = Path(__file__).with_name("csrc")
SOURCES = (CSRC / "batchnorm_step.cpp", CSRC / "recurrence.cpp")  # with CSRC's headers
# -fno-trapping-math: the loops' clamps (exp's range) vectorize; no code here reads FP traps
FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fno-trapping-math")


def _enum(path: Path, name: str) -> dict[str, int]:
    """The values of the C++ ``enum name { kA = 0, ... }`` in ``path``: the one source of the
    kind numbers the loops and kernels read."""
    body = re.search(rf"enum {name} {{([^}}]*)}}", path.read_text()).group(1)
    return {k.strip(): int(v) for k, v in (item.split("=") for item in body.split(","))}


_ESTIMATORS = _enum(CSRC / "batchnorm.h", "Kind")
KINDS = {"l2": _ESTIMATORS["kL2"], "l1": _ESTIMATORS["kL1"], "linf": _ESTIMATORS["kLinf"]}
_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_CALLS: dict = {}  # (library, dtype): its forward and backward, set up by library()
_LOOPS: dict = {}  # (library, dtype, cell): the recurrence's forward and backward


def compiler() -> str | None:
    """The C++ compiler's path (``$CXX``, else ``c++``), or None where there is none."""
    return shutil.which(os.environ.get("CXX", "c++"))


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled steps, built where needed; None where they are off or cannot be built."""
    if os.environ.get("NORMRNN_NATIVE", "1") == "0":
        return None
    try:
        lib = ctypes.CDLL(str(build()))
    except (OSError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"normrnn: the batch norms run on torch's ops, not compiled steps: {err}",
            stacklevel=2,
        )
        return None
    ptr, i64 = ctypes.c_void_p, ctypes.c_int64
    for dtype, suffix in _SUFFIX.items():
        fwd, bwd = getattr(lib, f"bn_forward_{suffix}"), getattr(lib, f"bn_backward_{suffix}")
        fwd.argtypes = [ptr] * 5 + [i64] * 3 + [ctypes.c_int, ctypes.c_double, ctypes.c_double]
        bwd.argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int, ctypes.c_double, ptr]
        fwd.restype = bwd.restype = None
        _CALLS[lib, dtype] = fwd, bwd
        for cell in ("lstm", "gru"):
            loops = (
                getattr(lib, f"{cell}_forward_{suffix}"),
                getattr(lib, f"{cell}_backward_{suffix}"),
            )
            for fn in loops:
                fn.argtypes, fn.restype = [ctypes.POINTER(_Loop)], None
            _LOOPS[lib, dtype, cell] = loops
    return lib


def build(cache: Path | None = None) -> Path:
    """The shared library for this source, flags and machine: compiled into ``cache`` unless
    it is there. Raises ``OSError`` without a compiler, ``CalledProcessError`` (with the
    compiler's message) when compiling fails."""
    cxx = compiler()
    if cxx is None:
        raise OSError(f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH")
    cache = Path(cache or os.environ.get("NORMRNN_NATIVE_CACHE") or _default_cache())
    text = b"".join(p.read_bytes() for p in (*SOURCES, *sorted(CSRC.glob("*.h"))))
    key = hashlib.sha256(
        text + repr((cxx, FLAGS, platform.machine(), platform.system())).encode()
    ).hexdigest()[:16]
    target = cache / f"normrnn-{key}.so"
    if target.exists():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        result = subprocess.run(
            [cxx, *FLAGS, f"-I{CSRC}", *map(str, SOURCES), "-o", tmp],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise subprocess.CalledProcessError(
                result.returncode, result.args, output=result.stdout, stderr=result.stderr
            )
        os.replace(tmp, target)  # atomic: a parallel build leaves the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "normrnn"


# The most elements a call takes, per estimator. The loops run on one thread: above this,
# torch's own L2 kernel, on all threads, is faster (shared statistics normalize all T·B rows
# of the input term in one step: 2 threads took half the time at 50176 x 400). L1 and L∞
# have no kernel in torch; their several ops on all threads were slower at every size.
LIMIT = {"l2": 1 << 19}


def applies_rows(g: torch.Tensor) -> bool:
    """The row norms have no compiled step here (the compiled loop has them): torch's ops."""
    return False


def applies(a: torch.Tensor, kind: str) -> bool:
    """Whether the compiled step of ``kind`` takes ``a``: a contiguous float32/float64 CPU
    tensor within ``LIMIT``, and the library is there."""
    return (
        a.device.type == "cpu"
        and a.dtype in _SUFFIX
        and a.is_contiguous()
        and a.numel() <= LIMIT.get(kind, a.numel())
        and library() is not None
    )


def step(kind: str, a: torch.Tensor, eps: float, c: float) -> tuple:
    """Normalizes ``a`` (B, F), or a stack (C, B, F) of steps, each over its batch, with the
    estimator ``kind`` (``KINDS``) and its constant ``c``. Returns x̂ (``a``'s shape) and the
    mean, statistic and denominator (C, F) of each step."""
    batch, features = a.shape[-2:]
    steps = a.numel() // (batch * features)
    xhat = torch.empty_like(a)
    stats = a.new_empty(3, steps, features)
    ptr, size = stats.data_ptr(), steps * features * a.element_size()
    _CALLS[library(), a.dtype][0](
        a.data_ptr(), xhat.data_ptr(), ptr, ptr + size, ptr + 2 * size,
        steps, batch, features, KINDS[kind], eps, c,
    )  # fmt: skip
    return xhat, *stats.unbind(0)


def step_backward(kind: str, gx: torch.Tensor, xhat: torch.Tensor, den, c: float):
    """dL/da of :func:`step` from ``gx`` = dL/dx̂ (any strides), its x̂ and denominator."""
    gx = gx.contiguous()
    batch, features = gx.shape[-2:]
    out = torch.empty_like(gx)
    work = gx.new_empty(5, features)
    _CALLS[library(), gx.dtype][1](
        gx.data_ptr(), xhat.data_ptr(), den.data_ptr(), out.data_ptr(),
        gx.numel() // (batch * features), batch, features, KINDS[kind], c, work.data_ptr(),
    )  # fmt: skip
    return out


# --------------------------------------------------------------------------- the recurrences
# The sequence path's LSTM and GRU recurrences as one call each way (csrc/recurrence.cpp),
# their matrix products through the BLAS that torch links, called by address (the Fortran
# gemm).
_TERMS = _enum(CSRC / "recurrence.cpp", "TermKind")
TERM_KINDS = {
    **KINDS,
    "ln": _TERMS["kLayer"],
    "rms": _TERMS["kRms"],
    "population": _TERMS["kPopulation"],
}
_GEMM = {torch.float32: "sgemm_", torch.float64: "dgemm_"}


class _Term(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("groups", ctypes.c_int32),
        ("k", ctypes.c_int64),
        ("eps", ctypes.c_double),
        ("c", ctypes.c_double),
        *((name, ctypes.c_void_p) for name in ("weight", "bias", "xhat", "mean", "stat", "den")),
    ]


class _Loop(ctypes.Structure):
    _fields_ = [
        *((name, ctypes.c_int64) for name in ("steps", "batch", "size")),
        *((name, ctypes.c_void_p) for name in ("gemm", "x", "w", "hs", "cs", "act", "tcs", "work")),
        *((name, ctypes.c_double) for name in ("candidate_scale", "cell_scale", "output_scale")),
        ("hidden", _Term),
        ("cell", _Term),
        *(
            (name, ctypes.c_void_p)
            for name in ("d_y", "d_hT", "d_cT", "d_pre", "d_a", "d_cn", "d_h0", "d_c0")
        ),
        ("b_hn", ctypes.c_void_p),
        ("d_hid", ctypes.c_void_p),
    ]


@functools.cache
def gemm(dtype: torch.dtype) -> int | None:
    """The address of the Fortran gemm (``sgemm_``/``dgemm_``) of the BLAS that torch links,
    checked on a small product against ``torch.mm``; None where there is none (a build of
    torch without an exported BLAS) or it does not agree."""
    name = _GEMM.get(dtype)
    lib_dir = Path(torch.__file__).parent / "lib"
    for path in (*sorted(lib_dir.glob("libtorch_cpu.*")), None):
        try:
            fn = getattr(ctypes.CDLL(None if path is None else str(path)), name)
        except (OSError, AttributeError, TypeError):
            continue
        if _gemm_agrees(fn, dtype):
            return ctypes.cast(fn, ctypes.c_void_p).value
    warnings.warn(
        f"normrnn: the recurrences step in Python, not compiled: torch exports no BLAS "
        f"{name} that computes torch.mm's product",
        stacklevel=2,
    )
    return None


def _gemm_agrees(fn, dtype) -> bool:
    """C = A B for a 3x5 A and 5x4 B (column-major, as the loop calls it) equals torch.mm."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(5, 3, generator=gen, dtype=dtype)
    b = torch.randn(4, 5, generator=gen, dtype=dtype)
    c = torch.zeros(4, 3, dtype=dtype)  # column-major (3, 4)
    i32 = ctypes.c_int32
    scalar = ctypes.c_float if dtype == torch.float32 else ctypes.c_double
    m, n, k = i32(3), i32(4), i32(5)
    one, zero = scalar(1), scalar(0)
    p = ctypes.c_void_p
    fn.argtypes, fn.restype = None, None
    fn(
        b"N", b"N", ctypes.byref(m), ctypes.byref(n), ctypes.byref(k), ctypes.byref(one),
        p(a.data_ptr()), ctypes.byref(m), p(b.data_ptr()), ctypes.byref(k), ctypes.byref(zero),
        p(c.data_ptr()), ctypes.byref(m),
    )  # fmt: skip
    return torch.allclose(c, b @ a, rtol=1e-5, atol=1e-5)


def loop_applies(x: torch.Tensor) -> bool:
    """Whether the compiled recurrences run on ``x``'s device and dtype: a CPU
    float32/float64 tensor, the library there and a BLAS gemm found."""
    return (
        x.device.type == "cpu"
        and x.dtype in _GEMM
        and library() is not None
        and gemm(x.dtype) is not None
    )


def loop(kind: str, backward: bool, dims: tuple, scales: tuple, hidden, cell, **arrays) -> None:
    """One call of the ``kind`` ("lstm", "gru") recurrence (forward, or ``backward``) over
    ``dims`` (steps, batch, size): ``scales`` (candidate, cell, output); ``hidden`` and
    ``cell`` None or a :class:`LoopTerm`; ``arrays`` the loop's other pointers by name
    (``_Loop``), all contiguous, of one dtype, as ``csrc/recurrence.cpp`` lays them out."""
    dtype = arrays["w"].dtype
    call = _Loop(*dims, gemm(dtype))
    call.candidate_scale, call.cell_scale, call.output_scale = scales
    for name, tensor in arrays.items():
        setattr(call, name, None if tensor is None else tensor.data_ptr())
    call.hidden, call.cell = _term(hidden), _term(cell)
    _LOOPS[library(), dtype, kind][backward](ctypes.byref(call))


class LoopTerm(NamedTuple):
    """A term's part in the loop: its ``spec`` (kind, groups, k, eps, c; see
    ``TermNorm.loop``), its gains and shift, and the arrays the loop writes or reads (any
    may be None where the kind has none)."""

    spec: tuple
    weight: torch.Tensor
    bias: torch.Tensor | None
    xhat: torch.Tensor
    mean: torch.Tensor | None
    stat: torch.Tensor | None
    den: torch.Tensor


def _term(term: LoopTerm | None) -> _Term:
    if term is None:
        return _Term(kind=_TERMS["kNone"])
    kind, groups, k, eps, c = term.spec
    pointers = (None if t is None else t.data_ptr() for t in term[1:])
    return _Term(TERM_KINDS[kind], groups, k, eps, c, *pointers)


KERNELS["cpu"] = sys.modules[__name__]  # the terms' compiled steps on the CPU
