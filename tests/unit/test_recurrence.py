"""The compiled LSTM and GRU recurrences (``csrc/recurrence.cpp`` through ``native.loop``):
held to the sequence path's steps in torch's ops, which tests/unit/test_cells.py holds to the
plain step loop, to float64 and to finite differences; where they run and where they step
aside."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from path_helpers import assert_same, run_path
from registry_lists import SEQUENCE_CELLS, loop_cases
from torch.func import functional_call

from normrnn import CELLS
from normrnn.compute import native

pytestmark = pytest.mark.skipif(
    native.compiler() is None or native.gemm(torch.float32) is None,
    reason="no C++ compiler, or torch exports no BLAS gemm",
)

# The norms whose steps the loop takes, in training and eval (every term has a form there).
LOOP_CASES = loop_cases()


@pytest.fixture
def calls(monkeypatch) -> list:
    """Each call of the loop, as "forward" or "backward"."""
    seen, real = [], native.loop

    def spy(kind, backward, *args, **kw):
        seen.append("backward" if backward else "forward")
        return real(kind, backward, *args, **kw)

    monkeypatch.setattr(native, "loop", spy)
    return seen


def python_steps(monkeypatch) -> None:
    """The sequence path without the loop: its steps in torch's ops (and compiled steps)."""
    monkeypatch.setattr(native, "loop_applies", lambda x: False)


@pytest.mark.parametrize("quant", ["fp", "twn", "bc"])
@pytest.mark.parametrize("cell,norm", LOOP_CASES)
def test_the_loop_equals_the_python_steps(cell, norm, quant, calls, monkeypatch):
    """Outputs, final state, every gradient and the population statistics, to 1e-5."""
    got = run_path(cell, norm, quant, "sequence")
    assert calls == ["forward", "backward"]
    python_steps(monkeypatch)
    ref = run_path(cell, norm, quant, "sequence")
    assert calls == ["forward", "backward"]  # no more
    assert got.keys() == ref.keys()
    assert_same(got, ref)


def run_once(layer, x, state, loop: bool) -> list:
    """Outputs, final state and every gradient of one forward and backward, with the loop
    or with the Python steps, in the layer's dtype."""
    applies = native.loop_applies
    dtype = next(layer.parameters()).dtype
    x, *state = (v.to(dtype, copy=True).requires_grad_() for v in (x, *state))
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    try:
        if not loop:
            native.loop_applies = lambda x: False
        y, last = functional_call(layer, params, (x, tuple(state)))
        (y.pow(2).mean() + sum(s.mean() for s in last)).backward()
    finally:
        native.loop_applies = applies
    grads = [x.grad, *(s.grad for s in state), *(p.grad for p in params.values())]
    return [v.detach().double() for v in (y, *last, *grads) if v is not None]


@settings(max_examples=40, deadline=None)
@given(
    case=st.sampled_from(LOOP_CASES),
    steps=st.integers(1, 5),
    batch=st.integers(3, 7),
    hidden=st.integers(3, 11),
    scale=st.sampled_from([0.1, 1.0, 30.0]),
)
def test_the_loop_at_any_size_and_scale(case, steps, batch, hidden, scale):
    """Odd sizes (the vector loops' tails) and large pre-activations (exp's clamps, saturated
    gates): the loop in float32 is as close to the float64 numbers as the Python steps in
    float32 are (4 times their error, plus 1e-5 of the scale), one draw of layer and inputs.
    Not below 3 examples or 3 units a block (pRMS: 2 in its estimate): a norm over two values
    gives ±1, whose gradient is 0 plus float32 noise in either path. At the large scale only
    the outputs: a saturated gate's derivative σ(1 - σ) keeps few digits in float32 either
    way, and which of them is luck."""
    cell, norm = case
    torch.manual_seed(steps * 100 + batch * 10 + hidden)
    opts = {"p": 0.67} if norm == "prms" else None
    layer = CELLS[cell](3, hidden, norm=norm, max_steps=steps, norm_opts=opts)
    x = torch.randn(steps, batch, 3) * scale
    state = [torch.randn(batch, hidden) for _ in layer.initial_state(x)]
    got = run_once(layer, x, state, loop=True)
    rival = run_once(layer, x, state, loop=False)
    exact = run_once(layer.double(), x, state, loop=False)
    if scale > 1:
        outputs = 1 + len(state)  # y and the final state
        got, rival, exact = got[:outputs], rival[:outputs], exact[:outputs]
    for g, r, e in zip(got, rival, exact, strict=True):
        bound = 4 * (r - e).abs().max() + 1e-5 * max(1.0, e.abs().max().item())
        assert (g - e).abs().max() <= bound


