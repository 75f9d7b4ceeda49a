"""The batch norms' and RMSNorms' steps as Triton kernels, for the sequence path on a GPU.

On a GPU one step of L1 or L∞ batch norm in torch's ops is 7 kernels forward and 9 (L1) to
18 (L∞) backward, each a few µs even inside a CUDA graph; at H=1000 those steps, run 100
times per sequence, took longer than the recurrent matrix products. Here a step is one kernel
each way: a program takes a block of columns (features) of one step and sweeps its batch
rows. The math, including the corrected mean and the sharing of ties, is that of the compiled
CPU loops (``csrc/batchnorm_step.cpp``), with the same functions as ``native.py``
(``norms.compiled_steps`` picks this module for CUDA tensors); ``tests/unit/test_native.py`` holds
both to the estimators' float64 definitions and to autograd.

RMSNorm and pRMSNorm (``norms.rms_step``) are a row kernel each way likewise, a program per
row of a gate block: in torch's ops they were 5 kernels forward and 5 to 6 backward.

float32, bfloat16 and float16 (the sums in float32); other dtypes, a GPU without Triton, and
``NORMRNN_NATIVE=0`` take torch's ops. The kernels are compiled by Triton on their first
call (a few seconds per estimator and dtype, cached by Triton on disk); a forward step also
compiles its backward, so that neither compiles while a CUDA graph is being captured.
"""

from __future__ import annotations

import functools
import os
import sys
import warnings

import torch

from ..methods.norms.base import KERNELS
from .native import KINDS  # the estimators, numbered as in the compiled CPU loops

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: torch's ops (or the compiled CPU loops)
    triton = None

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_F = 32  # columns per program; the rows are swept BLOCK_B at a time
MAX_BLOCK_B = 64
MAX_ROW = 1 << 14  # the longest row the RMS kernels take in one block


@functools.cache
def available() -> bool:
    """Whether Triton is importable and the steps are not switched off."""
    return triton is not None and os.environ.get("NORMRNN_NATIVE", "1") != "0"


_warm: set = set()  # (kind, dtype, device): backward compiled


@functools.cache
def works(device: torch.device) -> bool:
    """Whether the kernels compile and run on ``device`` (once per device: Triton may not
    support an older GPU). If not, a warning names the error, and torch's ops take over."""
    try:
        probe = torch.ones(2, 4, device=device)
        step("l1", probe, 1e-5, 1.0)  # and its backward
        rms_step(probe, 4, 1e-5)
    except Exception as err:  # noqa: BLE001 (whatever Triton or the driver raises)
        warnings.warn(
            f"normrnn: the GPU steps run on torch's ops, not Triton kernels: {err}", stacklevel=2
        )
        return False
    return True


def applies(a: torch.Tensor, kind: str) -> bool:
    """Whether a kernel of ``kind`` takes ``a``: a contiguous CUDA tensor of a dtype in
    ``DTYPES``, where Triton is there and its kernels run on the tensor's device."""
    return a.is_cuda and a.dtype in DTYPES and a.is_contiguous() and available() and works(a.device)


def applies_rows(g: torch.Tensor) -> bool:
    """Whether the RMS kernels take ``g``: as :func:`applies`, rows up to ``MAX_ROW``."""
    return applies(g, "rms") and 0 < g.shape[-1] <= MAX_ROW


