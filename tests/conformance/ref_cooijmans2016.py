"""Float64 reference transcriptions of Cooijmans et al. 2016, "Recurrent Batch Normalization".

Independent re-expression in torch of the authors' Theano/Blocks code (NOT of this project's
code). Sources (bare mirrors on this machine):

* C  = github.com/cooijmanstim/recurrent-batch-normalization @ fe9efe6 (HEAD)
       files sequential_mnist.py (SM), penntreebank.py (PTB), experiments/*.sh, paper/index.tex
* BL = github.com/mila-iqia/blocks, blocks/algorithms/__init__.py @ 3db89c0 (the last commit
       before a31ef0b "fix inconsistent beta1 in Adam", 2017-01-03; its step-rule maths equals
       tag 0.2 of 2016-02-24). The authors' code dates from 2016 (SM/PTB last touched
       2016-07-20), so it ran with this pre-2017 Adam (beta1=0.1/beta2=0.001 convention).
       StepClipping/RMSProp/Momentum are unchanged up to Blocks HEAD c69c2dc.

Conventions: every function takes float64 tensors; weights multiply from the right (x @ W),
exactly as in the Theano code (T.dot(h, Wa)). Gate order in the 4H columns is (g, f, i, o)
(SM:177-178, PTB:262-263) -- NOT the (f, i, o, g) the paper writes (index.tex:143-147).
Cross-entropies use the natural log (divide by ln 2 for bits per character).

Optimizer settings used by the authors
--------------------------------------
* Sequential MNIST (SM:407-411): CompositeRule([StepClipping(1.), RMSProp(lr, decay_rate=0.5)])
  -- decay_rate 0.5 is hard-coded; the Momentum(lr, 0.9) line is commented out (SM:409).
  lr default 1e-4 (SM:376); all four experiments/sequential*mnist_*.sh pass
  --learning-rate 0.001 --batch-size 100 --num-epoch 200 --init id --lstm; BN runs omit
  --baseline, and only sequentialmnist_bnlstm.sh passes --noise 0.1 (the pMNIST BN run has no
  noise). num_hidden default 100 (SM:381), epsilon 1e-5 (SM:377), initial_gamma 0.1 (SM:384),
  initial_beta 0 (SM:385).
  The paper (index.tex:356-358) instead says "RMSProp with learning rate of 10^-3 and 0.9
  momentum" and "gradient clipping at 1". The code has no momentum and RMSProp decay 0.5.
* Penn Treebank (PTB:418-429): CompositeRule([StepClipping(1.), <optimizer>]) with
  --optimizer adam -> Blocks Adam(learning_rate=lr) with all other Adam defaults
  (beta1=0.1, beta2=0.001, epsilon=1e-8, decay_factor=1-1e-8, BL:861-863);
  rmsprop (argparse default, PTB:398) -> RMSProp(lr, decay_rate=0.9);
  sgdmomentum -> Momentum(lr, momentum=0.99).
  experiments/penntreebank_{lstm,bn-lstm}.sh: --optimizer adam --initialization orthogonal
  --num-epochs 50 --length 100 --batch-size 64 --num-hidden 1000 --learning-rate 0.002
  (LSTM adds --baseline). Paper index.tex:455-459 agrees (Adam 0.002, clipping 1.0, batch 64).
  --learning-rate-decay defaults to 0.0, so the per-batch SharedVariableModifier
  (PTB:437-439, lr <- (1-decay)*lr) is a no-op.
* text8 scripts: adam lr 0.001, batch 128, length 180, nh 2000, orthogonal (not transcribed).

Gradient clipping is a GLOBAL L2 norm over all trained parameters (BL:704-714), applied before
the optimizer, and Blocks subtracts the step: param <- param - step (BL:202-208).

Weight initialisation notes (see `orthogonal`, `seqmnist_init_params`, `ptb_init_params`)
-----------------------------------------------------------------------------------------
* SM --init id (SM:117-121): Wa = [I_H | orthogonal((H, 3H))] -> the identity sits in the
  first H columns, i.e. the g (candidate/tanh) block, not the forget gate. Else (default
  "ortho", SM:123) Wa = orthogonal((H, 4H)). Wx = orthogonal((1, 4H)) (a unit-norm row, SM:124),
  Wy = orthogonal((H, 10)) (SM:332), by = 0.
* PTB --initialization identity (argparse default, PTB:393) draws Wa = orthogonal((H, 4H)) and
  then overwrites Wa[:H, :H] = I (PTB:192-195), again the g block. The published scripts use
  "orthogonal" instead. Wx = init((V, 4H)), Wy = init((H, V)) with the same initializer.
* Forget-gate bias: ab_betas / bn_a.betas columns [H:2H] set to 1 (SM:129-132, PTB:205-209).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "orthogonal",
    "seqmnist_init_params",
    "ptb_init_params",
    "seqmnist_lstm_loss",
    "seqmnist_lstm_batch_stats",
    "ptb_lstm_loss",
    "ptb_lstm_batch_stats",
    "popstats_ema_update",
    "step_clipping",
    "rmsprop_step",
    "momentum_step",
    "adam_step",
    "composite_step",
]


# --------------------------------------------------------------------------- initialisation


def orthogonal(shape, generator: torch.Generator | None = None) -> torch.Tensor:
    """Their `orthogonal` initializer (C: SM:40-48 and PTB:39-47, "benanne lasagne ortho init").

    Draw a standard-normal (shape[0], prod(shape[1:])) matrix, take its thin SVD and keep the
    factor whose shape equals the flat shape (u if it fits, else v): for wide matrices
    (e.g. (H, 4H) or (1, 4H)) the ROWS are orthonormal, for tall ones the columns. The random
    stream differs from numpy's, only the construction is transcribed.
    """
    flat = (shape[0], math.prod(shape[1:]))
    a = torch.randn(flat, generator=generator, dtype=torch.float64)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    q = u if tuple(u.shape) == flat else vh  # pick the one with the flat shape
    return q.reshape(shape)[: shape[0], : shape[1]].clone()


def seqmnist_init_params(
    H: int, generator=None, *, init="id", initial_gamma=0.1, initial_beta=0.0, nclasses=10
):
    """Initial values of LSTM.allocate_parameters + Wy/by (C: SM:109-146, SM:332-333).

    init="id": Wa = [I_H | orthogonal((H, 3H))] (SM:117-121); otherwise orthogonal((H, 4H)).
    All gammas = initial_gamma, ab_betas = c_betas = initial_beta, then ab_betas[H:2H] = 1.
    h0 = c0 = 0 (learned parameters, SM:115-116). In baseline mode only h0, c0, Wa, Wx,
    ab_betas, c_betas (and Wy, by) are trained (SM:137-140); the gammas are unused.
    """
    if init == "id":
        Wa = torch.cat([torch.eye(H, dtype=torch.float64), orthogonal((H, 3 * H), generator)], 1)
    else:
        Wa = orthogonal((H, 4 * H), generator)
    ab_betas = torch.full((4 * H,), float(initial_beta), dtype=torch.float64)
    ab_betas[H : 2 * H] = 1.0  # forget gate bias (SM:129-132)
    return {
        "h0": torch.zeros(H, dtype=torch.float64),
        "c0": torch.zeros(H, dtype=torch.float64),
        "Wa": Wa,
        "Wx": orthogonal((1, 4 * H), generator),
        "a_gammas": torch.full((4 * H,), float(initial_gamma), dtype=torch.float64),
        "b_gammas": torch.full((4 * H,), float(initial_gamma), dtype=torch.float64),
        "ab_betas": ab_betas,
        "c_gammas": torch.full((H,), float(initial_gamma), dtype=torch.float64),
        "c_betas": torch.full((H,), float(initial_beta), dtype=torch.float64),
        "Wy": orthogonal((H, nclasses), generator),
        "by": torch.zeros(nclasses, dtype=torch.float64),
    }


def ptb_init_params(
    H: int, V: int, generator=None, *, initialization="orthogonal", initial_gamma=0.1
):
    """Initial values of PTB LSTM/BatchNormalization parameters (C: PTB:128-152, 172-211, 338-349).

    initialization "orthogonal"/"identity" use `orthogonal`; "identity" then sets Wa[:H, :H] = I
    (PTB:194-195). All BN gammas = initial_gamma; ALL BN betas start at 0 because
    BatchNormalization is built without initial_beta (PTB:180-182; --initial-beta is unused),
    then bn_a.betas[H:2H] = 1 (PTB:205-209). bn_b has no betas in the graph (use_bias=False).
    ("uniform" = U(-0.02, 0.02) and "glorot" initializers of PTB:341-344 are not transcribed.)
    """
    Wa = orthogonal((H, 4 * H), generator)
    if initialization == "identity":
        Wa[:H, :H] = torch.eye(H, dtype=torch.float64)
    a_betas = torch.zeros(4 * H, dtype=torch.float64)
    a_betas[H : 2 * H] = 1.0
    g = float(initial_gamma)
    return {
        "Wy": orthogonal((H, V), generator),
        "by": torch.zeros(V, dtype=torch.float64),
        "h0": torch.zeros(H, dtype=torch.float64),
        "c0": torch.zeros(H, dtype=torch.float64),
        "Wa": Wa,
        "Wx": orthogonal((V, 4 * H), generator),
        "bn_a.gammas": torch.full((4 * H,), g, dtype=torch.float64),
        "bn_a.betas": a_betas,
        "bn_b.gammas": torch.full((4 * H,), g, dtype=torch.float64),
        "bn_c.gammas": torch.full((H,), g, dtype=torch.float64),
        "bn_c.betas": torch.zeros(H, dtype=torch.float64),
    }


# ----------------------------------------------------------------------------- batch norm


def _bn(x, gammas, betas, eps, baseline, pop=None):
    """Their bn() (C: SM:72-93) / BatchNormalization.construct_graph (C: PTB:154-170).

    Statistics over the batch axis 0 with the BIASED variance (Theano x.var, divide by N);
    eps is added to the variance inside the sqrt. `pop=(mean, var)` replaces the batch
    statistics (use_population_statistics). baseline: y = x + betas, no scaling at all;
    the statistics are still computed and returned. Returns (y, mean, var).
    """
    mean, var = x.mean(0), x.var(0, unbiased=False)
    if baseline:
        return x + betas, mean, var
    m, v = (mean, var) if pop is None else pop
    return (x - m) / torch.sqrt(v + eps) * gammas + betas, mean, var


def _gates(ab, H):
    # (g, f, i, o) column blocks; tanh on g, sigmoid on f, i, o (SM:228-229, PTB:262-263)
    return (
        torch.tanh(ab[:, :H]),
        torch.sigmoid(ab[:, H : 2 * H]),
        torch.sigmoid(ab[:, 2 * H : 3 * H]),
        torch.sigmoid(ab[:, 3 * H :]),
    )


def _pop(popstats, key, t):
    # per-time-step population statistic; beyond the stored length reuse the last (PTB:246-247)
    if popstats is None:
        return None
    m, v = popstats[key + "_mean"], popstats[key + "_var"]
    t = min(t, m.shape[0] - 1)
    return m[t], v[t]


def _stack_stats(stats):
    return {k: torch.stack(v) for k, v in stats.items()}


# -------------------------------------------------------------------------- sequential MNIST


def _seqmnist_forward(p, x, baseline, noise, epsilon, popstats):
    B, T = x.shape
    H = p["h0"].shape[0]
    xtilde = x.unsqueeze(-1) @ p["Wx"]  # (B, T, 4H): x reshaped to (T, B, 1) then dot Wx (SM:241)
    h = p["h0"].expand(B, H) + (0 if noise is None else noise)  # h_prime added to h0 (SM:242-250)
    c = p["c0"].expand(B, H)
    stats = {k: [] for k in ("a_mean", "a_var", "b_mean", "b_var", "c_mean", "c_var")}
    one = 1.0  # baseline passes gammas=1.0 (SM:221-223); irrelevant as baseline skips scaling
    for t in range(T):
        atilde, btilde = h @ p["Wa"], xtilde[:, t]
        ga, gb, gc = (one,) * 3 if baseline else (p["a_gammas"], p["b_gammas"], p["c_gammas"])
        a_n, am, av = _bn(atilde, ga, p["ab_betas"], epsilon, baseline, _pop(popstats, "a", t))
        b_n, bm, bv = _bn(btilde, gb, 0.0, epsilon, baseline, _pop(popstats, "b", t))
        g, f, i, o = _gates(a_n + b_n, H)
        c = f * c + i * g  # the UN-normalized cell recurs (SM:230)
        c_n, cm, cv = _bn(c, gc, p["c_betas"], epsilon, baseline, _pop(popstats, "c", t))
        h = o * torch.tanh(c_n)  # baseline: o * tanh(c + c_betas) (SM:232, 235)
        for k, v in zip(stats, (am, av, bm, bv, cm, cv), strict=True):
            stats[k].append(v)
    return h, _stack_stats(stats)


def seqmnist_lstm_loss(p: dict, x, y, *, baseline: bool, noise=None, epsilon=1e-5, popstats=None):
    """Mean cross-entropy of sequential_mnist.py's LSTM training graph.

    Transcribes C: SM:210-250, 266-275 (LSTM.construct_graph_popstats with
    use_population_statistics False, i.e. per-time-step batch statistics), SM:72-93 (bn),
    SM:298-306 (construct_common_graph: softmax of h_T @ Wy + by, mean categorical CE) and the
    input plumbing of SM:344-347.

    p: h0 (H,), c0 (H,), Wa (H,4H), Wx (1,4H), a_gammas (4H,), b_gammas (4H,), ab_betas (4H,),
       c_gammas (H,), c_betas (H,), Wy (H,10), by (10,). Gate order (g, f, i, o).
    x: (B, T) pixel values (fuel scales MNIST uint8 to [0, 1]); y: (B,) int64 labels.
    baseline=True reproduces `bn` with args.baseline (SM:82-83, 221-223, 231-232): every "BN"
       becomes x + betas, so a-term + ab_betas, b-term unchanged, and h = o*tanh(c + c_betas)
       with c_betas a TRAINED parameter (SM:140); gammas are ignored.
    noise: optional (B, H) added to the initial hidden state only (h_prime, SM:242-245;
       MRG normal with std args.noise, also applied in the inference graph).
    popstats: optional dict a_mean/a_var/b_mean/b_var (T,4H), c_mean/c_var (T,H) to evaluate
       the inference graph instead (use_population_statistics True, SM:76-78, 357-359).
    """
    h, _ = _seqmnist_forward(p, x, baseline, noise, epsilon, popstats)
    return F.cross_entropy(h @ p["Wy"] + p["by"], y)


def seqmnist_lstm_batch_stats(p: dict, x, *, baseline: bool, noise=None, epsilon=1e-5) -> dict:
    """Per-step batch statistics the training graph emits (C: SM:236-238, 266-283).

    Returns a_mean, a_var, b_mean, b_var of shape (T, 4H) and c_mean, c_var (T, H): mean and
    biased variance over the batch of atilde = h_{t-1} @ Wa, btilde = x_t @ Wx and the
    un-normalized cell c_t. These feed the population-statistic EMA (`popstats_ema_update`,
    alpha = 1e-2, initial mean 0 / var 1, SM:255-262, 285-293). Computed in baseline mode too.
    """
    return _seqmnist_forward(p, x, baseline, noise, epsilon, None)[1]


# ----------------------------------------------------------------------------- Penn Treebank


def _ptb_forward(p, x, baseline, epsilon, popstats):
    B, L, _ = x.shape
    H = p["h0"].shape[0]
    h, c = p["h0"].expand(B, H), p["c0"].expand(B, H)
    if baseline:
        popstats = None  # population statistics are never used by the baseline (PTB:239)
    hs, stats = [], {k: [] for k in ("a_mean", "a_var", "b_mean", "b_var", "c_mean", "c_var")}
    for t in range(L):
        atilde, btilde = h @ p["Wa"], x[:, t] @ p["Wx"]  # (PTB:252)
        a_n, am, av = _bn(
            atilde, p["bn_a.gammas"], p["bn_a.betas"], epsilon, baseline, _pop(popstats, "a", t)
        )
        # bn_b has use_bias=False -> betas = 0 (PTB:161, 181)
        b_n, bm, bv = _bn(btilde, p["bn_b.gammas"], 0.0, epsilon, baseline, _pop(popstats, "b", t))
        g, f, i, o = _gates(a_n + b_n, H)  # terms normalized separately (PTB:259-261)
        c = f * c + i * g  # (PTB:264); normalize_cell False -> raw c recurs (PTB:270-271)
        c_n, cm, cv = _bn(
            c, p["bn_c.gammas"], p["bn_c.betas"], epsilon, baseline, _pop(popstats, "c", t)
        )
        h = o * torch.tanh(c_n)  # output uses normalized c (PTB:267-268)
        hs.append(h)
        for k, v in zip(stats, (am, av, bm, bv, cm, cv), strict=True):
            stats[k].append(v)
    return torch.stack(hs, 1), _stack_stats(stats)


def ptb_lstm_loss(p: dict, x_onehot, *, baseline: bool, epsilon=1e-5, popstats=None):
    """Mean cross-entropy (nats/char) of penntreebank.py's LSTM training graph.

    Transcribes C: PTB:128-170 (BatchNormalization), PTB:213-286 (LSTM.construct_graph with
    use_population_statistics False and the default flags: no_normalize_terms_separately
    False, no_normalize_output False, normalize_cell False), PTB:52-58 and 305-314
    (construct_common_graph: softmax(h_t @ Wy + by), CE = -sum(y log yhat), mean over all
    positions) and PTB:357-360 (inputs x[:-1], targets x[1:] along time).

    p: h0, c0 (H,), Wa (H,4H), Wx (V,4H), bn_a.gammas, bn_a.betas (4H,), bn_b.gammas (4H,),
       bn_c.gammas, bn_c.betas (H,), Wy (H,V), by (V,). Gate order (g, f, i, o).
    x_onehot: (B, L, V) float64 one-hot; the loss averages (L-1)*B positions.
    baseline=True: a-term + bn_a.betas, b-term raw, h = o * tanh(c + bn_c.betas) (PTB:162-163).
    popstats: optional (length, .) tensors named a_mean ... c_var for the inference graph;
       steps beyond their length reuse the last row (PTB:239-250).
    """
    x, y = x_onehot[:, :-1], x_onehot[:, 1:]
    hs, _ = _ptb_forward(p, x, baseline, epsilon, popstats)
    logp = torch.log_softmax(hs @ p["Wy"] + p["by"], dim=-1)
    return -(y * logp).sum(-1).mean()


def ptb_lstm_batch_stats(p: dict, x_onehot, *, baseline: bool, epsilon=1e-5) -> dict:
    """Per-step batch statistics of the PTB training graph (C: PTB:225-228, 273, 288-301).

    Same layout as `seqmnist_lstm_batch_stats`, over the L-1 input steps. In the BN model the
    EMA uses alpha = 0.05 (PTB:291); the baseline never creates population statistics (PTB:288).
    """
    return _ptb_forward(p, x_onehot[:, :-1], baseline, epsilon, None)[1]


def popstats_ema_update(popstats: dict, batchstats: dict, alpha: float) -> dict:
    """pop <- alpha * batch + (1 - alpha) * pop, per time step (C: SM:285-293, PTB:288-301).

    alpha = 1e-2 (MNIST) or 0.05 (PTB); initial pop mean 0, var 1. Note the evaluation scripts
    (sequential_mnist_evaluate.py:23-64, penntreebank_evaluate.py:22-52) instead reset the
    popstats to the plain average of batch statistics over one pass of the training set
    (MNIST batch 5000, PTB batch 100 / length 100) before reporting test numbers.
    """
    return {k: alpha * batchstats[k] + (1 - alpha) * popstats[k] for k in popstats}


# ----------------------------------------------------------------------- Blocks step rules


def step_clipping(grads: dict, threshold) -> dict:
    """Blocks StepClipping.compute_steps (BL:679-714).

    One global L2 norm over ALL steps; multiplier = 1 if norm < threshold else threshold/norm.
    """
    with torch.no_grad():
        norm = torch.sqrt(sum((g**2).sum() for g in grads.values()))
        mult = 1.0 if norm < threshold else threshold / norm
        return {k: g * mult for k, g in grads.items()}


def rmsprop_step(param, grad, state: dict, learning_rate, decay_rate, max_scaling=1e5):
    """Blocks RMSProp = CompositeRule([BasicRMSProp, Scale]) (BL:589-676, 452-475).

    ms_t = decay*ms + (1-decay)*g^2 (ms starts at 0, no bias correction);
    step = lr * g / max(sqrt(ms_t), 1/max_scaling) -- no additive epsilon; param - step.
    state key: "mean_square_step_tm1".
    """
    with torch.no_grad():
        ms = state.get("mean_square_step_tm1", torch.zeros_like(grad))
        ms = decay_rate * ms + (1 - decay_rate) * grad**2
        state["mean_square_step_tm1"] = ms
        step = learning_rate * grad / torch.clamp(torch.sqrt(ms), min=1.0 / max_scaling)
        return param - step


def momentum_step(param, grad, state: dict, learning_rate, momentum):
    """Blocks Momentum = CompositeRule([Scale, BasicMomentum]) (BL:478-534).

    The learning rate is applied BEFORE accumulation: v_t = momentum * v + lr * g;
    step = v_t; param - step. state key: "velocity" (starts at 0).
    """
    with torch.no_grad():
        v = momentum * state.get("velocity", torch.zeros_like(grad)) + learning_rate * grad
        state["velocity"] = v
        return param - v


def adam_step(
    param,
    grad,
    state: dict,
    learning_rate,
    beta1=0.1,
    beta2=0.001,
    epsilon=1e-8,
    decay_factor=1 - 1e-8,
):
    """Blocks (pre-2017) Adam.compute_step (BL:837-894 @ 3db89c0).

    beta1/beta2 are ONE MINUS the usual decay rates (0.1 <-> 0.9, 0.001 <-> 0.999).
    t = time + 1 (time starts at 0, one counter per parameter);
    lr_t  = lr * sqrt(1 - (1-beta2)^t) / (1 - (1-beta1)^t)  (bias correction in the step size,
            with the UNdecayed beta1);
    b1t   = 1 - (1-beta1) * decay_factor^(t-1);
    m_t   = b1t * g + (1 - b1t) * m;   v_t = beta2 * g^2 + (1 - beta2) * v;
    step  = lr_t * m_t / (sqrt(v_t) + epsilon)   -- epsilon added to the UNcorrected sqrt(v),
            i.e. equivalent to eps / sqrt(1 - (1-beta2)^t) in the textbook form;
    returns param - step. decay_factor 1-1e-8 is exactly 1.0 in float32 (Blocks 8607adb);
    pass decay_factor=1.0 to mimic the authors' float32 runs. State keys: mean, variance, time.
    """
    with torch.no_grad():
        m = state.get("mean", torch.zeros_like(grad))
        v = state.get("variance", torch.zeros_like(grad))
        t1 = state.get("time", 0.0) + 1
        lr_t = learning_rate * math.sqrt(1.0 - (1.0 - beta2) ** t1) / (1.0 - (1.0 - beta1) ** t1)
        b1t = 1 - (1 - beta1) * decay_factor ** (t1 - 1)
        m = b1t * grad + (1.0 - b1t) * m
        v = beta2 * grad**2 + (1.0 - beta2) * v
        state.update(mean=m, variance=v, time=t1)
        return param - lr_t * m / (torch.sqrt(v) + epsilon)


def composite_step(params: dict, grads: dict, states: dict, rule, *, threshold=1.0, **hyper):
    """CompositeRule([StepClipping(threshold), rule]) + GradientDescent's param -= step.

    (BL:430-449, 193-208.) `rule` is rmsprop_step / adam_step / momentum_step; `states` maps
    parameter names to per-parameter state dicts (created on first use). Returns new params.
    """
    clipped = step_clipping(grads, threshold)
    return {k: rule(params[k], clipped[k], states.setdefault(k, {}), **hyper) for k in params}
