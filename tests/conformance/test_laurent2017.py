"""Conformance with Laurent et al. 2017: the ``laurent`` study's models (the default config
under the ``laurent2017`` recipe, sizes made small) against ref_laurent2017 on the same
weights and batch: loss and every gradient to 1e-10 (float64). The normalized LSTM against a
transcription of the authors' code (their ``norm`` branch); weight norm and layer norm, which
that code does not hold, against the standard definitions the paper cites (Salimans & Kingma;
Ba et al.'s LN-LSTM); batch norm against Cooijmans et al.'s code, which theirs forks."""

import copy
import math

import pytest
import ref_cooijmans2016
import ref_laurent2017 as ref
import torch
import torch.nn.functional as F
from study_models import assert_close, blocks, leaves, study_model, study_params

THEIRS = (2, 1, 0, 3)  # our gate blocks (i, f, g, o) in the authors' order (g, f, i, o)
H, B, T, V = 6, 8, 10, 7


def authors_params(model, norm: str) -> dict:
    """Our model's weights under the reference's names (x @ W, gates g, f, i, o)."""
    layer, head = model.rnn.layers[0], model.head
    h0, c0 = layer.initial
    p = {
        "h0": h0,
        "c0": c0,
        "Wa": blocks(layer.weight_hh, THEIRS).t(),
        "Wx": blocks(layer.weight_ih, THEIRS).t(),
        "ab_betas": blocks(layer.bias, THEIRS),
        "Wy": head.weight.t(),
        "by": head.bias,
    }
    n = layer.norm
    if norm == "normprop":
        p.update(
            a_gammas=blocks(n.g_h[:, 0], THEIRS),
            b_gammas=blocks(n.g_x[:, 0], THEIRS),
            c_gammas=n.c.weight,
            y_gammas=head.gain,
        )
    elif norm == "wn":
        p.update(a_gammas=blocks(n.g_hh[:, 0], THEIRS), b_gammas=blocks(n.g_ih[:, 0], THEIRS))
    elif norm == "ln":
        p.update(
            a_gammas=blocks(n.h.weight, THEIRS),
            a_betas=blocks(n.h.bias, THEIRS),
            b_gammas=blocks(n.x.weight, THEIRS),
            b_betas=blocks(n.x.bias, THEIRS),
            c_gammas=n.c.weight,
            c_betas=n.c.bias,
        )
    elif norm == "bn":
        p.update({
            "bn_a.gammas": blocks(n.h.weight, THEIRS),
            "bn_b.gammas": blocks(n.x.weight, THEIRS),
            "bn_c.gammas": n.c.weight,
            "bn_c.betas": n.c.bias,
        })  # fmt: skip
        p["bn_a.betas"] = p.pop("ab_betas")
    return p


REFERENCE = {
    "normprop": lambda p, x: ref.ptb_normprop_loss(p, x, initial_gamma=0.1),
    "wn": ref.wn_lstm_loss,
    "ln": ref.ln_lstm_loss,
    "bn": lambda p, x: ref_cooijmans2016.ptb_lstm_loss(p, x, baseline=False),
}


@pytest.mark.parametrize("norm", sorted(REFERENCE))
def test_penn_treebank_step_equals_the_authors(norm):
    params = study_params("laurent", "ptb_char", norm, hidden_size=H)
    model = study_model(params, max_steps=T, vocab_size=V)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # every parameter off its initial value
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    tokens = torch.randint(0, V, (B, T + 1))
    logits = model(tokens[:, :-1].t())[0]
    ours = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].t().flatten())
    ours.backward()
    p = leaves(authors_params(model, norm))
    theirs = REFERENCE[norm](p, F.one_hot(tokens, V).double())
    theirs.backward()
    assert_close(ours.detach(), theirs.detach(), "loss")
    grads = copy.deepcopy(model)
    with torch.no_grad():
        for (_, a), (_, b) in zip(model.named_parameters(), grads.named_parameters(), strict=True):
            b.copy_(a.grad)
    expected = authors_params(grads, norm)
    for name, leaf in p.items():
        assert_close(expected[name], leaf.grad, name)


def test_normprop_starts_as_the_authors_does():
    """Every gain from 0.1 (per unit: W_x's and W_h's columns, c_t), the output layer's gains
    from 1/1.21, the variance constants of the code's table (Var[tanh(0.1 z)] = 0.0098)."""
    params = study_params("laurent", "ptb_char", "normprop", hidden_size=H)
    model = study_model(params, max_steps=T, vocab_size=V)
    n = model.rnn.layers[0].norm
    for gains in (n.g_x, n.g_h, n.c.weight):
        assert gains.requires_grad and gains.float().eq(0.1).all()
    assert model.head.gain.float().eq(1 / 1.21).all()
    assert n.std_g == n.std_c == math.sqrt(0.0098)
    assert n.carry_scale == pytest.approx(1 / math.sqrt(2))
