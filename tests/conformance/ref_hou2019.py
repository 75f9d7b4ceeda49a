"""Float64 reference transcription of Hou et al. 2019, "Normalization Helps Training of
Quantized LSTM" (github houlu369/Normalized-Quantized-LSTM, commit 8d78467).

Written from the authors' model_lm.py, main_lm.py and utils.py only (torch 0.4.1 semantics:
nn.BatchNorm1d weight ~ U(0, 1), bias 0; F.batch_norm updates running_var with the unbiased
batch variance; nn.LayerNorm weight 1, bias 0, eps 1e-5).

Parameter names follow the authors: weight_ih_l0 (4H, in), weight_hh_l0 (4H, H), bias_ih_l0
(4H,) (a single bias, no bias_hh), weight_ih_l0_full_precision, weight_hh_l0_full_precision.
Gate row-block order in every (4H, .) tensor is i, f, a, o (a = tanh candidate),
model_lm.py:223 and 255-258.  Gate-module tags: iih, fih, aih, oih (input-to-hidden part of
gate i/f/a/o) and ihh, fhh, ahh, ohh (hidden-to-hidden part), model_lm.py:146-176.
"""

from __future__ import annotations

import math

import torch

GATES = ("i", "f", "a", "o")
BN_MOMENTUM = 0.1
BN_EPS = 1e-5
LN_EPS = 1e-5
WN_EPS = 1e-8
DTYPE = torch.float64


# --------------------------------------------------------------------------- quantization


def preconditioner(exp_avg_sq=None, like=None):
    """D = sqrt(acc) + 1e-8, model_lm.py:275 and 297.

    acc is Adam's exp_avg_sq of the *quantized copy* weight_ih_l0 / weight_hh_l0
    (model_lm.py:327-328), or ones while the optimizer state of param_groups[0]['params'][0]
    is empty (model_lm.py:323-325; always the case for plain SGD), giving D = 1 + 1e-8.
    """
    acc = torch.ones_like(like) if exp_avg_sq is None else exp_avg_sq
    return acc.sqrt() + 1e-8


@torch.no_grad()
def quantize_block(w, method, D=None):
    """Quantization(tensor, acc, method), model_lm.py:264-312, for one gate block (H, in).

    D is the preconditioner sqrt(acc) + 1e-8 (see `preconditioner`); None means the
    empty-optimizer-state value 1 + 1e-8.  Only 'lab' and 'lat' use D.  sign(0) = 0.
    Returns a tensor without gradient (the authors write it into weight_ih_l0.data).
    """
    w = w.detach()
    D = preconditioner(None, w) if D is None else D.detach()
    if method == "bwn":  # 266-269: sign(w) * mean|w| over the whole block
        return w.sign() * w.abs().mean()
    if method == "binary_connect":  # 271-272: plain sign, unscaled
        return w.sign()
    if method == "lab":  # 273-278: sign(w) * sum|D w| / sum D
        return w.sign() * (D * w).abs().sum() / D.sum()
    if method in ("ternary_connect", "twn"):  # 280-294: threshold 0.7 * mean|w|, strict >
        thr = 0.7 * w.abs().mean()
        tern = (w > thr).to(w.dtype) - (w < -thr).to(w.dtype)
        if method == "ternary_connect":
            return tern  # values in {-1, 0, 1}, unscaled
        mask = (w.abs() > thr).to(w.dtype)
        return (mask * w).abs().sum() / mask.sum() * tern  # one alpha for both signs
    if method == "lat":  # 296-311: alternate alpha / b until |alpha_old - alpha| <= 1e-6

        def ternarize(alpha):
            return (w > alpha / 2).to(w.dtype) - (w < -alpha / 2).to(w.dtype)

        def fit(b):
            return (b * D * w).abs().sum() / (b * D).abs().sum()

        alpha = fit(w.sign())
        b = ternarize(alpha)
        alpha_old = torch.tensor(100.0, dtype=w.dtype)
        for _ in range(100000):  # the authors loop without a cap
            if not (alpha_old - alpha).abs() > 1e-6:
                break
            alpha_old = alpha
            alpha = fit(b)
            b = ternarize(alpha)
        return alpha * b
    # model_lm.py:312: any other method (including '') raises UnboundLocalError there.
    raise ValueError(f"unknown quantization method {method!r}")


