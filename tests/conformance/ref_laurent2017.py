"""Float64 reference transcriptions for Laurent et al. 2017, "Recurrent Normalization Propagation".

`ptb_normprop_loss` is an independent torch re-expression of the authors' Theano code:

* N = github.com/Thrandis/recurrent-batch-normalization, branch origin/norm @ ce478e4
      ("Working one.", 2016-08-17), file penntreebank.py.

`wn_lstm_loss` and `ln_lstm_loss` are NOT transcriptions of authors' code (that repository has
none for them): they are formula transcriptions of the standard definitions, Salimans & Kingma
2016 (weight normalization) and Ba, Kiros & Hinton 2016 (layer-normalized LSTM, eqs. 20-22),
written with the same parameter naming and gate order as the NormProp model.

Conventions: float64, x @ W (weights multiply from the right, so a weight matrix's COLUMN is
one output unit), gate order (g, f, i, o) in the 4H columns (N:336-337), natural-log CE averaged
over the (L-1)*B next-character positions (inputs x[:-1], targets x[1:], N:424-427).

Training setup of the norm branch (for the record): CompositeRule([StepClipping(1.),
optimizer]) (N:479-490) with --optimizer default rmsprop -> Blocks RMSProp(lr, decay_rate=0.9),
lr default 1e-3, batch 64, length 50, H 1000, --init default "id" (N:441-460). The
ForceL2Norm extension (N:29-43) is NOT used (commented out, N:500-501) and there is no LR
decay (N:503-506). Model selection: TrackTheBest("valid_error_rate") (N:538). The branch's
experiments/*.sh are stale copies from the BN repo and pass --initialization, which this
script's argparse does not define (it has --init).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "NORM_TANH_VARIANCE",
    "norm_tanh_gamma",
    "ptb_normprop_init_params",
    "ptb_normprop_loss",
    "wn_lstm_loss",
    "ln_lstm_loss",
]

# Fixed variance constants of norm_tanh_gamma, keyed by args.initial_gamma (N:161-170):
# tanh(x) / sqrt(var). Chosen by the INITIAL gamma flag, never by the learned gammas.
NORM_TANH_VARIANCE = {0.1: 0.0098, 1.0: 0.3944, 0.8: 0.3141}


def norm_tanh_gamma(x, gamma):
    """tanh(x) / sqrt(NORM_TANH_VARIANCE[gamma]) (N:161-170); other gammas raise."""
    if gamma not in NORM_TANH_VARIANCE:
        raise NotImplementedError(gamma)
    return torch.tanh(x) / math.sqrt(NORM_TANH_VARIANCE[gamma])


def _colnorm(W):
    # divide each column (output unit) by its L2 norm over the input axis 0; no epsilon
    # (N:313-314 for Wa/Wx, N:366 for Wy)
    return W / torch.sqrt((W**2).sum(0, keepdim=True))


def _ce(logits, y):
    # crossentropy_lastaxes(softmax_lastaxis(.)) averaged over all positions (N:71-77, 371-378)
    return -(y * torch.log_softmax(logits, dim=-1)).sum(-1).mean()


def _init_state(p, B, H, like):
    z = like.new_zeros(B, H)
    h = p["h0"].expand(B, H) if "h0" in p else z
    c = p["c0"].expand(B, H) if "c0" in p else z
    return h, c


def _orthogonal(shape, generator):
    # their `orthogonal` (N:58-66): keep the thin-SVD factor of a Gaussian with the right shape
    a = torch.randn(shape, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    return (u if u.shape == a.shape else vh).clone()


def ptb_normprop_init_params(
    H: int, V: int, generator=None, *, init="id", initial_gamma=0.1, initial_beta=0.0
):
    """Initial values (N:272-305, 408-416); orthogonal = thin-SVD factor of a Gaussian.

    init="id": Wa = [I_H | orthogonal((H, 3H))] (identity in the g block, N:280-284), else
    orthogonal((H, 4H)). Wx = orthogonal((V, 4H)), Wy = orthogonal((H, V)), by = 0,
    ab_betas = initial_beta with [H:2H] = 1 (forget bias, N:290-293), a/b/c_gammas =
    initial_gamma, y_gammas = 1/1.21 (N:413), h0 = c0 = 0 (learned).
    """
    if init == "id":
        Wa = torch.cat([torch.eye(H, dtype=torch.float64), _orthogonal((H, 3 * H), generator)], 1)
    else:
        Wa = _orthogonal((H, 4 * H), generator)
    ab_betas = torch.full((4 * H,), float(initial_beta), dtype=torch.float64)
    ab_betas[H : 2 * H] = 1.0
    g = float(initial_gamma)
    return {
        "Wy": _orthogonal((H, V), generator),
        "by": torch.zeros(V, dtype=torch.float64),
        "y_gammas": torch.full((V,), 1.0 / 1.21, dtype=torch.float64),
        "h0": torch.zeros(H, dtype=torch.float64),
        "c0": torch.zeros(H, dtype=torch.float64),
        "Wa": Wa,
        "Wx": _orthogonal((V, 4 * H), generator),
        "ab_betas": ab_betas,
        "a_gammas": torch.full((4 * H,), g, dtype=torch.float64),
        "b_gammas": torch.full((4 * H,), g, dtype=torch.float64),
        "c_gammas": torch.full((H,), g, dtype=torch.float64),
    }


def ptb_normprop_loss(p: dict, x_onehot, *, initial_gamma=0.1):
    """Mean CE of the norm branch's LSTM(norm=True) + normalized output layer (AUTHORS' CODE).

    Transcribes N:260-270 (standard sigmoid/tanh; the norm_sigmoid branch is disabled by
    `if False`), N:308-361 (LSTM.construct_graph with self.norm), N:364-379
    (construct_common_graph with args.norm) and N:424-427 (next-character shift).

    p: h0, c0 (H,), Wa (H,4H), Wx (V,4H), ab_betas (4H,), a_gammas (4H,), b_gammas (4H,),
       c_gammas (H,), Wy (H,V), by (V,), y_gammas (V,). Gate order (g, f, i, o).
    x_onehot: (B, L, V). Per step (no batch statistics anywhere, deterministic):
       Wa_n = a_gammas * Wa/||Wa col||,  Wx_n = b_gammas * Wx/||Wx col||  (norm over axis 0)
       ab = ab_betas + (h @ Wa_n + x @ Wx_n) / sqrt(2)          (bias added AFTER the /sqrt 2)
       g = tanh(.)/sqrt(v_gamma); f, i, o = plain sigmoid        (v_gamma: NORM_TANH_VARIANCE)
       c = (f*c + i*g) / sqrt(2)                                 (this scaled c recurs)
       h = o * tanh(c * c_gammas) / sqrt(v_gamma)
       logits = y_gammas * (h @ Wy) / ||Wy col|| + by
    """
    x, y = x_onehot[:, :-1], x_onehot[:, 1:]
    B, L, _ = x.shape
    H = p["h0"].shape[0]
    Wa_n = _colnorm(p["Wa"]) * p["a_gammas"]
    Wx_n = _colnorm(p["Wx"]) * p["b_gammas"]
    xtilde = x @ Wx_n  # (B, L, 4H), computed outside the scan (N:321)
    h, c = _init_state(p, B, H, x)
    r2 = math.sqrt(2.0)
    hs = []
    for t in range(L):
        ab = p["ab_betas"] + (h @ Wa_n + xtilde[:, t]) / r2  # (N:333)
        g = norm_tanh_gamma(ab[:, :H], initial_gamma)  # (N:338)
        f, i, o = (torch.sigmoid(ab[:, k * H : (k + 1) * H]) for k in (1, 2, 3))  # (N:339-341)
        c = (f * c + i * g) / r2  # (N:343)
        h = o * norm_tanh_gamma(c * p["c_gammas"], initial_gamma)  # (N:348)
        hs.append(h)
    hs = torch.stack(hs, 1)
    logits = (hs @ p["Wy"]) / torch.sqrt((p["Wy"] ** 2).sum(0)) * p["y_gammas"] + p["by"]
    return _ce(logits, y)


def _lstm_step(ab, c, H, c_out=None):
    # standard LSTM cell on preactivations ab in (g, f, i, o) order; c_out maps c for the output
    g = torch.tanh(ab[:, :H])
    f, i, o = (torch.sigmoid(ab[:, k * H : (k + 1) * H]) for k in (1, 2, 3))
    c = f * c + i * g
    return o * torch.tanh(c if c_out is None else c_out(c)), c


def wn_lstm_loss(p: dict, x_onehot):
    """Weight-normalized LSTM (STANDARD-DEFINITION FORMULA, NOT AUTHORS' CODE).

    Salimans & Kingma 2016: w_j = g_j v_j / ||v_j|| for every output unit j, applied to both
    input and recurrent weights; nothing else is normalized; plain output layer.
    p: Wa (H,4H) and Wx (V,4H) are the directions v (column j = unit j), a_gammas (4H,) and
       b_gammas (4H,) their gains g, ab_betas (4H,) the LSTM bias, Wy (H,V), by (V,);
       optional h0, c0 (H,) (zero initial state otherwise). Gate order (g, f, i, o).
    x_onehot: (B, L, V); returns mean CE over the (L-1)*B next-step predictions.
    """
    x, y = x_onehot[:, :-1], x_onehot[:, 1:]
    B, L, _ = x.shape
    H = p["Wa"].shape[0]
    Wa, Wx = _colnorm(p["Wa"]) * p["a_gammas"], _colnorm(p["Wx"]) * p["b_gammas"]
    h, c = _init_state(p, B, H, x)
    hs = []
    for t in range(L):
        h, c = _lstm_step(h @ Wa + x[:, t] @ Wx + p["ab_betas"], c, H)
        hs.append(h)
    return _ce(torch.stack(hs, 1) @ p["Wy"] + p["by"], y)


def _ln(z, gain, bias, eps):
    # per-example normalisation over the feature axis (biased variance, eps inside the sqrt)
    mu, var = z.mean(-1, keepdim=True), z.var(-1, unbiased=False, keepdim=True)
    return (z - mu) / torch.sqrt(var + eps) * gain + bias


def ln_lstm_loss(p: dict, x_onehot, eps=1e-5):
    """Layer-normalized LSTM (STANDARD-DEFINITION FORMULA, NOT AUTHORS' CODE).

    Ba, Kiros & Hinton 2016, eqs. 20-22:
      ab  = LN(h @ Wa; a_gammas, a_betas) + LN(x @ Wx; b_gammas, b_betas) [+ ab_betas]
      c_t = sigmoid(f) * c + sigmoid(i) * tanh(g)          (the UN-normalized c recurs)
      h_t = sigmoid(o) * tanh(LN(c_t; c_gammas, c_betas))
    Each LN is over the whole feature vector of one example (4H for the two terms, H for c),
    mean and biased variance, eps added to the variance.
    p: Wa (H,4H), Wx (V,4H), a_gammas, a_betas, b_gammas, b_betas (4H,), c_gammas, c_betas (H,),
       Wy (H,V), by (V,); optional ab_betas (4H,) (redundant with the LN biases), h0, c0 (H,).
       Gate order (g, f, i, o). x_onehot: (B, L, V); mean CE over (L-1)*B positions.
    """
    x, y = x_onehot[:, :-1], x_onehot[:, 1:]
    B, L, _ = x.shape
    H = p["Wa"].shape[0]
    h, c = _init_state(p, B, H, x)
    bias = p.get("ab_betas", 0.0)
    c_out = lambda c: _ln(c, p["c_gammas"], p["c_betas"], eps)  # noqa: E731
    hs = []
    for t in range(L):
        ab = (
            _ln(h @ p["Wa"], p["a_gammas"], p["a_betas"], eps)
            + _ln(x[:, t] @ p["Wx"], p["b_gammas"], p["b_betas"], eps)
            + bias
        )
        h, c = _lstm_step(ab, c, H, c_out)
        hs.append(h)
    return _ce(torch.stack(hs, 1) @ p["Wy"] + p["by"], y)
