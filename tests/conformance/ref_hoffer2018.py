"""Float64 reference transcription of Hoffer et al. 2018, "Norm matters" (github
eladhoffer/norm_matters, commit 3b103aa): models/lp_norm.py and models/bwn.py.

The BN variants are written for x of shape (N, C), i.e. their 4-D code with spatial size
1 x 1 (feeding a 2-D tensor to their modules would broadcast (x - mean.view(1, C, 1, 1)) to
(1, C, N, C)).  `weight` is their `scale` Parameter, `bias` their `mean` Parameter (both left
uninitialised by the modules).  state = dict(running_mean, running_var[, meanTOPK]), (C,)
each, all starting at zeros.  Their running update is running <- momentum * running +
(1 - momentum) * batch (momentum weights the *old* value), and running_var stores the
*scale* (an inverse spread), which eval multiplies by: out = (x - running_mean) * running_var.
"""

from __future__ import annotations

import math

import torch

C_BETA = 0.75  # GhostTopkBatchNorm2d: hard-coded, the constructor's beta is ignored (181, 194)


def _topk_const(n):
    """lp_norm.py:134-135 / 201-202: 0.5 * (1 + sqrt(pi * ln 4)) / sqrt(2 ln n), n = N*H*W."""
    return 0.5 * (1 + math.sqrt(math.pi * math.log(4))) / math.sqrt(2 * math.log(n))


def _finish(x, mean, scale, weight, bias):
    return (x - mean) * scale * weight + bias


def _update(state, momentum, mean, scale):
    new = dict(state)
    new["running_mean"] = momentum * state["running_mean"] + (1 - momentum) * mean.detach()
    new["running_var"] = momentum * state["running_var"] + (1 - momentum) * scale.detach()
    return new


def _eval(x, state, weight, bias):
    return _finish(x, state["running_mean"], state["running_var"], weight, bias), dict(state)


def lp_bn(x, state, weight, bias, p=2, momentum=0.1, eps=1e-5, training=True):
    """LpBatchNorm2d.forward, lp_norm.py:73-107: scale = (mean|x - mu|^p + eps)^(-1/p)."""
    if not training:
        return _eval(x, state, weight, bias)
    mu = x.mean(0)
    scale = ((x - mu).abs() ** p).mean(0).add(eps) ** (-1.0 / p)
    return _finish(x, mu, scale, weight, bias), _update(state, momentum, mu, scale)


def topk_bn(x, state, weight, bias, k=1, momentum=0.1, eps=1e-5, training=True):
    """TopkBatchNorm2d.forward, lp_norm.py:126-163: scale = 1 / (C(N) * mean of the k largest
    |x - mu| per channel + eps); gradient flows through mu and the top-k values."""
    if not training:
        return _eval(x, state, weight, bias)
    mu = x.mean(0)
    A = (x - mu).abs()
    topk = torch.topk(A, k, dim=0)[0].mean(0) * _topk_const(x.shape[0])
    scale = 1 / (topk + eps)
    return _finish(x, mu, scale, weight, bias), _update(state, momentum, mu, scale)


def ghost_topk_bn(x, state, weight, bias, k=10, momentum=0.1, eps=1e-5, training=True):
    """GhostTopkBatchNorm2d.forward, lp_norm.py:186-234 (no ghost-batch splitting happens).

    m = C(N) * (0.75 * meanTOPK_buffer + 0.25 * topk_mean(|x - mu|)); the buffer then stores
    m itself, constant included, so C(N) compounds on the smoothed part across calls; the
    buffer term is detached, gradient flows through the current batch's top-k mean.
    scale = 1 / (m + eps); running_var stores that scale.  Eval ignores meanTOPK.
    """
    if not training:
        return _eval(x, state, weight, bias)
    mu = x.mean(0)
    A = (x - mu).abs()
    batch_topk = torch.topk(A, k, dim=0)[0].mean(0)
    m = (C_BETA * state["meanTOPK"].detach() + (1 - C_BETA) * batch_topk) * _topk_const(x.shape[0])
    scale = 1 / (m + eps)
    new = _update(state, momentum, mu, scale)
    new["meanTOPK"] = m.detach()
    return _finish(x, mu, scale, weight, bias), new


def l1_bn(x, state, weight, bias, momentum=0.1, eps=1e-5, training=True, normalized=True):
    """L1BatchNorm2d.forward, lp_norm.py:259-291: scale = 1 / (mean|x - mu| * sqrt(pi/2) + eps)
    (sqrt(pi/2) replaced by 1 when normalized=False, 254-257)."""
    if not training:
        return _eval(x, state, weight, bias)
    mu = x.mean(0)
    fix = math.sqrt(math.pi / 2) if normalized else 1.0
    scale = 1 / ((x - mu).abs().mean(0) * fix + eps)
    return _finish(x, mu, scale, weight, bias), _update(state, momentum, mu, scale)


def _norm_except(x, dim, p=2):
    """bwn.py:26-41: p-norm over all dims except `dim` (p = inf: max |x|), keeping dims of
    size 1; dim None: whole-tensor norm.  For a middle dim their recursion drops p (uses 2)."""
    if dim is None:
        return x.norm(p=p)
    if dim not in (0, x.dim() - 1):
        return _norm_except(x.transpose(0, dim), 0).transpose(0, dim)
    keep = [1] * x.dim()
    keep[dim] = x.shape[dim]
    flat = x.movedim(dim, 0).reshape(x.shape[dim], -1)
    n = flat.abs().max(dim=1)[0] if p == float("inf") else flat.norm(p=p, dim=1)
    return n.reshape(keep)


def bounded_weight_norm_init(weight, dim=0, p=2):
    """BoundedWeighNorm.apply, bwn.py:83-88: g = _norm(weight, dim, p); g_prenorm = ||g||_2
    (always L2, whatever p) as a (1,) buffer.  v starts as the weight itself (91)."""
    g = _norm_except(weight.detach(), dim, p).clone()
    return g, g.norm().reshape(1)


def bounded_weight_norm(v, g, g_prenorm, dim=0, p=2):
    """compute_weight, bwn.py:65-71: w = v * (g_prenorm / ||g||_2) * g / _norm(v, dim, p); the
    gain vector is rescaled to a fixed total L2 norm; no eps; g_prenorm gets no gradient."""
    g_eff = (g_prenorm.detach() / g.norm()) * g
    return v * (g_eff / _norm_except(v, dim, p))