def quantize_gates(w, method, D=None):
    """quantize(), model_lm.py:314-347: Quantization applied separately to the four row
    blocks w[k*H:(k+1)*H, :] (k = i, f, a, o), each block over all its columns."""
    H = w.shape[0] // 4
    blocks = [
        quantize_block(
            w[k * H : (k + 1) * H], method, None if D is None else D[k * H : (k + 1) * H]
        )
        for k in range(4)
    ]
    return torch.cat(blocks, 0)


def straight_through(w_fp, method, D=None):
    """Forward value quantize_gates(w_fp); gradient passed unchanged to w_fp, as optim_grad
    copies weight_*_l0.grad onto weight_*_l0_full_precision.grad (model_lm.py:350-352)."""
    q = quantize_gates(w_fp, method, D)
    return w_fp + (q - w_fp).detach()


# --------------------------------------------------------------------------- weight norm


def _row_norm(v):
    """_norm(p, 0), model_lm.py:74-80: L2 norm of each row, shape (rows, 1)."""
    return v.reshape(v.shape[0], -1).norm(dim=1, keepdim=True)


def weightnorm_gain(w):
    """WeightNorm.__init__, model_lm.py:94: g = per-row L2 norm (H, 1) of the gate block it
    wraps.  The block is a slice of weight_ih_l0 / weight_hh_l0 (the quantized copy, right
    after its uniform init; model_lm.py:156-164), not of the full-precision weights."""
    return _row_norm(w.detach()).clone()


def weightnorm(v, g):
    """WeightNorm.forward, model_lm.py:96-99: g * v / (||v_row|| + 1e-8)."""
    return g.reshape(-1, 1) * v / (_row_norm(v) + WN_EPS)


# --------------------------------------------------------------------------- norm layers


