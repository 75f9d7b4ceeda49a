"""Tasks: what a run trains on and how its batches, losses and scores are made.

A task serves the batches of a split and turns a model's output into a loss. Language models
have three protocols, for training (``train_batching``) and for validation and test
(``valid_protocol``, ``test_protocol``):

* ``contiguous``: the split as ``batch`` parallel streams cut into chunks of ``seq_len``
  steps, the hidden state carried from chunk to chunk (``carry_state``; the project's and
  Hou et al.'s);
* ``crops``: independent examples of ``seq_len + 1`` symbols (``seq_len`` predictions each),
  each from the initial state; in training a random offset in [0, seq_len] each epoch and
  the examples shuffled (Cooijmans et al.'s and Laurent et al.'s ``augment``); in evaluation
  from offset 0 in order (Laurent et al.'s "length-100 subsequences" of the validation set);
* ``whole``: the split as one sequence at batch 1, fed in chunks of ``seq_len`` with the state
  carried and the step index counting on, so that per-step batch norm uses step ``T_max``'s
  statistics beyond T_max (Cooijmans et al.'s test on the whole test sequence).

Evaluation batches hold ``eval_batch_size`` sequences (default: ``batch_size``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .data import (
    IGNORE,
    classification_batches,
    crop_examples,
    lm_batches,
    load_meta,
    load_split,
    variable_length_batches,
)

LN2 = math.log(2)
LM_PROTOCOLS = ("contiguous", "crops", "whole")


class Chunk(tuple):
    """A language-model batch: (inputs, targets[, mask]), each (T, B), with ``t0`` the index
    of its first step in its sequence and ``fresh`` whether it starts from the initial state."""

    def __new__(cls, parts, t0: int = 0, fresh: bool = False):
        chunk = super().__new__(cls, parts)
        chunk.t0, chunk.fresh = t0, fresh
        return chunk


class ClassificationTask:
    metric, higher_is_better = "accuracy", True

    def __init__(self, meta, params, data_dir):
        self.meta, self.params = meta, params
        self.splits = {s: load_split(data_dir, s, meta) for s in ("train", "valid", "test")}

    def model_kwargs(self):
        return {"num_classes": self.meta["num_classes"], "input_size": self.meta["input_size"]}

    @property
    def max_steps(self):
        return self.meta["seq_len"]

    def batches(self, split, epoch=0, seed=0):
        d = self.splits[split]
        if split == "train":
            g = torch.Generator().manual_seed(seed * 100_003 + epoch)
            return classification_batches(d["x"], d["y"], self.params["batch_size"], g)
        size = self.params.get("eval_batch_size") or self.params["batch_size"]
        return classification_batches(d["x"], d["y"], size)

    def population_batches(self, seed=0):
        """Training batches in a fixed order at ``population_batch_size``, the batches whose
        statistics the population statistics average."""
        d = self.splits["train"]
        size = self.params.get("population_batch_size") or self.params["batch_size"]
        g = torch.Generator().manual_seed(seed * 100_003)
        return classification_batches(d["x"], d["y"], size, g)

    def loss(self, model, batch, state, device):
        x, y = batch
        logits = model(x.to(device))[0]
        return (
            F.cross_entropy(logits, y.to(device)),
            None,
            (logits.argmax(1).cpu() == y).sum().item(),
            len(y),
        )

    def score(self, total_loss, correct, count):
        return total_loss / count, correct / count


class LanguageModelTask:
    def __init__(self, meta, params, data_dir):
        self.meta, self.params = meta, params
        self.splits = {s: load_split(data_dir, s, meta)["ids"] for s in ("train", "valid", "test")}
        self.metric = "bpc" if meta["kind"] == "char" else "perplexity"
        self.higher_is_better = False
        for key in ("train_batching", "valid_protocol", "test_protocol"):
            if params.get(key, "contiguous") not in LM_PROTOCOLS:
                raise ValueError(f"{key} must be one of {LM_PROTOCOLS}, got {params[key]!r}")

    def model_kwargs(self):
        return {"vocab_size": self.meta["vocab_size"]}

    @property
    def max_steps(self):
        return self.params["seq_len"]

    @property
    def variable_length(self) -> bool:
        return self.params.get("train_lengths", "fixed") != "fixed"

    def protocol(self, split: str) -> str:
        key = "train_batching" if split == "train" else f"{split}_protocol"
        return self.params.get(key, "contiguous")

    def batches(self, split, epoch=0, seed=0, seq_len=None):
        """The split's batches under its protocol (module docstring); with
        ``train_lengths: variable[_unmasked]`` the training chunks are variable-length
        sequences (inputs, targets, mask), see
        :func:`~normrnn.pipeline.data.variable_length_batches`.
        ``seq_len`` overrides the chunk length (longer test sequences)."""
        steps = seq_len or self.params["seq_len"]
        train = split == "train"
        size = self.params["batch_size"] if train else self.eval_batch_size
        protocol = self.protocol(split)
        ids = self.splits[split]
        if protocol == "whole":
            x, y = ids[:-1].view(-1, 1), ids[1:].view(-1, 1)
            return [
                Chunk((x[i : i + steps], y[i : i + steps]), t0=i) for i in range(0, len(x), steps)
            ]
        if protocol == "crops":
            g = torch.Generator().manual_seed(seed * 100_003 + epoch) if train else None
            return self._crops(ids, steps, size, g)
        chunks = lm_batches(ids, size, steps)
        if not train or not self.variable_length:
            return chunks
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        return variable_length_batches(chunks, g)

    @property
    def eval_batch_size(self) -> int:
        return self.params.get("eval_batch_size") or self.params["batch_size"]

    def _crops(self, ids, steps, size, generator):
        """Batches of independent examples of ``steps + 1`` symbols: with ``generator`` from a
        random offset and shuffled, one example fewer (penntreebank.py's ``augment``), else
        from offset 0 in order."""
        length = steps + 1
        if generator is None:
            examples = crop_examples(ids, length, 0, drop_last=False)
            order = torch.arange(len(examples))
        else:
            offset = int(torch.randint(length, (), generator=generator))
            examples = crop_examples(ids, length, offset, drop_last=True)
            order = torch.randperm(len(examples), generator=generator)
        return [
            Chunk((examples[idx, :-1].t(), examples[idx, 1:].t()), fresh=True)
            for idx in order.split(size)
            if len(idx) > 1  # batch statistics need at least two examples
        ]

    def population_batches(self, seed=0):
        """Training batches without augmentation at ``population_batch_size``: what the
        population statistics average (penntreebank_evaluate.py: crops at batch 100)."""
        size = self.params.get("population_batch_size") or self.params["batch_size"]
        if self.protocol("train") == "crops":
            return self._crops(self.splits["train"], self.params["seq_len"], size, None)
        return lm_batches(self.splits["train"], size, self.params["seq_len"])

    def loss(self, model, batch, state, device):
        """Mean cross-entropy over the real (unpadded) targets, the number of targets
        predicted right and their count. Variable-length sequences and crops start from the
        initial state; ``variable_unmasked`` hides the mask from the batch norms (their
        statistics then include the padding: the ablation of masked statistics)."""
        x, y, *mask = batch
        fresh = getattr(batch, "fresh", False)
        if mask or fresh:  # a variable-length batch or a crop: from the initial state
            state = None
        use_mask = mask and self.params["train_lengths"] == "variable"
        t0 = getattr(batch, "t0", 0)
        logits, state = model(x.to(device), state, mask[0].to(device) if use_mask else None, t0)
        carry = self.params.get("carry_state", True) and not self.variable_length and not fresh
        state = _detach(state) if carry else None
        y = y.to(device).flatten()
        logits = logits.flatten(0, 1)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
        correct = int(((logits.argmax(-1) == y) & (y != IGNORE)).sum())
        return loss, state, correct, int((y != IGNORE).sum())

    def score(self, total_loss, correct, count):
        nll = total_loss / count
        return nll, nll / LN2 if self.metric == "bpc" else math.exp(min(nll, 700))


def _detach(state):
    if isinstance(state, torch.Tensor):
        return state.detach()
    return type(state)(_detach(s) for s in state)


def make_task(data_dir, params):
    meta = load_meta(data_dir)
    cls = ClassificationTask if meta["kind"] == "classification" else LanguageModelTask
    return cls(meta, params, data_dir)