def rms_step(g: torch.Tensor, k: int, eps: float) -> tuple:
    """x̂ = g / sqrt(mean(g[..., :k]²) + eps) over the last dim, and 1/rms (``g``'s shape
    with a last dim of 1), as ``norms.rms_step``."""
    n = g.shape[-1]
    xhat = torch.empty_like(g)
    rstd = g.new_empty(*g.shape[:-1], 1)
    block, warps = _row_block(n)
    _rms_forward[(g.numel() // n,)](g, xhat, rstd, n, k, eps, BLOCK=block, num_warps=warps)
    _compile_backward("rms", g, lambda: rms_step_backward(xhat, xhat, rstd, k))
    return xhat, rstd


def _compile_backward(kind: str, a: torch.Tensor, backward) -> None:
    """Runs ``backward`` once per estimator, dtype and device, outside a graph's capture: it
    compiles then, not while the backward's graph is being captured."""
    key = (kind, a.dtype, a.device)
    if key not in _warm and not (a.is_cuda and torch.cuda.is_current_stream_capturing()):
        backward()
        _warm.add(key)


def rms_step_backward(gx: torch.Tensor, xhat: torch.Tensor, rstd, k: int) -> torch.Tensor:
    """The gradient of :func:`rms_step`: (gx - 1[j<k] x̂ Σ(gx x̂) / k) / rms."""
    gx = gx.reshape(xhat.shape).contiguous()
    n = gx.shape[-1]
    out = torch.empty_like(gx)
    block, warps = _row_block(n)
    _rms_backward[(gx.numel() // n,)](gx, xhat, rstd, out, n, k, BLOCK=block, num_warps=warps)
    return out


def _row_block(n: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n)
    return block, min(16, max(1, block // 256))


def _grid(a: torch.Tensor) -> tuple:
    batch, features = a.shape[-2:]
    steps = a.numel() // (batch * features)
    block_b = min(MAX_BLOCK_B, triton.next_power_of_2(batch))
    return (steps, triton.cdiv(features, BLOCK_F)), steps, batch, features, block_b


def step(kind: str, a: torch.Tensor, eps: float, c: float) -> tuple:
    """Normalizes ``a`` (B, F), or a stack (C, B, F) of steps, each over its batch: x̂ and
    the mean, statistic and denominator (C, F) of each step, as ``native.step``."""
    grid, steps, batch, features, block_b = _grid(a)
    xhat = torch.empty_like(a)
    mean, stat, den = a.new_empty(3, steps, features).unbind(0)
    _forward[grid](
        a, xhat, mean, stat, den, batch, features, eps, c,
        KIND=KINDS[kind], BLOCK_B=block_b, BLOCK_F=BLOCK_F,
    )  # fmt: skip
    _compile_backward(kind, a, lambda: step_backward(kind, xhat, xhat, den, c))
    return xhat, mean, stat, den


def step_backward(kind: str, gx: torch.Tensor, xhat: torch.Tensor, den, c: float):
    """dL/da of :func:`step` from ``gx`` = dL/dx̂ (any strides), its x̂ and denominator."""
    gx = gx.contiguous()
    grid, steps, batch, features, block_b = _grid(gx)
    out = torch.empty_like(gx)
    _backward[grid](
        gx, xhat, den, out, batch, features, c,
        KIND=KINDS[kind], BLOCK_B=block_b, BLOCK_F=BLOCK_F,
    )  # fmt: skip
    return out


if triton is not None:

    @triton.jit
    def _sign(v):
        return tl.where(v > 0, 1.0, 0.0) - tl.where(v < 0, 1.0, 0.0)

    @triton.jit
    def _tile(b0, batch, features, base, cols, live, BLOCK_B: tl.constexpr):
        """The offsets and mask of rows b0 to b0 + BLOCK_B of a step's block of columns."""
        rows = b0 + tl.arange(0, BLOCK_B)
        mask = (rows < batch)[:, None] & live[None, :]
        return base + rows[:, None] * features + cols[None, :], mask

    @triton.jit(do_not_specialize=["batch", "features", "eps", "c"])
    def _forward(a, xhat, mean, stat, den, batch, features, eps, c, KIND: tl.constexpr,
                 BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr):  # fmt: skip
        """One step's block of columns: mean (corrected by the mean of x - mean, so that a
        column constant over the batch gives x̂ = 0), the estimator, x̂."""
        s = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        live = cols < features
        base = s * batch * features
        total = tl.zeros([BLOCK_F], tl.float32)
        for b0 in tl.range(0, batch, BLOCK_B):
            where, m = _tile(b0, batch, features, base, cols, live, BLOCK_B)
            x = tl.load(a + where, mask=m, other=0.0)
            total += tl.sum(x.to(tl.float32), axis=0)
        mu = total / batch
        fix = tl.zeros([BLOCK_F], tl.float32)
        for b0 in tl.range(0, batch, BLOCK_B):
            where, m = _tile(b0, batch, features, base, cols, live, BLOCK_B)
            x = tl.load(a + where, mask=m, other=0.0)
            fix += tl.sum(tl.where(m, x.to(tl.float32) - mu[None, :], 0.0), axis=0)
        mu += fix / batch
        acc = tl.zeros([BLOCK_F], tl.float32)
        for b0 in tl.range(0, batch, BLOCK_B):
            where, m = _tile(b0, batch, features, base, cols, live, BLOCK_B)
            x = tl.load(a + where, mask=m, other=0.0)
            v = tl.where(m, x.to(tl.float32) - mu[None, :], 0.0)
            if KIND == 0:
                acc += tl.sum(v * v, axis=0)
            elif KIND == 1:
                acc += tl.sum(tl.abs(v), axis=0)
            else:
                acc = tl.maximum(acc, tl.max(tl.abs(v), axis=0))
        if KIND == 0:
            st = acc / batch
            d = tl.sqrt(st + eps)
        elif KIND == 1:
            st = acc / batch * c
            d = st + eps
        else:
            st = acc * c
            d = st + eps
        out = s * features + cols
        tl.store(mean + out, mu.to(mean.dtype.element_ty), mask=live)
        tl.store(stat + out, st.to(stat.dtype.element_ty), mask=live)
        tl.store(den + out, d.to(den.dtype.element_ty), mask=live)
        for b0 in tl.range(0, batch, BLOCK_B):
            where, m = _tile(b0, batch, features, base, cols, live, BLOCK_B)
            x = tl.load(a + where, mask=m, other=0.0)
            y = (x.to(tl.float32) - mu[None, :]) / d[None, :]
            tl.store(xhat + where, y.to(xhat.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["batch", "features", "c"])
    def _backward(g, xhat, den, dx, batch, features, c, KIND: tl.constexpr,
                  BLOCK_B: tl.constexpr, BLOCK_F: tl.constexpr):  # fmt: skip
        """dL/dx of a step's block of columns from g = dL/dx̂ (sums over the batch):
        L2 (g - ḡ - x̂ mean(g x̂)) / den; L1 and L∞ (g - ḡ) / den - k (v - mean v), with
        k = Σ g x̂ / den · c / count, v = sign x̂ and count = batch (L1), or v = sign x̂ on the
        rows at the column's maximum |x̂|, else 0, and count = those rows (L∞)."""
        s = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
        live = cols < features
        base = s * batch * features
        sg = tl.zeros([BLOCK_F], tl.float32)
        sgx = tl.zeros([BLOCK_F], tl.float32)
        sv = tl.zeros([BLOCK_F], tl.float32)
        top = tl.zeros([BLOCK_F], tl.float32)
        for b0 in tl.range(0, batch, BLOCK_B):
            where, m = _tile(b0, batch, features, base, cols, live, BLOCK_B)
            gv = tl.load(g + where, mask=m, other=0.0).to(tl.float32)
            xv = tl.load(xhat + where, mask=m, other=0.0).to(tl.float32)
            sg += tl.sum(gv, axis=0)
            sgx += tl.sum(gv * xv, axis=0)
            if KIND == 1:
                sv += tl.sum(_sign(xv), axis=0)
            elif KIND == 2:
                top = tl.maximum(top, tl.max(tl.abs(xv), axis=0))
        ties = tl.zeros([BLOCK_F], tl.float32)
        if KIND == 2:
            for b0 in tl.range(0, batch, BLOCK_B):
                where, m = _tile(b0, batch, features, base, cols, live, BLOCK_B)
                xv = tl.load(xhat + where, mask=m, other=0.0).to(tl.float32)
                hit = tl.where(m & (tl.abs(xv) == top[None, :]), 1.0, 0.0)
                ties += tl.sum(hit, axis=0)
                sv += tl.sum(hit * _sign(xv), axis=0)
        d = tl.load(den + s * features + cols, mask=live, other=1.0).to(tl.float32)
        sg = sg / batch
        if KIND == 0:
            k = sgx / batch
        elif KIND == 1:
            k = sgx / d * c / batch
        else:
            k = sgx / d * c / tl.maximum(ties, 1.0)
        sv = sv / batch
        for b0 in tl.range(0, batch, BLOCK_B):
            where, m = _tile(b0, batch, features, base, cols, live, BLOCK_B)
            gv = tl.load(g + where, mask=m, other=0.0).to(tl.float32)
            xv = tl.load(xhat + where, mask=m, other=0.0).to(tl.float32)
            if KIND == 0:
                y = (gv - sg[None, :] - xv * k[None, :]) / d[None, :]
            else:
                v = _sign(xv)
                if KIND == 2:
                    v = tl.where(tl.abs(xv) == top[None, :], v, 0.0)
                y = (gv - sg[None, :]) / d[None, :] - k[None, :] * (v - sv[None, :])
            tl.store(dx + where, y.to(dx.dtype.element_ty), mask=m)

    @triton.jit(do_not_specialize=["n", "k", "eps"])
    def _rms_forward(g, xhat, rstd, n, k, eps, BLOCK: tl.constexpr):
        """One row: 1/rms over its first k values, x̂ = row / rms."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        x = tl.load(g + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
        part = tl.where(cols < k, x, 0.0)
        r = 1.0 / tl.sqrt(tl.sum(part * part, axis=0) / k + eps)
        tl.store(rstd + row, r.to(rstd.dtype.element_ty))
        tl.store(xhat + row * n + cols, (x * r).to(xhat.dtype.element_ty), mask=cols < n)

    @triton.jit(do_not_specialize=["n", "k"])
    def _rms_backward(g, xhat, rstd, dx, n, k, BLOCK: tl.constexpr):
        """One row: dx = g / rms - 1[j<k] x̂ Σ(g x̂) / (k rms)."""
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        gv = tl.load(g + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
        xv = tl.load(xhat + row * n + cols, mask=cols < n, other=0.0).to(tl.float32)
        r = tl.load(rstd + row).to(tl.float32)
        dot = tl.sum(gv * xv, axis=0) / k
        y = gv * r - tl.where(cols < k, xv * (dot * r), 0.0)
        tl.store(dx + row * n + cols, y.to(dx.dtype.element_ty), mask=cols < n)


KERNELS["cuda"] = sys.modules[__name__]  # the terms' compiled steps on a GPU
