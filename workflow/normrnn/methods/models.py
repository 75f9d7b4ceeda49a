"""Task models: language models (char/word) and sequence classifiers, built by name.

The output layer (``head``): ``head_init`` ``default`` (torch's Linear), ``orthogonal``
(Cooijmans et al.), ``uniform`` (U(±0.1), Hou et al.); ``head_norm`` normalizes each class's
weight vector and scales it by a trained gain from ``head_gain_init`` (Laurent et al.'s
normalized output layer, gains from 1/1.21). A language model reads tokens through a
learned embedding (``input_encoding: embedding``) or as one-hot vectors (``onehot``: Cooijmans
et al., Laurent et al. and Hou et al. on characters; W_x then has a column per symbol).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from .cells import StackedRNN

MODELS = Registry("model kind")
HEAD_INITS = ("default", "orthogonal", "uniform")


class NormalizedLinear(nn.Linear):
    """A linear layer whose output j is ``g_j w_j·h / ||w_j|| + b_j`` (weight-normalized rows
    with trained gains ``gain``)."""

    def __init__(self, in_features, out_features, gain_init=1.0):
        super().__init__(in_features, out_features)
        self.gain = nn.Parameter(torch.full((out_features,), float(gain_init)))

    def forward(self, h):
        w = self.weight / self.weight.norm(dim=1, keepdim=True)
        return F.linear(h, w * self.gain[:, None], self.bias)


def make_head(hidden_size, classes, head_init="default", head_norm=False, head_gain_init=1.0):
    head = (
        NormalizedLinear(hidden_size, classes, head_gain_init)
        if head_norm
        else nn.Linear(hidden_size, classes)
    )
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
    with torch.no_grad():
        if head_init == "orthogonal":
            nn.init.orthogonal_(head.weight)
            head.bias.zero_()
        elif head_init == "uniform":
            head.weight.uniform_(-0.1, 0.1)
            head.bias.zero_()
    return head


def _head_kw(kw: dict) -> dict:
    return {k: kw.pop(k) for k in ("head_init", "head_norm", "head_gain_init") if k in kw}


@MODELS.register("char_lm")
@MODELS.register("word_lm")
class LanguageModel(nn.Module):
    """Embedding (or one-hot) → recurrent stack → softmax over the vocabulary.

    Input (T, B) token ids (and an optional (T, B) ``mask`` of real positions for
    variable-length batches); output ``(logits, states)`` with logits (T, B, vocab). ``t0``
    is the index of the first step (a long sequence fed in parts).
    """

    def __init__(
        self,
        vocab_size,
        hidden_size,
        emb_size=None,
        num_layers=1,
        dropout=0.0,
        input_encoding="embedding",
        **rnn_kw,
    ):
        super().__init__()
        if input_encoding not in ("embedding", "onehot"):
            raise ValueError(f"input_encoding must be embedding or onehot, got {input_encoding!r}")
        head_kw = _head_kw(rnn_kw)
        self.vocab_size = vocab_size
        if input_encoding == "onehot":
            self.embed, emb_size = None, vocab_size
        else:
            emb_size = emb_size or hidden_size
            self.embed = nn.Embedding(vocab_size, emb_size)
            if head_kw.get("head_init") == "uniform":  # Hou et al.: the embedding too
                nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        self.drop = nn.Dropout(dropout)
        self.rnn = StackedRNN(emb_size, hidden_size, num_layers, dropout=dropout, **rnn_kw)
        self.head = make_head(hidden_size, vocab_size, **head_kw)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.embed is None:
            return F.one_hot(tokens, self.vocab_size).to(self.head.weight.dtype)
        return self.embed(tokens)

    def forward(self, tokens: torch.Tensor, states=None, mask=None, t0=0):
        h, states = self.rnn(self.drop(self.encode(tokens)), states, mask, t0)
        return self.head(self.drop(h)), states


@MODELS.register("classifier")
class SequenceClassifier(nn.Module):
    """Sequence (T, B, input_size) → recurrent stack → last h → logits (B, num_classes)."""

    def __init__(self, num_classes, hidden_size, input_size=1, num_layers=1, dropout=0.0, **rnn_kw):
        super().__init__()
        head_kw = _head_kw(rnn_kw)
        self.rnn = StackedRNN(input_size, hidden_size, num_layers, dropout=dropout, **rnn_kw)
        self.head = make_head(hidden_size, num_classes, **head_kw)

    def forward(self, x: torch.Tensor, states=None):
        h, states = self.rnn(x, states)
        return self.head(h[-1]), states


def build_model(
    kind: str,
    vocab_size: int | None = None,
    hidden_size: int = 128,
    norm="none",
    quant="fp",
    **more,
):
    """Build a task model by name.

    ``kind``: ``char_lm``/``word_lm`` (``vocab_size`` tokens) or ``classifier`` (``vocab_size``
    or ``num_classes`` classes, ``input_size`` features per step). Other keywords go to the
    recurrent layers: ``cell`` (lstm, gru, rnn_tanh), ``num_layers``, ``max_steps`` (T_max for
    per-step batch statistics), ``norm_opts``, ``init``, ``init_scale``, ``hh_init``,
    ``forget_bias``, ``learn_initial_state``, ``h0_noise``, ``dropout``; and to the output
    layer: ``head_init``, ``head_norm``, ``head_gain_init``; language models also take
    ``input_encoding``.
    """
    cls = MODELS[kind]
    if cls is SequenceClassifier:
        num_classes = more.pop("num_classes", vocab_size)
        return cls(num_classes=num_classes, hidden_size=hidden_size, norm=norm, quant=quant, **more)
    if vocab_size is None:
        raise ValueError(f"build_model(kind={kind!r}) needs vocab_size")
    return cls(vocab_size=vocab_size, hidden_size=hidden_size, norm=norm, quant=quant, **more)


def recurrent_layers(model: nn.Module):
    from .cells import RecurrentLayer

    return [m for m in model.modules() if isinstance(m, RecurrentLayer)]


def model_bits(model: nn.Module) -> int:
    """Storage in bits: quantized recurrent weights at their bit width, the rest in float32."""
    bits, quantized = 0, set()
    for layer in recurrent_layers(model):
        for w in (layer.weight_ih, layer.weight_hh):
            bits += layer.quant.storage_bits(w.numel(), layer.gates)
            quantized.add(id(w))
    return bits + 32 * sum(p.numel() for p in model.parameters() if id(p) not in quantized)


# The buffers that hold a model's own numbers (population statistics), not bookkeeping.
STATE_BUFFERS = ("running_mean", "running_stat")


def recurrent_size_kb(model: nn.Module) -> float:
    """The recurrent layers' storage in KiB, as Hou et al.'s tables count a model's size: the
    quantized weights at their bit width (with their scales), and in float32 the biases, the
    norms' parameters and their population statistics (per step for per-step batch norm);
    not the embedding or the output layer."""
    bits = 0
    for layer in recurrent_layers(model):
        weights = {id(layer.weight_ih), id(layer.weight_hh)}
        for w in (layer.weight_ih, layer.weight_hh):
            bits += layer.quant.storage_bits(w.numel(), layer.gates)
        bits += 32 * sum(p.numel() for p in layer.parameters() if id(p) not in weights)
        bits += 32 * sum(
            b.numel()
            for name, b in layer.named_buffers()
            if name.rsplit(".", 1)[-1] in STATE_BUFFERS
        )
    return bits / 8 / 1024
