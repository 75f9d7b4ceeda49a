"""Float64 reference transcription of Zhang & Sennrich 2019, "Root Mean Square Layer
Normalization" (github bzhangGo/rmsnorm, commit 2e726f1): the Theano RNN layers in layers.py
and the torch module in rmsnorm_torch.py.  Matrices are (in, out) as in the authors'
`dot(x, W)`; no masks (all ones), so the masked carry-over lines are identities.
"""

from __future__ import annotations

import torch


def rln(x, s):
    """layers.py:10-14: x / sqrt(mean(x^2 over the feature dim) + 1e-5) * s (eps inside the
    square root, no bias, no mean subtraction)."""
    return s * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5)


def rmsnorm_torch(x, scale, p=-1.0, eps=1e-8, offset=None):
    """RMSNorm.forward, rmsnorm_torch.py:36-53.

    rms = ||x_part||_2 / sqrt(d_part); y = scale * x / (rms + eps) (+ offset when bias=True).
    eps is added to the rms, outside the square root.  Partial RMSNorm when 0 <= p <= 1:
    the statistic uses only the first int(d * p) features (truncation), but every feature is
    divided by it.  p = 0 gives d_part = 0 and Python raises ZeroDivisionError on 0 ** -0.5.
    """
    d = x.shape[-1]
    if p < 0.0 or p > 1.0:
        part, d_part = x, d
    else:
        d_part = int(d * p)
        part = x[..., :d_part]
    rms = part.norm(2, dim=-1, keepdim=True) * d_part ** (-1.0 / 2)
    y = scale * (x / (rms + eps))
    return y if offset is None else y + offset


def rlnlstm_sequence(p, x, h0, c0):
    """rlnlstm_layer, layers.py:652-744 (params 616-649).

    p: W (nin, 4H), U (H, 4H), b (4H,), s1, s2 (4H,), s3 (H,).  x (T, B, nin); h0, c0 (B, H).
    Gate column order i, f, o, c~ (706-709).  b enters twice: once inside the input
    projection that rln(., s1) normalises (720) and again after the two rln's (704).
    rln is taken over the whole 4H pre-activation vector (not per gate); the recurrent
    state c is carried un-normalised and only tanh's argument is rln(c, s3) (711-715).
    Returns h sequence (T, B, H) and final c (B, H).
    """
    H = p["U"].shape[0]
    xw = x @ p["W"] + p["b"]  # 720
    h, c, hs = h0, c0, []
    for t in range(x.shape[0]):
        z = rln(h @ p["U"], p["s2"]) + rln(xw[t], p["s1"]) + p["b"]  # 701-704
        i, f, o = (torch.sigmoid(z[:, k * H : (k + 1) * H]) for k in range(3))
        cand = torch.tanh(z[:, 3 * H :])
        c = f * c + i * cand
        h = o * torch.tanh(rln(c, p["s3"]))
        hs.append(h)
    return torch.stack(hs, 0), c


def rlngru_sequence(p, x, h0):
    """rlngru_layer, layers.py:287-357 (params 256-285).

    p: W (nin, 2H), b (2H,), U (H, 2H), Wx (nin, H), bx (H,), Ux (H, H), s1 (2H,), s2 (H,),
    s3 (2H,), s4 (H,).  x (T, B, nin); h0 (B, H).  Column order of W/U: r (reset) then u
    (update).  The biases sit inside the rln'd input projections (310-311) and nowhere else;
    rln(h U, s3) is over both gates together; the reset gate multiplies the *normalised*
    rln(h Ux, s4); new h = u * h_prev + (1 - u) * tanh(.) (334).  Returns h (T, B, H).
    """
    H = p["Ux"].shape[1]
    xr = x @ p["W"] + p["b"]
    xx = x @ p["Wx"] + p["bx"]
    h, hs = h0, []
    for t in range(x.shape[0]):
        pre = rln(h @ p["U"], p["s3"]) + rln(xr[t], p["s1"])  # 317-322
        r, u = torch.sigmoid(pre[:, :H]), torch.sigmoid(pre[:, H:])
        cand = torch.tanh(rln(h @ p["Ux"], p["s4"]) * r + rln(xx[t], p["s2"]))  # 318, 327-332
        h = u * h + (1.0 - u) * cand
        hs.append(h)
    return torch.stack(hs, 0)
