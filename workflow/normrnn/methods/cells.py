"""Recurrent layers: an LSTM and a GRU with any norm × quantizer, and a stack of them.

Weights use ``torch.nn.LSTM``/``GRU``'s layout and gate order (LSTM: i, f, g, o; GRU: r, z, n)
so that a plain layer can be compared with, and loaded from, the fused modules. Per sequence
the weights are quantized (per gate block) and transformed by the norm once; the input
projection of all steps is one matrix product, normalized before the time loop (on the
``sequence`` path in stacks of steps, or as one block with statistics shared by all steps).

Three paths compute the same function; ``layer.path`` names the one a layer takes:

* ``loop``, the reference: a Python loop over time steps calling the norm's hooks;
* ``fused``, for norms that only transform the weights (``none``, ``wn``): the effective
  weights go into ``torch.lstm``/``torch.gru``, the kernels behind ``nn.LSTM``/``nn.GRU``
  (oneDNN on CPU, cuDNN on GPU), with autograd through the quantizer and the weight norm;
* ``sequence``, for a norm whose steps have a hand-written form (``CellNorm.recurrence``: every
  norm here): the whole recurrence is one autograd node with a hand-written backward
  (``sequence/``).

The loop serves what the others do not: masked batch statistics (a ``mask`` on the sequence
path), low-precision arithmetic under autocast, and recording hidden states for diagnostics,
which need each h_t as a node of the graph.

Initialisation (``init``): ``orthogonal_gates``, each gate block of W_x and W_h orthogonal
(the project's); ``orthogonal``, W_x and W_h orthogonal as whole matrices (Cooijmans et
al., Laurent et al.); ``uniform``, every weight and bias U(±1/√H) (Hou et al., torch's
default). ``hh_init: identity`` puts the identity in the candidate block of W_h, the other
blocks orthogonal (Cooijmans et al.'s ``--init id``). ``learn_initial_state`` trains h_0
(and c_0) from zero; ``h0_noise`` adds N(0, σ²) to h_0 in every forward, in training and
evaluation alike (Cooijmans et al.'s sequential MNIST).
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..compute.paths import choose
from ..compute.sequence import gru_sequence, lstm_sequence
from ..registry import Registry
from .norms import NORMS
from .quantizers import QUANTIZERS, quantize_blocks

CELLS = Registry("cell")


INITS = ("orthogonal_gates", "orthogonal", "uniform")


class RecurrentLayer(nn.Module):
    """One recurrent layer over (T, B, input_size) sequences; subclasses define the step."""

    gates = 1
    candidate_block = 0  # the gate block of the candidate (identity under hh_init identity)
    has_sequence = True  # a sequence Function exists (sequence/)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        norm: str = "none",
        quant: str = "fp",
        max_steps: int = 1,
        norm_opts: dict | None = None,
        init_scale: float = 1.0,
        hh_init: str = "orthogonal",
        forget_bias: float | None = 1.0,
        init: str = "orthogonal_gates",
        learn_initial_state: bool = False,
        h0_noise: float = 0.0,
    ):
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(
                f"sizes must be positive, got input {input_size}, hidden {hidden_size}"
            )
        self.input_size, self.hidden_size = input_size, hidden_size
        self.recorded = None
        self.route = None  # how the last call was computed (paths.choose)
        self.norm_name, self.quant_name = norm, quant
        size = self.gates * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(size, hidden_size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.quant = QUANTIZERS[quant]
        if self.quant.uses_preconditioner:
            # The loss-aware quantizers' diagonal preconditioner, refreshed from the optimizer
            # after each step (see training.update_preconditioners) and saved with the model.
            self.register_buffer("d_ih", torch.ones(size, input_size))
            self.register_buffer("d_hh", torch.ones(size, hidden_size))
        else:
            self.d_ih = self.d_hh = None
        self.norm = NORMS[norm](
            hidden_size=hidden_size, gates=self.gates, max_steps=max_steps, **(norm_opts or {})
        )
        if self.norm.weight_only and hasattr(self, "fused"):
            self.path = "fused"
        elif self.has_sequence and self.norm.recurrence() is not None:
            self.path = "sequence"
        else:
            self.path = "loop"
        states = self.state_count
        self.initial = (
            nn.Parameter(torch.zeros(states, hidden_size)) if learn_initial_state else None
        )
        self.h0_noise = h0_noise
        self.reset_parameters(init_scale, hh_init, forget_bias, init)

    state_count = 1  # (h,) or (h, c)

    @torch.no_grad()
    def reset_parameters(self, init_scale=1.0, hh_init="orthogonal", forget_bias=1.0,
                         init="orthogonal_gates"):  # fmt: skip
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init!r}")
        if hh_init not in ("orthogonal", "identity"):
            raise ValueError(f"hh_init must be 'orthogonal' or 'identity', got {hh_init!r}")
        if init == "uniform":
            bound = 1 / math.sqrt(self.hidden_size)
            for p in self.parameters(recurse=False):
                if p is not self.initial:
                    p.uniform_(-bound, bound)
        else:
            self._orthogonal(self.weight_ih, per_gate=init == "orthogonal_gates")
            self._orthogonal(self.weight_hh, per_gate=init == "orthogonal_gates")
            for p in self.parameters(recurse=False):
                if p.dim() == 1:  # the biases
                    p.zero_()
        if hh_init == "identity":
            blocks = list(self.weight_hh.chunk(self.gates, 0))
            blocks[self.candidate_block].copy_(torch.eye(self.hidden_size))
            rest = [b for i, b in enumerate(blocks) if i != self.candidate_block]
            if rest and init != "orthogonal_gates":  # the other blocks jointly orthogonal
                joint = torch.empty(len(rest) * self.hidden_size, self.hidden_size)
                nn.init.orthogonal_(joint)
                for b, part in zip(rest, joint.chunk(len(rest), 0), strict=True):
                    b.copy_(part)
        self.weight_ih.mul_(init_scale)
        self.weight_hh.mul_(init_scale)
        if forget_bias is not None:
            self._init_bias(forget_bias)
        self.norm.init_weights(*self.quantized_weights(), full=(self.weight_ih, self.weight_hh))

    def _orthogonal(self, w, per_gate):
        for block in w.chunk(self.gates, 0) if per_gate else (w,):
            nn.init.orthogonal_(block)

    def _init_bias(self, forget_bias):
        pass

    def quantized_weights(self):
        w_ih = quantize_blocks(self.quant, self.weight_ih, self.gates, self.d_ih)
        w_hh = quantize_blocks(self.quant, self.weight_hh, self.gates, self.d_hh)
        return w_ih, w_hh

    def effective_weights(self):
        """The weights the recurrence uses: quantized, then transformed by the norm."""
        w_ih, w_hh = self.quantized_weights()
        return self.norm.weight_ih(w_ih), self.norm.weight_hh(w_hh)

    def forward(self, x: torch.Tensor, state=None, mask=None, t0: int = 0):
        """``mask`` (T, B): 1 at real steps, 0 at padding (variable-length sequences); batch
        norms take their statistics over the real steps only. The recurrence itself runs on.
        ``t0``: the index of the first step (a sequence continued from an earlier call whose
        steps count on, as in one long test sequence)."""
        w_ih, w_hh = self.effective_weights()
        if state is None:
            state = self.initial_state(x)
        # (low-precision arithmetic, autocast, runs the reference loop: the fused kernel and
        # the hand-written recurrence keep one dtype throughout)
        self.route, rec = choose(self, x, mask)
        if self.route.path == "fused":
            return self.fused(x, state, w_ih, w_hh)
        if rec is not None and t0:
            rec = dataclasses.replace(rec, t0=t0)
        if rec is not None and rec.input is not None:  # projected and normalized inside
            y, state = self.sequence(rec, x, w_hh, state, self.bias, w_ih)
        else:
            xp = self.input_term(x, w_ih, t0, mask)
            if rec is not None:
                y, state = self.sequence(rec, xp, w_hh, state)
            else:
                y, state = self.loop(xp, state, w_hh, mask, t0)
        self.norm.end_sequence()
        return y, state

    def input_term(self, x, w_ih, t0, mask):
        """The normalized input term with the bias, for all steps (T, B, gates·H)."""
        if self.norm.bias_in_input:  # Zhang's cells: b inside the norm, and once more outside
            return self.norm.input_term(F.linear(x, w_ih, self.bias), t0, mask) + self.bias
        return self.norm.input_term(F.linear(x, w_ih), t0, mask) + self.bias

    def loop(self, xp, state, w_hh, mask, t0=0):
        outputs = []
        masks = [None] * xp.shape[0] if mask is None else mask.unbind(0)
        for t, (xt, mt) in enumerate(zip(xp.unbind(0), masks, strict=True)):
            state = self.step(xt, state, w_hh, t0 + t, mt)
            outputs.append(state[0])
            if self.recorded is not None:  # diagnostics.recording
                self.recorded.append(state[0])
        return torch.stack(outputs), state

    def initial_state(self, x):
        """Zeros, or the learned h_0 (c_0) expanded over the batch; plus ``h0_noise``."""
        batch = x.shape[1]
        if self.initial is None:
            states = [x.new_zeros(batch, self.hidden_size) for _ in range(self.state_count)]
        else:
            states = [s.expand(batch, -1) for s in self.initial.to(x.dtype).unbind(0)]
        if self.h0_noise:
            states[0] = states[0] + self.h0_noise * torch.randn_like(states[0])
        return tuple(states)

    def _train(self) -> bool:
        """The fused kernels' ``train`` flag. Without dropout it changes no number, but cuDNN
        keeps what its backward needs only in training mode: gradients in eval mode (input
        gradients for robustness, say) need it too."""
        return self.training or torch.is_grad_enabled()


@CELLS.register("lstm")
class LSTMLayer(RecurrentLayer):
    """LSTM: c_t = σ(f) c_{t-1} + σ(i) tanh(g); h_t = σ(o) tanh(c_t) with the norm's hooks."""

    gates = 4
    candidate_block = 2
    state_count = 2

    def _init_bias(self, forget_bias):
        self.bias[self.hidden_size : 2 * self.hidden_size].fill_(forget_bias)

    def fused(self, x, state, w_ih, w_hh):
        h, c = state
        params = [w_ih, w_hh, self.bias, torch.zeros_like(self.bias)]
        y, h, c = torch.lstm(
            x, (h.unsqueeze(0), c.unsqueeze(0)), params, True, 1, 0.0, self._train(), False, False
        )
        return y, (h[0], c[0])

    def sequence(self, rec, x, w_hh, state, bias=None, w_ih=None):
        return lstm_sequence(rec, x, w_hh, *state, bias=bias, w_ih=w_ih)

    def step(self, xt, state, w_hh, t, mask=None):
        h, c = state
        i, f, g, o = (xt + self.norm.hidden_term(h @ w_hh.t(), t, mask)).chunk(4, 1)
        carry = self.norm.carry_scale
        kept = torch.sigmoid(f) * c if carry == 1.0 else torch.sigmoid(f) * c * carry
        c = kept + torch.sigmoid(i) * self.norm.candidate(g)
        h = torch.sigmoid(o) * self.norm.cell_output(c, t, mask)
        return h, c


