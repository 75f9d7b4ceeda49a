"""Conformance with Cooijmans et al. 2016: the ``cooijmans`` study's models (the default config
under the ``cooijmans2016`` recipe, sizes made small) against ref_cooijmans2016, a float64
transcription of the authors' Theano graphs written from their code: the same weights and
batch give the same loss and gradients (1e-10); the same batch statistics become the same
population statistics; the recipe's optimizer moves the weights as Blocks' step rules with
the paper's settings do. The model runs its default path (the compiled recurrence, or the
fused kernel without a norm)."""

import copy

import pytest
import ref_cooijmans2016 as ref
import torch
import torch.nn.functional as F
from study_models import assert_close, blocks, leaves, study_model, study_params

from normrnn.methods.norms import estimate_population_statistics
from normrnn.pipeline.optim import make_optimizer, parameter_groups

THEIRS = (2, 1, 0, 3)  # our gate blocks (i, f, g, o) in the authors' order (g, f, i, o)
H, B, T, V = 6, 8, 12, 7


# Our names → the Penn Treebank script's names for the same tensors (penntreebank.py:128-211).
PTB_NAMES = {"ab_betas": "bn_a.betas", "a_gammas": "bn_a.gammas", "b_gammas": "bn_b.gammas",
             "c_gammas": "bn_c.gammas", "c_betas": "bn_c.betas"}  # fmt: skip


def ptb_names(p: dict) -> dict:
    return {PTB_NAMES.get(k, k): v for k, v in p.items()}


def authors_params(model, bn: bool) -> dict:
    """Our model's weights under the authors' names (sequential_mnist.py's; ``ptb_names``
    renames them as penntreebank.py does) and layout (x @ W, gates g, f, i, o)."""
    layer = model.rnn.layers[0]
    h0, c0 = layer.initial
    p = {
        "h0": h0,
        "c0": c0,
        "Wa": blocks(layer.weight_hh, THEIRS).t(),
        "Wx": blocks(layer.weight_ih, THEIRS).t(),
        "ab_betas": blocks(layer.bias, THEIRS),
        "Wy": model.head.weight.t(),
        "by": model.head.bias,
    }
    if bn:
        n = layer.norm
        p.update(
            a_gammas=blocks(n.h.weight, THEIRS),
            b_gammas=blocks(n.x.weight, THEIRS),
            c_gammas=n.c.weight,
            c_betas=n.c.bias,
        )
    return p


def baseline_extras(p: dict) -> dict:
    """The authors' baseline graph still takes the BN parameters (unused but c_betas, which our
    LSTM does not have: README, Departures); at zero it adds nothing."""
    return {
        "a_gammas": torch.ones(4 * H, dtype=torch.float64),
        "b_gammas": torch.ones(4 * H, dtype=torch.float64),
        "c_gammas": torch.ones(H, dtype=torch.float64),
        "c_betas": torch.zeros(H, dtype=torch.float64),
    }


