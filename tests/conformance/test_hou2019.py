"""Conformance with Hou et al. 2019: the ``hou`` study's models (the default config under the
``hou2019`` recipe, sizes made small) against ref_hou2019, a float64 transcription of the
authors' PyTorch code written from it: for none/wn/ln/bn_shared/bn × fp/bc/tc the same weights
and batch give the same loss, the same gradients (reaching the full-precision weights
straight through the quantizer) and the same running statistics (1e-10); weight norm with
binary weights starts at the full-precision scale; the parameter groups and learning-rate
rules are main_lm.py's."""

import copy
import math

import pytest
import ref_hou2019 as ref
import torch
import torch.nn.functional as F
from study_models import assert_close, leaves, study_model, study_params

from normrnn.pipeline.diagnostics import largest_singular_value
from normrnn.pipeline.optim import (
    make_optimizer,
    make_scheduler,
    parameter_groups,
    recurrent_weights,
)

H, B, T, V = 5, 8, 6, 7
METHOD = {"fp": None, "bc": "binary_connect", "tc": "ternary_connect"}
HOU_NORM = {"none": "", "wn": "weight", "ln": "layer", "bn": "batch", "bn_shared": "batch"}


def authors_params(model, norm: str, quant: str) -> dict:
    """Our model under model_lm.py's names; gates in torch's order (i, f, a, o) on both sides."""
    layer, n = model.rnn.layers[0], model.rnn.layers[0].norm
    p = {"bias_ih_l0": layer.bias, "decoder.weight": model.head.weight,
         "decoder.bias": model.head.bias}  # fmt: skip
    if quant == "fp":
        p.update(weight_ih_l0=layer.weight_ih, weight_hh_l0=layer.weight_hh)
    else:
        p.update(
            weight_ih_l0_full_precision=layer.weight_ih, weight_hh_l0_full_precision=layer.weight_hh
        )
    gates = list(zip(ref.GATES, range(4), strict=True))
    if norm == "wn":
        for g, k in gates:
            p[f"g_{g}ih"], p[f"g_{g}hh"] = n.g_ih.chunk(4)[k], n.g_hh.chunk(4)[k]
    elif norm == "ln" or norm == "bn_shared":
        prefix = "ln" if norm == "ln" else "bn"
        for g, k in gates:
            for term, side in ((n.x, "ih"), (n.h, "hh")):
                p[f"{prefix}_{g}{side}_w"] = term.weight.chunk(4)[k]
                p[f"{prefix}_{g}{side}_b"] = term.bias.chunk(4)[k]
    elif norm == "bn":
        for term, side in ((n.x, "ih"), (n.h, "hh")):
            p[f"bn_{side}_w"], p[f"bn_{side}_b"] = term.weight, term.bias
    return p


def running(model, norm: str) -> dict:
    """Our running statistics under the reference's names (the variance: running_stat)."""
    n = model.rnn.layers[0].norm
    out = {}
    if norm not in ("bn", "bn_shared"):
        return out
    for term, side in ((n.x, "ih"), (n.h, "hh")):
        if norm == "bn":
            out[f"bn_{side}_running_mean"] = term.running_mean
            out[f"bn_{side}_running_var"] = term.running_stat
        else:
            for g, k in zip(ref.GATES, range(4), strict=True):
                out[f"bn_{g}{side}_running_mean"] = term.running_mean[0].chunk(4)[k]
                out[f"bn_{g}{side}_running_var"] = term.running_stat[0].chunk(4)[k]
    return out


CASES = [(n, q) for n in ("none", "wn", "ln", "bn_shared", "bn") for q in ("fp", "bc", "tc")]


@pytest.mark.parametrize("norm,quant", CASES)
def test_char_lm_step_equals_the_authors(norm, quant):
    params = study_params("hou", "ptb_char", norm, quant, hidden_size=H)
    assert params["input_encoding"] == "onehot" and params["init"] == "uniform"
    model = study_model(params, max_steps=T, vocab_size=V)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every parameter off its initial value
        for p in model.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    before = {k: v.detach().clone() for k, v in running(model, norm).items()}
    tokens = torch.randint(0, V, (T + 1, B))
    logits = model(tokens[:-1])[0]
    ours = F.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten())
    ours.backward()
    p = leaves(authors_params(model, norm, quant))
    p.update(before)
    shared = norm == "bn_shared"
    out, _, stats = ref.lstm_sequence(
        p, torch.eye(V, dtype=torch.float64)[tokens[:-1]], torch.zeros(B, H, dtype=torch.float64),
        torch.zeros(B, H, dtype=torch.float64), norm=HOU_NORM[norm], shared=shared,
        method=METHOD[quant],
    )  # fmt: skip
    theirs = F.cross_entropy(out.flatten(0, 1) @ p["decoder.weight"].t() + p["decoder.bias"],
                             tokens[1:].flatten())  # fmt: skip
    theirs.backward()
    assert_close(ours.detach(), theirs.detach(), "loss")
    grads = copy.deepcopy(model)
    with torch.no_grad():
        for (_, a), (_, b) in zip(model.named_parameters(), grads.named_parameters(), strict=True):
            b.copy_(a.grad)
    expected = authors_params(grads, norm, quant)
    for name, leaf in p.items():
        if leaf.grad is not None:
            assert_close(expected[name], leaf.grad, name)
    for name, value in running(model, norm).items():
        assert_close(value, stats[name], name)


