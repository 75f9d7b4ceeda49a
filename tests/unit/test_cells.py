"""Cells and models: agreement with torch's fused modules, gradients, and training."""

import importlib
import inspect

import pytest
import torch
import torch.nn.functional as F
from path_helpers import FAST, MODES, assert_same, default_path, run_path
from registry_lists import SEQUENCE_CELLS, batch_norms
from torch.func import functional_call

from normrnn import CELLS, NORMS, QUANTIZERS, UnknownNameError, build_model, model_bits
from normrnn.compute import native, sequence
from normrnn.methods.norms import BatchNormTerm
from normrnn.pipeline.diagnostics import recording
from normrnn.pipeline.optim import make_optimizer, update_preconditioners


@pytest.fixture(autouse=True)
def _small_stacks(monkeypatch):
    """The sequence path's input term in stacks of 4 steps (LSTM, B=4, 4·16 gates) or 5
    (GRU): the tests' 6 steps in two, the second one short."""
    monkeypatch.setattr(sequence.steps, "STACK", 4 * 4 * 64)


def copy_lstm(ref: torch.nn.LSTM, model):
    for i, layer in enumerate(model.rnn.layers):
        with torch.no_grad():
            layer.weight_ih.copy_(getattr(ref, f"weight_ih_l{i}"))
            layer.weight_hh.copy_(getattr(ref, f"weight_hh_l{i}"))
            layer.bias.copy_(getattr(ref, f"bias_ih_l{i}") + getattr(ref, f"bias_hh_l{i}"))


def use_path(model, path: str):
    for layer in model.rnn.layers:
        layer.path = path


@pytest.mark.parametrize("path", ["loop", "fused", "sequence"])
@pytest.mark.parametrize("layers", [1, 2])
def test_plain_lstm_matches_torch_lstm(layers, path):
    """Outputs, final cell state and the weight gradients of every path against nn.LSTM."""
    model = build_model(
        "classifier", num_classes=2, hidden_size=16, input_size=5, num_layers=layers
    )
    ref = torch.nn.LSTM(5, 16, num_layers=layers)
    copy_lstm(ref, model)
    use_path(model, path)
    x = torch.randn(30, 8, 5)
    out, states = model.rnn(x)
    ref_out, (h, c) = ref(x)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(states[-1][1], c[-1], atol=1e-5, rtol=1e-5)
    (out.pow(2).mean() + states[-1][1].mean()).backward()
    (ref_out.pow(2).mean() + c[-1].mean()).backward()
    for i, layer in enumerate(model.rnn.layers):
        for name in ("weight_ih", "weight_hh"):
            expected = getattr(ref, f"{name}_l{i}").grad
            torch.testing.assert_close(getattr(layer, name).grad, expected, atol=1e-6, rtol=1e-5)
        expected = getattr(ref, f"bias_ih_l{i}").grad
        torch.testing.assert_close(layer.bias.grad, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["loop", "fused"])
def test_plain_gru_matches_torch_gru(path):
    model = build_model("classifier", num_classes=2, hidden_size=16, input_size=5, cell="gru")
    use_path(model, path)
    layer, ref = model.rnn.layers[0], torch.nn.GRU(5, 16)
    h = 16
    with torch.no_grad():
        layer.weight_ih.copy_(ref.weight_ih_l0)
        layer.weight_hh.copy_(ref.weight_hh_l0)
        layer.bias.copy_(ref.bias_ih_l0)
        layer.bias[: 2 * h] += ref.bias_hh_l0[: 2 * h]
        layer.bias_hn.copy_(ref.bias_hh_l0[2 * h :])
    x = torch.randn(30, 8, 5)
    torch.testing.assert_close(model.rnn(x)[0], ref(x)[0], atol=1e-5, rtol=1e-5)


# The norms without a hand-written step: on the GRU, Zhang's cells (their r, z and candidate
# blocks differ in size). The tanh RNN has no sequence Function: its activation norms loop.
LOOPING = {("gru", "rms_zhang"), ("gru", "prms_zhang")}


@pytest.mark.parametrize("cell", sorted(CELLS))
def test_every_norm_has_a_fast_path(cell):
    """Weight-only norms take the fused kernel, every other norm the hand-written recurrence,
    except those of LOOPING (docs/architecture.md: which norms loop, and why)."""
    fused = {n for n in NORMS if NORMS[n](hidden_size=2, gates=1).weight_only}
    assert fused == {"none", "wn", "wn_bounded"}

    def expected(n):
        if n in fused:
            return "fused"
        return "loop" if cell == "rnn_tanh" or (cell, n) in LOOPING else "sequence"

    assert {n: default_path(cell, n) for n in NORMS} == {n: expected(n) for n in NORMS}