def perturb(model, scale=0.3):
    """Move every parameter off its initial value (gains, learned h0/c0 and all), so that no
    term of the comparison sits at zero or one."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))


def compare(model, ours_loss, theirs_fn, bn: bool, names=lambda p: p):
    """Loss and the gradient of every shared parameter, ours against the authors' graph
    (``names`` renames ours to the script's)."""
    ours_loss.backward()
    p = leaves(authors_params(model, bn))
    extra = {} if bn else baseline_extras(p)
    theirs_loss = theirs_fn(names({**p, **extra}))
    theirs_loss.backward()
    assert_close(ours_loss.detach(), theirs_loss.detach(), "loss")
    grads = authors_params(_grads(model), bn)
    for name, leaf in p.items():
        assert_close(grads[name], leaf.grad, name)
    return float(theirs_loss.detach())


def _grads(model):
    """A copy of ``model`` holding its gradients where its parameters were."""
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for (_, p), (_, q) in zip(model.named_parameters(), clone.named_parameters(), strict=True):
            q.copy_(p.grad)
    return clone


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_sequential_mnist_step_equals_the_authors(norm):
    params = study_params("cooijmans", "seqmnist", norm, hidden_size=H)
    model = study_model(params, max_steps=T, num_classes=10, input_size=1)
    perturb(model)
    x = torch.rand(B, T, dtype=torch.float64)
    y = torch.randint(0, 10, (B,))
    torch.manual_seed(7)  # the noise on h0 (BN runs: h0_noise 0.1) from the same draw
    ours = F.cross_entropy(model(x.t().unsqueeze(-1))[0], y)
    torch.manual_seed(7)
    noise = 0.1 * torch.randn(B, H, dtype=torch.float64) if norm == "bn" else None
    assert params.get("h0_noise", 0.0) == (0.1 if norm == "bn" else 0.0)
    loss = compare(
        model,
        ours,
        lambda p: ref.seqmnist_lstm_loss(p, x, y, baseline=norm == "none", noise=noise),
        bn=norm == "bn",
    )
    assert 0.5 < loss < 10


@pytest.mark.parametrize("norm", ["none", "bn"])
def test_penn_treebank_step_equals_the_authors(norm):
    params = study_params("cooijmans", "ptb_char", norm, hidden_size=H)
    assert params["input_encoding"] == "onehot" and params["train_batching"] == "crops"
    model = study_model(params, max_steps=T, vocab_size=V)
    perturb(model)
    tokens = torch.randint(0, V, (B, T + 1))
    ours = F.cross_entropy(model(tokens[:, :-1].t())[0].flatten(0, 1), tokens[:, 1:].t().flatten())
    onehot = F.one_hot(tokens, V).double()
    theirs = lambda p: ref.ptb_lstm_loss(p, onehot, baseline=norm == "none")  # noqa: E731
    compare(model, ours, theirs, norm == "bn", names=ptb_names)


def test_population_statistics_are_the_mean_of_the_authors_batch_statistics():
    """Cooijmans et al.'s population statistics: the mean over training batches of each
    step's batch statistics of W_h h, W_x x and c_t (penntreebank_evaluate.py:23-52)."""
    params = study_params("cooijmans", "ptb_char", "bn", hidden_size=H)
    model = study_model(params, max_steps=T, vocab_size=V)
    perturb(model)
    batches = [torch.randint(0, V, (B, T + 1)) for _ in range(3)]
    estimate_population_statistics(model, batches, lambda b: model(b[:, :-1].t()))
    p = ptb_names(authors_params(model, bn=True))
    stats = [ref.ptb_lstm_batch_stats(p, F.one_hot(b, V).double(), baseline=False) for b in batches]
    mean = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]}
    n = model.rnn.layers[0].norm
    for term, key, order in (("h", "a", THEIRS), ("x", "b", THEIRS), ("c", "c", None)):
        bn = getattr(n, term)
        got_mean = bn.running_mean if order is None else blocks(bn.running_mean, order, dim=1)
        got_var = bn.running_stat if order is None else blocks(bn.running_stat, order, dim=1)
        assert_close(got_mean, mean[f"{key}_mean"].detach(), f"{term} mean")
        assert_close(got_var, mean[f"{key}_var"].detach(), f"{term} variance")


def test_initialisation_is_the_authors():
    """Sequential MNIST: the identity in the candidate block of W_h, the other three blocks one
    orthogonal matrix; W_x one unit column; the forget bias 1; h0, c0 zero and trained; BN
    gains 0.1. Penn Treebank: W_h and W_x orthogonal as whole matrices, Wy orthogonal."""
    eye = torch.eye(H, dtype=torch.float64)
    for norm in ("none", "bn"):
        params = study_params("cooijmans", "seqmnist", norm, hidden_size=H)
        layer = study_model(params, max_steps=T, num_classes=10, input_size=1).rnn.layers[0]
        i, f, g, o = layer.weight_hh.detach().chunk(4, 0)
        assert torch.equal(g, eye)
        rest = torch.cat([i, f, o])
        assert_close(rest.t() @ rest, eye, "i, f, o blocks orthonormal", tol=1e-6)
        assert float(layer.weight_ih.detach().norm()) == pytest.approx(1.0)
        assert layer.bias[H : 2 * H].eq(1).all() and layer.bias[:H].eq(0).all()
        assert layer.initial.requires_grad and layer.initial.eq(0).all()
        if norm == "bn":
            assert layer.norm.h.weight.float().eq(0.1).all()
            assert layer.norm.c.weight.float().eq(0.1).all()
    params = study_params("cooijmans", "ptb_char", "none", hidden_size=H)
    model = study_model(params, max_steps=T, vocab_size=V)
    layer = model.rnn.layers[0]
    for w in (layer.weight_hh, layer.weight_ih):
        w = w.detach()
        assert_close(w.t() @ w, torch.eye(w.shape[1], dtype=torch.float64), "orthonormal", tol=1e-6)
    w = model.head.weight.detach()  # (V, H): orthonormal along its shorter side
    gram = w.t() @ w if V > H else w @ w.t()
    assert_close(gram, torch.eye(min(V, H), dtype=torch.float64), "Wy orthogonal", tol=1e-6)


def _steps(model, params, grads: list[dict]) -> list[dict]:
    """Our optimizer, as a train job builds it from the run's params, over given gradients;
    the weights after each step."""
    extra = {k: params[k] for k in ("momentum", "alpha") if k in params}
    opt = make_optimizer(
        params["optimizer"], parameter_groups(model, params), params["lr"], **extra
    )
    out = []
    for g in grads:
        for name, p in model.named_parameters():
            p.grad = g[name].clone()
        torch.nn.utils.clip_grad_norm_(model.parameters(), params["clip"])
        opt.step()
        out.append({n: p.detach().clone() for n, p in model.named_parameters()})
    return out