@pytest.mark.parametrize("cell,norm", LOOP_CASES + [(cell, "none") for cell in SEQUENCE_CELLS])
def test_the_loop_in_float64_against_finite_differences(cell, norm, calls):
    layer = CELLS[cell](2, 3, norm=norm, max_steps=3, norm_opts=None).double()
    layer.path = "sequence"
    names = [n for n, p in layer.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_() for n, p in layer.named_parameters()]
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return functional_call(layer, dict(zip(names, ps, strict=True)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)
    assert "forward" in calls and "backward" in calls


@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_a_nan_reaches_the_outputs_as_in_the_python_steps(cell, monkeypatch):
    """A diverged run must read as one: a NaN in the input spreads through the loop to the
    same outputs as through torch's ops (exp's clamps keep NaN), and no further."""
    torch.manual_seed(1)
    layer = CELLS[cell](3, 8, norm="ln", max_steps=4)
    x = torch.randn(4, 5, 3)
    x[1, 2, 0] = math.nan
    got = layer(x)[0]
    python_steps(monkeypatch)
    ref = layer(x)[0]
    assert got.isnan().any() and torch.equal(got.isnan(), ref.isnan())
    torch.testing.assert_close(got.nan_to_num(), ref.nan_to_num(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm", ["bn", "bn_shared", "bn_pooled", "l1bn", "linfbn"])
@pytest.mark.parametrize("quant", ["fp", "twn"])
@pytest.mark.parametrize("cell", SEQUENCE_CELLS)
def test_the_loop_with_population_statistics_equals_the_python_steps(
    cell, norm, quant, calls, monkeypatch
):
    """Eval mode: the batch norms' population statistics of each step (past the steps seen
    in training, the last one's), outputs and gradients."""
    got = run_path(cell, norm, quant, "sequence", train=False)
    assert calls == ["forward", "forward", "backward"]  # training's first batch, then eval
    with monkeypatch.context() as patch:
        python_steps(patch)
        ref = run_path(cell, norm, quant, "sequence", train=False)
    assert_same(got, ref)
    torch.manual_seed(0)
    layer = CELLS[cell](5, 6, norm=norm, quant=quant, max_steps=3)
    layer(torch.randn(2, 4, 5))  # two steps seen
    layer.eval()
    x = torch.randn(5, 4, 5)
    with monkeypatch.context() as patch:
        python_steps(patch)
        ref = layer(x)[0]
    torch.testing.assert_close(layer(x)[0], ref, atol=1e-5, rtol=1e-5)
    assert calls == ["forward", "forward", "backward", "forward", "forward"]


def test_where_the_loop_steps_aside(calls, monkeypatch):
    """A term without a form in the loop (L∞ with k > 1), and a torch without an exported
    gemm run the Python steps."""
    x = torch.randn(4, 3, 5)
    for cell in SEQUENCE_CELLS:
        CELLS[cell](5, 6, norm="linfbn", max_steps=4, norm_opts={"k": 2})(x)
    assert calls == []
    for cell in SEQUENCE_CELLS:
        CELLS[cell](5, 6, norm="linfbn", max_steps=4)(x)
    assert calls == ["forward", "forward"]
    assert native.loop_applies(x) and not native.loop_applies(x.half())
    monkeypatch.setattr(native, "gemm", lambda dtype: None)
    assert not native.loop_applies(x)
    for cell in SEQUENCE_CELLS:
        CELLS[cell](5, 6, norm="ln", max_steps=4)(x)
    assert calls == ["forward", "forward"]


def test_a_gemm_that_disagrees_with_torch_is_not_used(monkeypatch):
    """``native.gemm`` hands over a BLAS gemm only after it computed torch's product; one
    that does not leaves the loop off."""
    native.gemm.cache_clear()
    try:
        assert isinstance(native.gemm(torch.float64), int)
        native.gemm.cache_clear()
        monkeypatch.setattr(native, "_gemm_agrees", lambda fn, dtype: False)
        with pytest.warns(UserWarning, match="recurrences step in Python.*sgemm_"):
            assert native.gemm(torch.float32) is None
        assert not native.loop_applies(torch.randn(2, 2))
    finally:
        native.gemm.cache_clear()