def test_a_term_without_a_step_makes_the_layer_loop(monkeypatch):
    """A new normalization needs only its forward: without ``step`` the layer loops. So does
    a batch norm with a new scale estimator but no gradient of it (the closed-form step would
    otherwise use its parent's gradient: a wrong one)."""
    from normrnn.methods.norms import GroupLayerNorm, L1BatchNorm, TermNorm, _activation

    monkeypatch.setattr(GroupLayerNorm, "step", TermNorm.step)
    assert default_path("lstm", "ln") == default_path("gru", "ln") == "loop"

    class MedianBatchNorm(L1BatchNorm):
        def statistic(self, centered, w=None):
            return centered.abs().median(1, keepdim=True).values

    monkeypatch.setitem(NORMS, "medbn", _activation(MedianBatchNorm, norm_cell=True))
    assert default_path("lstm", "medbn") == "loop"
    assert default_path("lstm", "l1bn") == default_path("lstm", "linfbn") == "sequence"


@pytest.mark.parametrize(
    "quant,train", MODES, ids=[f"{q}-{'train' if t else 'eval'}" for q, t in MODES]
)
@pytest.mark.parametrize("cell,norm", FAST)
def test_fast_path_equals_reference_path(cell, norm, quant, train):
    """The fused kernel or the hand-written recurrence against the step loop, fp32: outputs,
    final state, the gradients of the input, the initial state and every parameter, and the
    population statistics, to 1e-5 of each tensor's scale."""
    path = default_path(cell, norm)
    ref = run_path(cell, norm, quant, "loop", train)
    got = run_path(cell, norm, quant, path, train)
    assert got.keys() == ref.keys() and "weight_hh.grad" in ref
    assert_same(got, ref)


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
@pytest.mark.parametrize("norm", ["l1bn", "linfbn"])
def test_pooled_statistics_of_other_estimators_on_the_sequence_path(cell, norm):
    """L1 and L∞ batch norm with statistics pooled over time (an option, not a registered
    name): their input term is normalized as one block inside the sequence path, which must
    equal the loop as the registered norms do."""
    pooled = {"shared": True, "pooled": True}
    ref = run_path(cell, norm, "fp", "loop", opts=pooled)
    got = run_path(cell, norm, "fp", "sequence", opts=pooled)
    assert got.keys() == ref.keys() and "norm.x.weight.grad" in ref
    assert_same(got, ref)