def test_the_reference_loss_is_their_char_lm():
    """ref.char_lm_loss (their RNNModel) and the loss built above from ref.lstm_sequence agree,
    so the comparison above is with their whole model."""
    params = study_params("hou", "ptb_char", "bn", "bc", hidden_size=H)
    model = study_model(params, max_steps=T, vocab_size=V)
    tokens = torch.randint(0, V, (T + 1, B))
    p = leaves(authors_params(model, "bn", "bc"))
    p.update({k: v.detach().clone() for k, v in running(model, "bn").items()})
    whole = ref.char_lm_loss(p, tokens[:-1], tokens[1:], V, norm="batch", method="binary_connect")
    logits = model(tokens[:-1])[0]
    assert_close(F.cross_entropy(logits.flatten(0, 1), tokens[1:].flatten()).detach(),
                 whole.detach(), "loss")  # fmt: skip


def test_weight_norm_with_binary_weights_starts_at_the_full_precision_scale():
    """Hou et al.'s gains start at the full-precision weights' row norms (model_lm.py:94,
    155-164), so W_hh's effective spectral norm with BinaryConnect starts near the
    full-precision one's; gains from the binary rows' norms (√H each) start it √(3H) times
    larger, the exploding regime the paper argues against."""
    hidden = 128
    lam = {}
    for quant in ("fp", "bc"):
        params = study_params("hou", "ptb_char", "wn", quant, hidden_size=hidden)
        layer = study_model(params, max_steps=T, vocab_size=V).rnn.layers[0]
        lam[quant] = largest_singular_value(layer.effective_weights()[1])
        expected = ref.weightnorm_gain(layer.weight_hh.detach())
        assert_close(layer.norm.g_hh.detach(), expected, "gains: full-precision row norms", 1e-6)
    params = study_params("hou", "ptb_char", "wn", "bc", hidden_size=hidden)
    params["norm_opts"] = {"wn": {"gain_init": "quantized"}}
    quantized_gains = largest_singular_value(
        study_model(params, max_steps=T, vocab_size=V).rnn.layers[0].effective_weights()[1]
    )
    assert lam["bc"] == pytest.approx(lam["fp"], rel=0.15)
    assert quantized_gains > 5 * lam["bc"]


@pytest.mark.parametrize("task,quant", [("ptb_word", "bc"), ("ptb_word", "tc"), ("ptb_word", "fp"),
                                        ("ptb_char", "bc")])  # fmt: skip
def test_parameter_groups_and_learning_rates_are_main_lm(task, quant):
    """One optimizer step moves each parameter by its own group's learning rate (SGD without
    momentum, word level: the recurrent weights at lr × 2√H for BinaryConnect and
    TerConnect), and the groups are main_lm.py's: the quantized weights, and the rest."""
    params = study_params("hou", task, "ln", quant, hidden_size=H)
    kw = {"vocab_size": V}
    model = study_model(params, max_steps=T, **kw)
    groups = parameter_groups(model, params)
    named = dict(model.named_parameters())
    names = {id(p): n for n, p in named.items()}
    ours = {names[id(p)]: g.get("lr", params["lr"]) for g in groups for p in g["params"]}
    theirs_names = [n + ("_full_precision" if id(named[n]) in map(id, recurrent_weights(model))
                         else "") for n in named]  # fmt: skip
    theirs = {}
    for group, lr in ref.param_groups(theirs_names, METHOD[quant] or "", task.endswith("char"),
                                      False, H, params["lr"]):  # fmt: skip
        for name in group:
            theirs[name.replace("_full_precision", "")] = lr
    assert ours == theirs
    if task == "ptb_word":
        expect = 2 * math.sqrt(H) * params["lr"] if quant != "fp" else params["lr"]
        assert {ours[n] for n in ("rnn.layers.0.weight_ih", "rnn.layers.0.weight_hh")} == {expect}
        opt = make_optimizer(params["optimizer"], groups, params["lr"], momentum=params["momentum"])
        start = {n: p.detach().clone() for n, p in named.items()}
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        for n, p in named.items():
            assert_close(start[n] - p.detach(), torch.full_like(p, ours[n]), n)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")  # (no step taken)
@pytest.mark.parametrize("task", ["ptb_char", "text8", "ptb_word"])
def test_learning_rate_rules_over_epochs_are_main_lm(task):
    """Adam on characters: ×0.98 after every epoch past the 10th, to the quantized weights'
    group only, never on text8; SGD on words: both groups ÷4 when the validation loss does
    not improve. Our scheduler over 16 epochs against their rule, epoch by epoch."""
    params = study_params("hou", task, "bn", "bc", hidden_size=H)
    model = study_model(params, max_steps=T, vocab_size=V)
    extra = {"momentum": params["momentum"]} if "momentum" in params else {}
    opt = make_optimizer(
        params["optimizer"], parameter_groups(model, params), params["lr"], **extra
    )
    sched = make_scheduler(opt, params)
    theirs = [g["lr"] for g in opt.param_groups]
    losses = [5.0, 4.0, 4.5, 3.9, 3.9, 3.0, 3.2, 2.9, 2.8, 2.9, 2.7, 2.6, 2.65, 2.5, 2.4, 2.45]
    best = math.inf
    for epoch, loss in enumerate(losses, 1):
        if params["optimizer"] == "sgd":
            sched.step(loss)
        else:
            sched.step()
        improved = loss < best
        best = min(best, loss)
        theirs = ref.next_lrs(theirs, epoch, params["optimizer"], task, improved, 4.0)
        ours = [g["lr"] for g in opt.param_groups]
        assert ours == pytest.approx(theirs, rel=1e-12), f"epoch {epoch}"