def _layer_norm(x, w, b):
    """nn.LayerNorm(H) over the last dim: biased variance, eps 1e-5."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + LN_EPS) * w + b


def _batch_norm(x, w, b, rm, rv, training):
    """torch 0.4.1 F.batch_norm on (B, F): normalise with the biased batch variance; running
    stats <- 0.9 * running + 0.1 * batch (mean, *unbiased* variance).  Returns y, rm, rv."""
    if not training:
        return (x - rm) / torch.sqrt(rv + BN_EPS) * w + b, rm, rv
    n = x.shape[0]
    mu = x.mean(0)
    var = ((x - mu) ** 2).mean(0)
    new_rm = (1 - BN_MOMENTUM) * rm + BN_MOMENTUM * mu.detach()
    new_rv = (1 - BN_MOMENTUM) * rv + BN_MOMENTUM * var.detach() * n / (n - 1)
    return (x - mu) / torch.sqrt(var + BN_EPS) * w + b, new_rm, new_rv


def _split4(z):
    return torch.chunk(z, 4, dim=-1)


# --------------------------------------------------------------------------- the cell


def _cell_weights(p, norm, method, D_ih, D_hh):
    """weight_forward (model_lm.py:201-212) after quantize (RNNModel.forward 487-488 runs
    quantize before the LSTM's weight_forward at 380): WN wraps the *quantized* weights."""
    if method:
        W_ih = straight_through(p["weight_ih_l0_full_precision"], method, D_ih)
        W_hh = straight_through(p["weight_hh_l0_full_precision"], method, D_hh)
    else:
        W_ih, W_hh = p["weight_ih_l0"], p["weight_hh_l0"]
    if norm == "weight":
        rows_ih, rows_hh = _rows4(W_ih), _rows4(W_hh)
        W_ih = torch.cat([weightnorm(rows_ih[k], p[f"g_{g}ih"]) for k, g in enumerate(GATES)])
        W_hh = torch.cat([weightnorm(rows_hh[k], p[f"g_{g}hh"]) for k, g in enumerate(GATES)])
    return W_ih, W_hh


def _rows4(w):
    return torch.chunk(w, 4, dim=0)


def running_keys(norm, shared):
    """Names of the running-statistic buffers lstm_sequence reads and returns."""
    if norm != "batch":
        return []
    if shared:
        return [
            f"bn_{g}{s}_running_{k}" for g in GATES for s in ("ih", "hh") for k in ("mean", "var")
        ]
    return [f"bn_{s}_running_{k}" for s in ("ih", "hh") for k in ("mean", "var")]


def lstm_sequence(
    p, x, h0, c0, *, norm, shared=False, training=True, method=None, D_ih=None, D_hh=None
):
    """LSTM_quantized forward over T steps, model_lm.py:214-262 (cell) and 369-377 (loop).

    x (T, B, in); h0, c0 (B, H).  Returns outputs (T, B, H), (h_T, c_T) each (B, H), and a
    dict of updated running statistics (detached; empty unless norm == 'batch').

    norm '' : z = x W_ih^T + h W_hh^T + b                                    (220-223)
    'weight': same with per-gate-block WeightNorm'd W (gains g_iih, g_ihh, ..., g_ohh) (225-228)
    'layer' : z_g = LN_gih(x W_ih,g^T) + LN_ghh(h W_hh,g^T) + b_g, params ln_{g}{ih|hh}_{w|b}
              (245-253)
    'batch', shared=True: as 'layer' with nn.BatchNorm1d(H) per gate part; params
              bn_{g}{ih|hh}_{w|b}, buffers bn_{g}{ih|hh}_running_{mean|var} (H,), one pair
              per module for all time steps (233-239)
    'batch', shared=False: z = BN_ih,t(x W_ih^T) + BN_hh,t(h W_hh^T) + b over all 4H features;
              params bn_ih_w, bn_ih_b, bn_hh_w, bn_hh_b (4H,); buffers bn_{ih|hh}_running_{mean|var}
              of shape (max_length, 4H); time index t clamped to max_length - 1 (55-64, 240-243)
    The cell state c is never normalised (batchnorm_c / layernorm_ct / batchnorm_ct exist but
    are unused).  t is the index inside this call (restarts at 0 every bptt chunk).
    If method is given, W is quantized per gate block from weight_*_l0_full_precision with a
    straight-through gradient; otherwise weight_ih_l0 / weight_hh_l0 are used as they are.
    """
    norm = norm or ""
    W_ih, W_hh = _cell_weights(p, norm, method, D_ih, D_hh)
    b = p["bias_ih_l0"]
    stats = {k: p[k].detach().clone() for k in running_keys(norm, shared)}
    h, c, outs = h0, c0, []
    for t in range(x.shape[0]):
        pre_ih, pre_hh = x[t] @ W_ih.T, h @ W_hh.T
        if norm in ("", "weight"):
            z = pre_ih + pre_hh + b
        elif norm == "layer" or (norm == "batch" and shared):
            parts = []
            for g, zi, zh, bg in zip(
                GATES, _split4(pre_ih), _split4(pre_hh), _split4(b), strict=True
            ):
                if norm == "layer":
                    zi = _layer_norm(zi, p[f"ln_{g}ih_w"], p[f"ln_{g}ih_b"])
                    zh = _layer_norm(zh, p[f"ln_{g}hh_w"], p[f"ln_{g}hh_b"])
                else:
                    zi = _bn_step(p, stats, f"bn_{g}ih", zi, None, training)
                    zh = _bn_step(p, stats, f"bn_{g}hh", zh, None, training)
                parts.append(zi + zh + bg)
            z = torch.cat(parts, -1)
        elif norm == "batch":
            tt = min(t, stats["bn_ih_running_mean"].shape[0] - 1)
            z_ih = _bn_step(p, stats, "bn_ih", pre_ih, tt, training)
            z_hh = _bn_step(p, stats, "bn_hh", pre_hh, tt, training)
            z = z_ih + z_hh + b
        else:
            raise ValueError(f"unknown norm {norm!r}")
        i, f, a, o = _split4(z)
        c = torch.sigmoid(i) * torch.tanh(a) + torch.sigmoid(f) * c
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return torch.stack(outs, 0), (h, c), stats


def _bn_step(p, stats, name, x, t, training):
    """One BN call; t is None for shared (single buffer) or the clamped time index."""
    rm_key, rv_key = f"{name}_running_mean", f"{name}_running_var"
    rm = stats[rm_key] if t is None else stats[rm_key][t]
    rv = stats[rv_key] if t is None else stats[rv_key][t]
    y, new_rm, new_rv = _batch_norm(x, p[f"{name}_w"], p[f"{name}_b"], rm, rv, training)
    if t is None:
        stats[rm_key], stats[rv_key] = new_rm, new_rv
    else:
        stats[rm_key][t], stats[rv_key][t] = new_rm, new_rv
    return y


# --------------------------------------------------------------------------- the char LM


def char_lm_loss(
    p,
    tokens_in,
    targets,
    V,
    *,
    norm,
    shared=False,
    method=None,
    training=True,
    h0=None,
    c0=None,
    D_ih=None,
    D_hh=None,
):
    """RNNModel with --char (model_lm.py:412-514) + nn.CrossEntropyLoss (main_lm.py:158, 219).

    tokens_in (T, B) int64 -> one-hot rows of eye(V) (frozen encoder, 421-425) -> one cell
    (nlayers 1, dropout 0 as in the README char commands) -> decoder Linear: logits =
    out @ p['decoder.weight'].T + p['decoder.bias'] with decoder.weight (V, H), bias (V,)
    (447, 510-511) -> mean cross-entropy over all T*B positions; targets (T, B) or (T*B,)
    in row-major (t, b) order (utils.py:28).  With method, p holds
    weight_{ih,hh}_l0_full_precision and gradients reach them straight through.
    """
    T, B = tokens_in.shape
    H = p["bias_ih_l0"].shape[0] // 4
    x = torch.eye(V, dtype=DTYPE)[tokens_in]
    h0 = torch.zeros(B, H, dtype=DTYPE) if h0 is None else h0
    c0 = torch.zeros(B, H, dtype=DTYPE) if c0 is None else c0
    out, _, _ = lstm_sequence(
        p,
        x,
        h0,
        c0,
        norm=norm,
        shared=shared,
        training=training,
        method=method,
        D_ih=D_ih,
        D_hh=D_hh,
    )
    logits = out.reshape(T * B, H) @ p["decoder.weight"].T + p["decoder.bias"]
    tgt = targets.reshape(-1)
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -logp.gather(1, tgt[:, None]).mean()


# --------------------------------------------------------------------------- initialisation


def _uniform(shape, lo, hi, generator):
    return torch.rand(shape, generator=generator, dtype=DTYPE) * (hi - lo) + lo


def init_cell(input_size, H, norm, generator, *, shared=False, max_length=100):
    """LSTM_quantized_cell.__init__ (model_lm.py:104-191) + reset_parameters (193-198).

    reset_parameters runs *before* the norm modules are built, so only weight_ih_l0,
    weight_hh_l0, bias_ih_l0 and the two *_full_precision weights are U(-1/sqrt(H), 1/sqrt(H))
    (drawn in that order; the quantized copy is independent of the full-precision weight).
    Norm modules keep their own init: LayerNorm 1/0; BatchNorm1d / SeparatedBatchNorm1d
    weight U(0, 1), bias 0, running mean 0, var 1 (40-48); WeightNorm gain = row norms of the
    weight_*_l0 blocks (94, 157-164).  Unused modules (ln_ct, bn_ct, bn_c) are included.
    max_length: 100 for --char, 180 for text8 char, 35 for word level (179-185).
    """
    s = 1.0 / math.sqrt(H)
    p = {}
    for name, shape in [
        ("weight_ih_l0", (4 * H, input_size)),
        ("weight_hh_l0", (4 * H, H)),
        ("bias_ih_l0", (4 * H,)),
        ("weight_ih_l0_full_precision", (4 * H, input_size)),
        ("weight_hh_l0_full_precision", (4 * H, H)),
    ]:
        p[name] = _uniform(shape, -s, s, generator)
    tags = [f"{g}{k}" for g in GATES for k in ("ih", "hh")] + ["ct"]
    if norm == "layer":
        for t in tags:
            p[f"ln_{t}_w"], p[f"ln_{t}_b"] = torch.ones(H, dtype=DTYPE), torch.zeros(H, dtype=DTYPE)
    elif norm == "weight":
        for g, wi, wh in zip(
            GATES, _rows4(p["weight_ih_l0"]), _rows4(p["weight_hh_l0"]), strict=True
        ):
            p[f"g_{g}ih"], p[f"g_{g}hh"] = weightnorm_gain(wi), weightnorm_gain(wh)
    elif norm == "batch" and shared:
        for t in tags:
            p[f"bn_{t}_w"] = _uniform((H,), 0.0, 1.0, generator)
            p[f"bn_{t}_b"] = torch.zeros(H, dtype=DTYPE)
            p[f"bn_{t}_running_mean"] = torch.zeros(H, dtype=DTYPE)
            p[f"bn_{t}_running_var"] = torch.ones(H, dtype=DTYPE)
    elif norm == "batch":
        for t, n in (("ih", 4 * H), ("hh", 4 * H), ("c", H)):
            p[f"bn_{t}_w"] = _uniform((n,), 0.0, 1.0, generator)
            p[f"bn_{t}_b"] = torch.zeros(n, dtype=DTYPE)
            p[f"bn_{t}_running_mean"] = torch.zeros(max_length, n, dtype=DTYPE)
            p[f"bn_{t}_running_var"] = torch.ones(max_length, n, dtype=DTYPE)
    return p


def init_decoder(V, H, generator):
    """init_weights, model_lm.py:475-480 with --char: decoder.weight U(-0.1, 0.1) (V, H),
    decoder.bias 0; encoder.weight = eye(V), frozen (requires_grad False, 423-425)."""
    return {
        "decoder.weight": _uniform((V, H), -0.1, 0.1, generator),
        "decoder.bias": torch.zeros(V, dtype=DTYPE),
        "encoder.weight": torch.eye(V, dtype=DTYPE),
    }


# --------------------------------------------------------------------------- optimisation


def lr_scale(method, char, keep_lr, nhid):
    """main_lm.py:102-108: 2*sqrt(nhid) only for binary/ternary_connect without --keep-lr
    and without --char; 1 otherwise."""
    if method in ("binary_connect", "ternary_connect") and not (keep_lr or char):
        return 2 * math.sqrt(nhid)
    return 1.0


def param_groups(named_params, method, char, keep_lr, nhid, lr):
    """main_lm.py:164-174 and 254-265: group 0 = names containing 'full_precision' at
    lr * lr_scale, group 1 = every other trainable parameter (quantized copies, bias, norm
    params, decoder, and the encoder unless --char, where it is frozen) at lr."""
    names = [n for n in named_params if not (char and n.endswith("encoder.weight"))]
    fp = [n for n in names if "full_precision" in n]
    inv = [n for n in names if "full_precision" not in n]
    return [(fp, lr * lr_scale(method, char, keep_lr, nhid)), (inv, lr)]


def next_lrs(lrs, epoch, optimizer, dataset, improved, lr_decay):
    """Per-epoch rules, main_lm.py:289-306 (epoch is 1-based; improved = val_loss <
    best so far, strict).  sgd: both groups / lr_decay when not improved.  adam: for
    epoch > 10 and dataset != 'text8', only group 0 (full-precision weights) * 0.98, every
    epoch, whether improved or not; never decayed on plateau."""
    lrs = list(lrs)
    if optimizer == "sgd" and not improved:
        lrs = [lr / lr_decay for lr in lrs]
    if optimizer == "adam" and epoch > 10 and dataset != "text8":
        lrs[0] *= 0.98
    return lrs