@CELLS.register("gru")
class GRULayer(RecurrentLayer):
    """GRU (torch.nn.GRU's form): n = tanh(x_n + r ⊙ (W_hn h + b_hn)); h' = (1-z) n + z h.

    ``bias`` holds b_ir + b_hr, b_iz + b_hz and b_in; ``bias_hn`` is the recurrent bias of n
    inside the reset gate. The norm hooks apply to the input and hidden terms and to n's tanh.
    """

    gates = 3
    candidate_block = 2

    @torch.no_grad()
    def reset_parameters(self, *args, **kw):
        if not hasattr(self, "bias_hn"):  # before the first reset, so that it is initialised
            # Zhang's RMS-GRU has no recurrent bias inside the reset gate: a zero buffer
            self.bias_hn = nn.Parameter(torch.zeros(self.hidden_size))
            if self.norm.bias_in_input:
                del self.bias_hn
                self.register_buffer("bias_hn", torch.zeros(self.hidden_size))
        super().reset_parameters(*args, **kw)

    def input_term(self, x, w_ih, t0, mask):
        if self.norm.bias_in_input:  # Zhang's RMS-GRU: the biases inside the norm only
            return self.norm.input_term(F.linear(x, w_ih, self.bias), t0, mask)
        return super().input_term(x, w_ih, t0, mask)

    def fused(self, x, state, w_ih, w_hh):
        (h,) = state
        b_hh = torch.cat([self.bias_hn.new_zeros(2 * self.hidden_size), self.bias_hn])
        params = [w_ih, w_hh, self.bias, b_hh]
        y, h = torch.gru(x, h.unsqueeze(0), params, True, 1, 0.0, self._train(), False, False)
        return y, (h[0],)

    def sequence(self, rec, x, w_hh, state, bias=None, w_ih=None):
        return gru_sequence(rec, x, w_hh, self.bias_hn, *state, bias=bias, w_ih=w_ih)

    def step(self, xt, state, w_hh, t, mask=None):
        (h,) = state
        xr, xz, xn = xt.chunk(3, 1)
        hr, hz, hn = self.norm.hidden_term(h @ w_hh.t(), t, mask).chunk(3, 1)
        r = torch.sigmoid(xr + hr)
        z = torch.sigmoid(xz + hz)
        n = self.norm.candidate(xn + r * (hn + self.bias_hn))
        return ((1 - z) * n + z * h,)