@pytest.mark.parametrize("task", ["seqmnist", "ptb_char"])
def test_two_optimizer_steps_are_the_authors(task):
    """Sequential MNIST: clipping at 1, then RMSProp (decay 0.5, the code's) with momentum 0.9
    (the paper's) as Blocks composes them: v = 0.9 v + lr g / rms. Penn Treebank: clipping,
    then Adam (Blocks' parameterisation). Where the libraries differ in their guards, as
    torch's ε (1e-8) added to √v against Blocks' floor √v ≥ 1e-5, and torch's clipping
    dividing by norm + 1e-6 (and Blocks' Adam adds ε to √v before its bias correction), the
    steps agree to about ε over the clipped gradient: below 1e-4 of a coordinate's move for
    the gradients here (README, Departures); with those guards set equal (zero) in both,
    to 1e-10."""
    params = study_params("cooijmans", task, "bn", hidden_size=H)
    kw = {"num_classes": 10, "input_size": 1} if task == "seqmnist" else {"vocab_size": V}
    model = study_model(params, max_steps=T, **kw)
    grads = [_gradients(model, seed) for seed in (3, 4)]
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    ours = _steps(model, params, grads)

    def theirs(guards: bool):
        weights, states = dict(start), {}
        out = []
        for grad in grads:
            if task == "seqmnist":
                weights = _rmsprop_momentum(weights, grad, states, params, guards)
            else:
                eps = 1e-8 if guards else 0.0
                weights = ref.composite_step(weights, grad, states, ref.adam_step,
                                             learning_rate=params["lr"], epsilon=eps,
                                             decay_factor=1.0)  # fmt: skip
            out.append(weights)
        return out

    assert task != "seqmnist" or (params["momentum"], params["alpha"]) == (0.9, 0.5)
    for step, expected in zip(ours, theirs(True), strict=True):
        for name, value in expected.items():
            moved = (value - start[name]).abs()
            assert ((step[name] - value).abs() <= 1e-4 * moved + 1e-12).all(), name
    # the same rules without the libraries' guards: exact
    torch.manual_seed(0)
    model = study_model(params, max_steps=T, **kw)
    for group in (opt_groups := parameter_groups(model, params)):
        group.setdefault("lr", params["lr"])
    extra = {k: params[k] for k in ("momentum", "alpha") if k in params}
    opt = make_optimizer(params["optimizer"], opt_groups, params["lr"], eps=0.0, **extra)
    for grad, expected in zip(grads, theirs(False), strict=True):
        for name, p in model.named_parameters():
            p.grad = grad[name].clone()
        _clip_exactly(model.parameters(), params["clip"])
        opt.step()
        for name, p in model.named_parameters():
            assert_close(p.detach(), expected[name], name, tol=1e-10)


def _gradients(model, seed: int, norm: float = 2.0) -> dict:
    """Gradients of total norm ``norm`` (above the clipping threshold 1), every coordinate
    of a similar size: far above the libraries' ε, whose differences the guarded comparison
    bounds."""
    g = torch.Generator().manual_seed(seed)
    grads = {
        n: torch.randn(p.shape, generator=g, dtype=p.dtype).sign()
        * torch.empty(p.shape, dtype=p.dtype).uniform_(0.5, 1.0, generator=g)
        for n, p in model.named_parameters()
    }
    total = torch.linalg.vector_norm(torch.cat([v.flatten() for v in grads.values()]))
    return {n: v * (norm / total) for n, v in grads.items()}


def _clip_exactly(parameters, threshold):
    """Blocks' StepClipping: scale by threshold / norm where the norm exceeds it."""
    grads = [p.grad for p in parameters]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    if norm > threshold:
        for grad in grads:
            grad.mul_(threshold / norm)


def _rmsprop_momentum(weights, grads, states, params, guards: bool):
    """CompositeRule([StepClipping(1), RMSProp(lr, decay 0.5), Momentum(1, 0.9)]) from the
    transcribed Blocks rules: the momentum accumulates RMSProp's steps."""
    clipped = ref.step_clipping(grads, params["clip"])
    out = {}
    for name, w in weights.items():
        state = states.setdefault(name, {"rms": {}, "momentum": {}})
        scaling = 1e5 if guards else float("inf")
        step = w - ref.rmsprop_step(w, clipped[name], state["rms"], params["lr"],
                                    params["alpha"], max_scaling=scaling)  # fmt: skip
        out[name] = ref.momentum_step(w, step, state["momentum"], 1.0, params["momentum"])
    return out
