"""Task models: language models (char/word) and sequence classifiers, built by name."""

from __future__ import annotations

import torch
from torch import nn

from .cells import StackedRNN
from .registry import Registry

MODELS = Registry("model kind")


@MODELS.register("char_lm")
@MODELS.register("word_lm")
class LanguageModel(nn.Module):
    """Embedding → recurrent stack → softmax over the vocabulary.

    Input (T, B) token ids (and an optional (T, B) ``mask`` of real positions for
    variable-length batches); output ``(logits, states)`` with logits (T, B, vocab).
    """

    def __init__(self, vocab_size, hidden_size, emb_size=None, num_layers=1, dropout=0.0, **rnn_kw):
        super().__init__()
        emb_size = emb_size or hidden_size
        self.embed = nn.Embedding(vocab_size, emb_size)
        self.drop = nn.Dropout(dropout)
        self.rnn = StackedRNN(emb_size, hidden_size, num_layers, dropout=dropout, **rnn_kw)
        self.head = nn.Linear(hidden_size, vocab_size)

    def forward(self, tokens: torch.Tensor, states=None, mask=None):
        h, states = self.rnn(self.drop(self.embed(tokens)), states, mask)
        return self.head(self.drop(h)), states


@MODELS.register("classifier")
class SequenceClassifier(nn.Module):
    """Sequence (T, B, input_size) → recurrent stack → last h → logits (B, num_classes)."""

    def __init__(self, num_classes, hidden_size, input_size=1, num_layers=1, dropout=0.0, **rnn_kw):
        super().__init__()
        self.rnn = StackedRNN(input_size, hidden_size, num_layers, dropout=dropout, **rnn_kw)
        self.head = nn.Linear(hidden_size, num_classes)

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
    recurrent layers: ``cell`` (lstm, gru), ``num_layers``, ``max_steps`` (T_max for per-step
    batch statistics), ``norm_opts``, ``init_scale``, ``hh_init``, ``forget_bias``, ``dropout``.
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