@CELLS.register("rnn_tanh")
class TanhRNNLayer(RecurrentLayer):
    """Elman RNN: h_t = tanh(x_t + W_h h_{t-1} + b), with the norm's hooks on both terms
    (the batch-normalized tanh RNN of Cooijmans et al.'s figure 1). The fused kernel for the
    weight-only norms, else the step loop (no hand-written sequence path)."""

    has_sequence = False

    def fused(self, x, state, w_ih, w_hh):
        (h,) = state
        params = [w_ih, w_hh, self.bias, torch.zeros_like(self.bias)]
        y, h = torch.rnn_tanh(x, h.unsqueeze(0), params, True, 1, 0.0, self._train(), False, False)
        return y, (h[0],)

    def step(self, xt, state, w_hh, t, mask=None):
        (h,) = state
        return (self.norm.candidate(xt + self.norm.hidden_term(h @ w_hh.t(), t, mask)),)


class StackedRNN(nn.Module):
    """``num_layers`` recurrent layers with dropout between them."""

    def __init__(self, input_size, hidden_size, num_layers=1, cell="lstm", dropout=0.0, **layer_kw):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        layer = CELLS[cell]
        self.layers = nn.ModuleList(
            layer(input_size if i == 0 else hidden_size, hidden_size, **layer_kw)
            for i in range(num_layers)
        )
        self.dropout = nn.Dropout(dropout)

    def forward(self, x, states=None, mask=None, t0=0):
        states = states or [None] * len(self.layers)
        new_states = []
        for i, (layer, state) in enumerate(zip(self.layers, states, strict=True)):
            if i:
                x = self.dropout(x)
            x, state = layer(x, state, mask, t0)
            new_states.append(state)
        return x, new_states