BATCH_NORMS = batch_norms()


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
@pytest.mark.parametrize("norm", BATCH_NORMS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_batch_norms_steps_in_torchs_ops(cell, norm, train, monkeypatch):
    """The sequence path with the batch norms' steps in torch's ops (where no compiler is):
    the loop's numbers (compiled, test_fast_path_equals_reference_path holds them)."""
    monkeypatch.setattr(native, "library", lambda: None)
    ref = run_path(cell, norm, "fp", "loop", train)
    got = run_path(cell, norm, "fp", "sequence", train)
    assert got.keys() == ref.keys() and "norm.h.weight.grad" in ref
    assert_same(got, ref)


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
@pytest.mark.parametrize("norm", ["bn", "linfbn", "ln"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_the_input_term_in_single_steps(cell, norm, train, monkeypatch, bn_steps):
    """Where one step fills the sequence path's stack (large B·H), its input term goes a
    step per call, through the compiled steps, or torch's kernels where they exist: the same
    numbers as the loop."""
    monkeypatch.setattr(sequence.steps, "STACK", 1)
    parts, cut = [], sequence.steps._parts
    monkeypatch.setattr(
        sequence.steps, "_parts", lambda term, x: parts.append(p := cut(term, x)) or p
    )
    ref = run_path(cell, norm, "fp", "loop", train)
    got = run_path(cell, norm, "fp", "sequence", train)
    assert got.keys() == ref.keys() and "norm.x.weight.grad" in ref
    assert_same(got, ref)
    assert parts and all(part.dim() == 2 for p in parts for part in p)  # single steps (B, F)


def test_the_input_terms_backward_follows_the_forwards_parts():
    """The input term's gradient is cut as the forward cut its x̂, not by the term's state
    at backward time: pooled statistics normalize one block in training and stacks in eval,
    and a layer switched to eval between the two must still get the loop's gradients."""
    grads = {}
    for path in ("loop", "sequence"):
        torch.manual_seed(0)
        layer = CELLS["lstm"](5, 16, norm="bn_pooled", max_steps=6)
        layer.path = path
        y = layer(torch.randn(6, 4, 5))[0]
        layer.eval()
        y.pow(2).mean().backward()
        grads[path] = {n: p.grad for n, p in layer.named_parameters()}
    assert "norm.x.weight" in grads["loop"]
    assert_same(grads["sequence"], grads["loop"])


def test_the_sequence_path_leaves_masks_and_recording_to_the_loop():
    layer = CELLS["lstm"](3, 8, norm="bn", max_steps=6)
    x, mask = torch.randn(6, 4, 3), torch.ones(6, 4)
    mask[4:, :2] = 0
    masked = layer(x, mask=mask)[0]
    layer.path = "loop"
    torch.testing.assert_close(masked, layer(x, mask=mask)[0])
    mask[:] = 1  # a full mask gives what no mask does, on either path
    layer.path = "sequence"
    torch.testing.assert_close(layer(x, mask=mask)[0], layer(x)[0], atol=1e-6, rtol=1e-5)
    with recording(layer) as hs:  # each h_t a graph node: only the loop makes them
        y = layer(x)[0]
    assert len(hs) == 6 and torch.equal(torch.stack(hs), y)


@pytest.mark.parametrize("module", ["lstm", "gru"])
def test_the_sequence_functions_name_what_they_pass_on(module):
    """The Function's inputs are named as its forward body takes them, and the names it keeps
    for the backward are the backward body's parameters, in order (x first, the h_t last)."""
    mod = importlib.import_module(f"normrnn.compute.sequence.{module}")
    params = lambda f: list(inspect.signature(f).parameters)  # noqa: E731
    assert params(getattr(mod, f"_{module}_forward"))[2:] == list(mod.INPUTS)
    backward = params(getattr(mod, f"_{module}_backward"))
    kept = backward[backward.index("need_x") + 1 : backward.index("hs") + 1]
    assert kept == ["x", *mod.SAVED, "hs"] and set(mod.SAVED) <= set(mod.INPUTS)


def keep_statistics(layer):
    """The layer's batch norms stop updating their buffers: its forward is a pure function."""
    for m in layer.modules():
        if isinstance(m, BatchNormTerm):
            m.track = False


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_gradcheck_float64(norm, cell):
    """gradcheck through every cell × norm, its function kept pure: the batch norms stop
    updating their buffers (the ghost batch norm's smoothed statistic among them, after one
    forward that fills it)."""
    layer = CELLS[cell](2, 3, norm=norm, max_steps=3).double()
    layer(torch.randn(3, 5, 2, dtype=torch.float64))
    keep_statistics(layer)
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [
        p.detach().clone().requires_grad_() for n, p in layer.named_parameters() if p.requires_grad
    ]
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


def test_forget_gate_bias_starts_at_one():
    layer = build_model("char_lm", vocab_size=5, hidden_size=4).rnn.layers[0]
    assert layer.bias.tolist() == [0.0] * 4 + [1.0] * 4 + [0.0] * 8


def test_output_shapes_and_api():
    lm = build_model(
        kind="char_lm", vocab_size=11, hidden_size=8, norm="bn", quant="twn", max_steps=7
    )
    logits = lm(torch.randint(0, 11, (7, 3)))[0]
    assert logits.shape == (7, 3, 11)
    clf = build_model(kind="classifier", vocab_size=10, hidden_size=8, input_size=2, cell="gru")
    assert clf(torch.randn(6, 4, 2))[0].shape == (4, 10)
    with pytest.raises(UnknownNameError, match="valid names: char_lm, classifier, word_lm"):
        build_model(kind="transformer", vocab_size=3)
    with pytest.raises(UnknownNameError, match="unknown cell 'rnn'"):
        build_model(kind="char_lm", vocab_size=3, cell="rnn")


def test_model_bits_counts_quantized_recurrent_weights():
    fp = build_model("char_lm", vocab_size=10, hidden_size=8)
    bc = build_model("char_lm", vocab_size=10, hidden_size=8, quant="bc")
    bwn = build_model("char_lm", vocab_size=10, hidden_size=8, quant="bwn")
    recurrent = 32 * 8 + 32 * 8  # W_x (4H × emb=H) and W_h
    assert model_bits(fp) - model_bits(bc) == 31 * recurrent
    assert model_bits(bwn) - model_bits(bc) == 2 * 4 * 32  # one scale per gate block and matrix


def test_lab_preconditioner_comes_from_adam():
    model = build_model("classifier", num_classes=2, hidden_size=4, quant="lab")
    opt = make_optimizer("adam", model.parameters(), lr=0.01)
    loss = F.cross_entropy(model(torch.randn(5, 8, 1))[0], torch.randint(0, 2, (8,)))
    loss.backward()
    opt.step()
    update_preconditioners(model, opt)
    layer = model.rnn.layers[0]
    v = opt.state[layer.weight_hh]["exp_avg_sq"]
    torch.testing.assert_close(layer.d_hh, v.sqrt() + 1e-8)


def synthetic_batch(g):
    """Classify the sign of the first input of a 6-step sequence (needs memory)."""
    x = torch.randn(6, 32, 2, generator=g)
    return x, (x[0, :, 0] > 0).long()


@pytest.mark.parametrize("quant", sorted(QUANTIZERS))
def test_training_reduces_loss_for_every_pair(quant):
    for norm in sorted(NORMS):
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        # prms at H = 8 would estimate the RMS from int(8 * 0.0625) = 1 unit: use 4
        opts = {"p": 0.5} if norm == "prms" else {}
        model = build_model(
            "classifier",
            num_classes=2,
            hidden_size=8,
            input_size=2,
            norm=norm,
            quant=quant,
            max_steps=6,
            norm_opts=opts,
        )
        opt = make_optimizer("adam", model.parameters(), lr=0.01)
        losses = []
        for _ in range(150):
            x, y = synthetic_batch(g)
            loss = F.cross_entropy(model(x)[0], y)
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            update_preconditioners(model, opt)
            losses.append(loss.item())
        # The gradient path is wired if the loss goes down. Judged on the best 20-step average,
        # not the last: linfbn+fp learns to ~0.1 then spikes at step ~130 with this seed.
        windows = [sum(losses[i : i + 20]) / 20 for i in range(0, len(losses) - 19)]
        first, best = windows[0], min(windows[20:])
        assert best < 0.85 * first, f"{norm}+{quant}: loss {first:.3f} -> best {best:.3f}"


def test_gamma_init_axis_reaches_the_activation_norms_only():
    from normrnn.pipeline.training import norm_options

    assert norm_options({"norm": "bn", "gamma_init": 0.5}) == {"gamma_init": 0.5}
    assert norm_options({"norm": "ln", "gamma_init": 0.5, "norm_opts": {"ln": {"eps": 1e-3}}}) == {
        "eps": 1e-3,
        "gamma_init": 0.5,
    }
    assert norm_options({"norm": "wn", "gamma_init": 0.5}) == {}  # no γ to set
    layer = build_model(
        "classifier", num_classes=2, hidden_size=4, norm="bn", norm_opts={"gamma_init": 0.5}
    ).rnn.layers[0]
    assert layer.norm.h.weight.tolist() == [0.5] * 16


def sequence_layer(norm="ln", cell="lstm"):
    torch.manual_seed(0)
    layer = CELLS[cell](3, 8, norm=norm, max_steps=5)
    assert layer.path == "sequence"
    return layer


def grads_of(layer):
    return {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_sequence_path_buffers_are_not_shared_by_live_graphs(cell):
    """Two forwards before one backward (gradient accumulation), and outputs kept after the
    backward while later forwards reuse the pooled buffers: the same as the step loop."""
    xs = [torch.randn(5, 4, 3) for _ in range(3)]
    results = {}
    for path in ("loop", "sequence"):
        layer = sequence_layer(cell=cell)
        layer.path = path
        y0, y1 = layer(xs[0])[0], layer(xs[1])[0]
        kept = y0.detach().clone()
        (y0.pow(2).sum() + y1.pow(2).sum()).backward()
        layer(xs[2])[0].sum().backward()
        torch.testing.assert_close(y0.detach(), kept, rtol=0, atol=0)
        results[path] = grads_of(layer)
    for name, g in results["loop"].items():
        torch.testing.assert_close(results["sequence"][name], g, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_sequence_path_backward_twice_with_retain_graph(cell):
    layer = sequence_layer(cell=cell)
    loss = layer(torch.randn(5, 4, 3))[0].pow(2).sum()
    first = torch.autograd.grad(loss, layer.weight_hh, retain_graph=True)[0]
    second = torch.autograd.grad(loss, layer.weight_hh)[0]
    torch.testing.assert_close(second, first, rtol=0, atol=0)


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_sequence_path_refuses_a_backward_whose_buffers_were_reused(cell):
    layer = sequence_layer(cell=cell)
    x = torch.randn(5, 4, 3)
    loss = layer(x)[0].sum()
    loss.backward(retain_graph=True)
    layer(x)  # same shape: takes the buffers the first graph gave back
    with pytest.raises(RuntimeError, match="layer.path = 'loop'"):
        loss.backward()


def test_a_stack_of_layers_reuses_one_workspace_per_layer(monkeypatch):
    """Two layers of one shape: each training step after the first reuses the same two
    workspaces (a pool keeping one per shape would allocate afresh for one layer per step)."""
    from normrnn.compute import sequence

    monkeypatch.setattr(sequence.workspace, "POOL", POOL := sequence.WorkspacePool())
    model = build_model(
        "classifier", num_classes=2, hidden_size=8, input_size=8, num_layers=2, norm="ln"
    )
    x = torch.randn(5, 4, 8)
    seen = []
    for _ in range(3):
        model(x)[0].sum().backward()
        (spares,) = POOL.free.values()  # one shape, two workspaces
        seen.append({id(ws) for ws in spares})
    assert len(seen[0]) == 2 and seen[1] == seen[0] == seen[2]


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_inference_gives_its_workspace_back(cell, monkeypatch):
    """Under no_grad no backward comes to give the workspace back: the forward does (autograd
    still reports that the parameters need gradients there)."""
    from normrnn.compute import sequence

    monkeypatch.setattr(sequence.workspace, "POOL", POOL := sequence.WorkspacePool())
    layer = sequence_layer(cell=cell).eval()
    with torch.no_grad():
        for _ in range(3):
            layer(torch.randn(5, 4, 3))
            assert [len(spares) for spares in POOL.free.values()] == [1]


@pytest.mark.parametrize("norm", sorted(NORMS))
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_low_precision_arithmetic_runs_every_norm(cell, norm):
    """``precision: bf16`` (CPU autocast) trains and evaluates every cell × norm: the layer
    takes the reference loop, whose bf16 matmuls differ from fp32 by bf16's rounding only.
    (The fused kernel refused mixed dtypes and batch norms' fp32 buffers refused bf16
    statistics before.)"""
    torch.manual_seed(0)
    opts = {"p": 0.25} if norm == "prms_zhang" else None  # (an RMS of 1 unit: bf16 noise)
    layer = CELLS[cell](5, 16, norm=norm, max_steps=6, norm_opts=opts)
    keep_statistics(layer)  # (the ghost batch norm's statistic would move between calls)
    x = torch.randn(6, 4, 5)
    reference = layer(x)[0].detach()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)[0]
    assert not torch.equal(y.float(), reference)  # the matmuls did run in bf16
    torch.testing.assert_close(y.float(), reference, atol=0.05, rtol=0.05)
    y.float().pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert layer.weight_hh.grad.abs().sum() > 0
    layer.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(layer(x)[0].float()).all()


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_the_route_recorded_is_the_one_taken(cell, norm, monkeypatch):
    """``paths.choose`` decides a call's computation and the layer records it: the fused
    kernel ran iff the route says fused, the compiled loop iff it says compiled; a mask (on
    the sequence path), autocast and recorded states take the loop and say why."""
    ran = []
    loop = native.loop
    monkeypatch.setattr(native, "loop", lambda *a, **k: ran.append("loop") or loop(*a, **k))
    layer = CELLS[cell](3, 8, norm=norm, max_steps=4)
    fused = layer.fused if hasattr(layer, "fused") else None
    if fused is not None:
        monkeypatch.setattr(layer, "fused", lambda *a: ran.append("fused") or fused(*a))
    x = torch.randn(4, 5, 3)
    layer(x)[0].pow(2).mean().backward()
    route = layer.route
    assert route.path == layer.path and not route.why
    assert ("fused" in ran) == (route.path == "fused")
    assert ("loop" in ran) == (route.recurrence == "compiled")
    assert (route.path == "sequence") == (route.recurrence in ("compiled", "python"))
    if layer.path == "sequence":
        layer(x, mask=torch.ones(4, 5))
        assert layer.route.path == "loop" and layer.route.why == "mask"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert layer.route.path == "loop" and layer.route.why == "autocast"
    with recording(layer):
        layer(x)
    assert layer.route.path == "loop" and layer.route.why == "recording"
