"""The compiled batch-norm steps (``normrnn.compute.native``) against torch's ops and autograd, and
their build: cached, rebuilt for a new source, safe to build from parallel jobs, and off
(torch's ops, with a warning naming why) where it cannot be built."""

import math
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normrnn.compute import native, triton_steps
from normrnn.methods.norms import (
    BatchNormTerm,
    L1BatchNorm,
    LinfBatchNorm,
    compiled_steps,
    linf_constant,
    rms_step,
    rms_step_backward,
)
from normrnn.methods.norms.batch import Compiled, Estimated, L2Kernel

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")
needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() and triton_steps.available()), reason="needs CUDA and Triton"
)
# the compiled CPU loops, and the Triton kernels on a GPU (CI has none: skipped there)
DEVICES = [pytest.param("cpu", marks=needs_compiler), pytest.param("cuda", marks=needs_triton)]


def constant(kind: str, n: int) -> float:
    return {"l2": 1.0, "l1": math.sqrt(math.pi / 2), "linf": linf_constant(n)}[kind]


def reference(kind: str, a: torch.Tensor, eps: float, dtype=torch.float64):
    """x̂, mean, statistic and denominator of each step of ``a`` (C, B, F), from the
    estimators' definitions in float64 (or ``dtype``), the mean correctly rounded (a column
    constant over the batch has x - mean = 0 exactly, not ±ulp, which x̂ would blow up to
    ±ulp / eps)."""
    a = a.to(dtype)
    exact = np.asarray(a.detach().numpy(), dtype=np.longdouble).mean(1, keepdims=True)
    mean = a.mean(1, keepdim=True)  # its gradient, with the correctly rounded value:
    exact = torch.from_numpy(exact.astype(str(dtype).removeprefix("torch.")))
    mean = mean + (exact - mean).detach()
    xc = a - mean
    if kind == "l2":
        stat = xc.pow(2).mean(1, keepdim=True)
        den = (stat + eps).sqrt()
    else:
        size = xc.abs()
        top = size.mean(1, keepdim=True) if kind == "l1" else size.amax(1, keepdim=True)
        stat = constant(kind, a.shape[1]) * top
        den = stat + eps
    return xc / den, mean, stat, den


@st.composite
def steps(draw):
    """A stack (C, B, F) with what batch-norm inputs bring: ties for the largest |x - μ|
    (values on a coarse grid), columns constant over the batch, and scales far from 1."""
    shape = (draw(st.integers(1, 3)), draw(st.integers(2, 24)), draw(st.integers(1, 40)))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    if draw(st.booleans()):
        a = a.mul(2).round()  # many exact ties (and exact sums: no tie made or lost in them)
    a[..., 0] = draw(st.floats(-3, 3))  # a constant column
    scale = draw(st.sampled_from([2.0**-10, 1.0, 2.0**10]))  # exact
    return a * scale, torch.randn(shape, generator=gen, dtype=torch.float64)


@needs_compiler
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps(), st.sampled_from(sorted(native.KINDS)))
def test_compiled_step_equals_the_estimators_definition_and_autograd(case, kind):
    """Forward: x̂ and each step's statistics against the definitions (float64). Backward:
    against autograd through those definitions, ties shared as amax's gradient shares them."""
    a, g = case
    eps, c = 1e-5, constant(kind, a.shape[1])
    xhat, mean, stat, den = native.step(kind, a, eps, c)
    want = reference(kind, a, eps)
    names = ("x̂", "mean", "stat", "den")
    for name, got, expect in zip(names, (xhat, mean, stat, den), want, strict=True):
        got = got.view(expect.shape)
        torch.testing.assert_close(got, expect, rtol=1e-10, atol=1e-12, msg=name)
    leaf = a.clone().requires_grad_()
    (expect,) = torch.autograd.grad(reference(kind, leaf, eps)[0], leaf, g)
    got = native.step_backward(kind, g, xhat, den, c)
    scale = expect.abs().max().item()
    torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-11 * max(1.0, scale))


def as_good_as(got, rival, exact, name, size, dim=-2):
    """``got``'s error against ``exact`` (float64), in each column of each step (or slice
    along ``dim``), is at most a few times that of ``rival`` (the same definitions in
    torch's float32 ops) plus about 30 float32 ulps of ``size`` (C, F), the scale of the
    values the result is made of: a column nearly constant over the batch loses digits in
    x - mean in any float32 arithmetic, and its x̂ and gradient with them."""
    got, rival = got.view(exact.shape).cpu().double(), rival.view(exact.shape).double()
    err, base = (got - exact).abs().amax(dim), (rival - exact).abs().amax(dim)
    bound = 4 * base + 4e-6 * torch.maximum(size, exact.abs().amax(dim)) + 1e-30
    worst = (err / bound).max().item()
    assert worst <= 1, f"{name}: {worst:.3g} times the bound"


@needs_triton
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps(), st.sampled_from(sorted(native.KINDS)))
def test_triton_step_is_as_accurate_as_float32_definitions(case, kind):
    """The GPU kernels on float32 (the case rounded to it), forward and backward, against
    the float64 definitions and autograd through them: as close as the same definitions
    computed in float32 (ties as in float64: equal values stay equal in any arithmetic)."""
    a, g = (t.float() for t in case)
    eps, c = 1e-5, constant(kind, a.shape[1])
    got = triton_steps.step(kind, a.cuda(), eps, c)
    exact, rival = reference(kind, a, eps), reference(kind, a, eps, torch.float32)
    big, den = a.double().abs().amax(-2), exact[3].detach().squeeze(-2)  # (C, F)
    sizes = {"x̂": big / den, "mean": big, "stat": big * (c + den), "den": big * (c + 1)}
    for (name, size), x, w, r in zip(sizes.items(), got, exact, rival, strict=True):
        as_good_as(x, r.detach(), w.detach(), name, size)
    grads = []
    for dtype in (torch.float64, torch.float32):
        leaf = a.to(dtype).requires_grad_()
        grads += torch.autograd.grad(reference(kind, leaf, eps, dtype)[0], leaf, g.to(dtype))
    dx = triton_steps.step_backward(kind, g.cuda(), got[0], got[3], c)
    # the terms g / den, and x̂ · Σ g x̂ / den with x̂ as far off as x - mean is in float32
    size = g.double().abs().amax(-2) / den * (1 + big / den)
    as_good_as(dx, grads[1], grads[0], "dx", size)


def rms_reference(g: torch.Tensor, k: int, eps: float, dtype=torch.float64):
    """RMSNorm's (k = n) and pRMSNorm's x̂ from their definition: g / sqrt(mean(g[:k]²) + eps)
    over the last dim."""
    g = g.to(dtype)
    return g / (g[..., :k].pow(2).mean(-1, keepdim=True) + eps).sqrt()


@needs_triton
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 5), st.integers(1, 1100), st.floats(0.01, 1), st.integers(0, 2**31 - 1))
def test_triton_rms_step_is_as_accurate_as_float32_definitions(rows, n, p, seed):
    """RMSNorm and pRMSNorm's GPU kernels (rows of up to 1100: past a block of 1024), x̂ and
    its backward, against the definition in float64 and autograd through it: as close as
    the definition in torch's float32 ops, row by row; 1/rms as torch's own step keeps it."""
    k = max(1, int(n * p))
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(rows, 4, n, generator=gen) * 2.0 ** torch.randint(-8, 9, (), generator=gen)
    gx = torch.randn(rows, 4, n, generator=gen)
    xhat, saved = rms_step(g.cuda(), k, 1e-5)
    assert saved[0] is xhat and saved[2] == k
    exact, rival = rms_reference(g, k, 1e-5), rms_reference(g, k, 1e-5, torch.float32)
    as_good_as(xhat, rival, exact, "x̂", exact.abs().amax(-1), dim=-1)
    torch.testing.assert_close(saved[1].cpu(), rms_step(g, k, 1e-5)[1][1], rtol=1e-5, atol=0)
    grads = []
    for dtype in (torch.float64, torch.float32):
        leaf = g.to(dtype).requires_grad_()
        grads += torch.autograd.grad(rms_reference(leaf, k, 1e-5, dtype), leaf, gx.to(dtype))
    dx = rms_step_backward(gx.cuda(), saved)
    size = gx.double().abs().amax(-1) * saved[1].cpu().double().squeeze(-1)
    as_good_as(dx, grads[1], grads[0], "dx", size, dim=-1)


@pytest.mark.parametrize("kind", sorted(native.KINDS))
@pytest.mark.parametrize(
    "device,dtype",
    [
        pytest.param("cpu", torch.float32, marks=needs_compiler),
        pytest.param("cpu", torch.float64, marks=needs_compiler),
        pytest.param("cuda", torch.float32, marks=needs_triton),
    ],
)
def test_a_column_constant_over_the_batch_normalizes_to_zero(kind, device, dtype):
    """x - mean is 0, not the last bit of a rounded mean (then x̂ would be that over eps):
    0.1 summed 3, 7 or 100 times in a row does not come to 0.3, 0.7 or 10 (on a GPU also
    past a kernel's block of rows, 64)."""
    for batch in (3, 7, 100):
        a = torch.randn(2, batch, 5, dtype=dtype, device=device)
        a[:, :, 1] = 0.1
        xhat, mean = compiled_steps(a).step(kind, a, 1e-5, constant(kind, batch))[:2]
        assert torch.equal(xhat[:, :, 1], torch.zeros_like(xhat[:, :, 1])), batch
        assert torch.equal(mean[:, 1], a[:, 0, 1]), batch


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", sorted(native.KINDS))
def test_compiled_step_in_float32_and_of_a_single_step(kind, device):
    """float32 within rounding of the float64 definitions (at a GPU kernel's block sizes and
    past them: 100 rows); a single (B, F) step as the same step stacked alone; a
    non-contiguous gradient as its contiguous copy."""
    steps = triton_steps if device == "cuda" else native
    for batch in (64, 100):
        a = torch.randn(3, batch, 400, dtype=torch.float64) * 3 + 1
        g = torch.randn_like(a)
        c = constant(kind, batch)
        want = [w.squeeze(1) for w in reference(kind, a, 1e-5)[1:]]
        leaf = a.clone().requires_grad_()
        xhat, *_ = reference(kind, leaf, 1e-5)
        (dx,) = torch.autograd.grad(xhat, leaf, g)
        got = steps.step(kind, a.float().to(device), 1e-5, c)
        for w, x in zip([xhat.detach(), *want], got, strict=True):
            assert x.dtype == torch.float32 and x.device.type == device
            torch.testing.assert_close(x.cpu().double(), w, rtol=1e-5, atol=1e-5)
        g32 = g.float().to(device)
        dx32 = steps.step_backward(kind, g32, got[0], got[3], c)
        scale = dx.abs().max().item()
        torch.testing.assert_close(dx32.cpu().double(), dx, rtol=1e-4, atol=1e-4 * scale)
        one = steps.step(kind, a[1].float().to(device), 1e-5, c)
        assert one[0].shape == (batch, 400)
        for w, x in zip(got, one, strict=True):
            torch.testing.assert_close(x.view(w[1].shape), w[1], rtol=0, atol=0)
        strided = g32.transpose(1, 2).contiguous().transpose(1, 2)
        assert not strided.is_contiguous()
        again = steps.step_backward(kind, strided, got[0], got[3], c)
        torch.testing.assert_close(again, dx32, rtol=0, atol=0)


@needs_triton
@pytest.mark.parametrize("kind", sorted(native.KINDS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_steps_in_half_precision(kind, dtype):
    """bfloat16 and float16 steps are float32's steps of the same values, rounded once at
    the end: the sums run in float32 (subnormal results aside). (Against float32's steps of
    the unrounded values they would differ more where x̂ rounds across 0 and L1's sign
    flips.)"""
    a = (torch.randn(2, 64, 300, device="cuda") * 3 + 1).to(dtype)
    g = torch.randn_like(a)
    c = constant(kind, 64)
    unit = 2.0**-8 if dtype == torch.bfloat16 else 2.0**-11  # half an ulp, relative
    want = triton_steps.step(kind, a.float(), 1e-5, c)
    got = triton_steps.step(kind, a, 1e-5, c)
    for w, x in zip(want, got, strict=True):
        assert x.dtype == dtype
        torch.testing.assert_close(x.float(), w, rtol=unit, atol=torch.finfo(dtype).tiny)
    dx = triton_steps.step_backward(kind, g.float(), got[0].float(), got[3].float(), c)
    dxh = triton_steps.step_backward(kind, g, got[0], got[3], c)
    assert dxh.dtype == dtype
    torch.testing.assert_close(dxh.float(), dx, rtol=unit, atol=torch.finfo(dtype).tiny)


@needs_triton
@pytest.mark.parametrize("kind", sorted(triton_steps.KINDS))
def test_triton_steps_in_a_cuda_graph(kind):
    """A step and its backward captured in a CUDA graph (as the sequence path captures its
    loops) and replayed on new values give the eager numbers exactly."""
    a, g = torch.randn(64, 200, device="cuda"), torch.randn(64, 200, device="cuda")
    c = constant(kind, 64)
    triton_steps.step(kind, a, 1e-5, c)  # warm: both kernels compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        xhat, mean, stat, den = triton_steps.step(kind, a, 1e-5, c)
        dx = triton_steps.step_backward(kind, g, xhat, den, c)
    a.copy_(torch.randn_like(a) * 2 - 1)
    g.copy_(torch.randn_like(g))
    graph.replay()
    want = triton_steps.step(kind, a.clone(), 1e-5, c)
    for w, x in zip(want, (xhat, mean, stat, den), strict=True):
        assert torch.equal(x, w)
    assert torch.equal(dx, triton_steps.step_backward(kind, g.clone(), want[0], want[3], c))


def test_a_gpu_that_triton_cannot_run_on_falls_back_with_a_warning(monkeypatch):
    """The kernels are tried once per device; where they fail (an older GPU, a broken
    driver), a warning names the error and torch's ops take over, instead of the run
    failing at its first step. (Without a GPU: the probe's kernels replaced.)"""
    calls = []

    def broken(*args):
        calls.append(args[0])
        raise RuntimeError("Triton does not support this GPU (sm_52)")

    triton_steps.works.cache_clear()
    try:
        monkeypatch.setattr(triton_steps, "step", broken)
        with pytest.warns(UserWarning, match=r"torch's ops.*sm_52"):
            assert not triton_steps.works(torch.device("cpu"))
        assert not triton_steps.works(torch.device("cpu")) and calls == ["l1"]  # once
        monkeypatch.setattr(triton_steps, "step", lambda *args: None)
        monkeypatch.setattr(triton_steps, "rms_step", lambda *args: None)
        assert triton_steps.works(torch.device("meta"))
    finally:
        triton_steps.works.cache_clear()


@needs_triton
def test_triton_steps_apply_to_contiguous_float_cuda_tensors_and_switch_off(monkeypatch):
    """float32 and half precision on the GPU take the kernels; float64 and strided tensors
    torch's ops, with the same numbers; ``NORMRNN_NATIVE=0`` switches them off."""
    a = torch.randn(64, 400, device="cuda")
    assert triton_steps.applies(a, "l1") and triton_steps.applies(a.bfloat16(), "linf")
    assert not triton_steps.applies(a.double(), "l1") and not triton_steps.applies(a.t(), "l1")
    term = L1BatchNorm(400, max_steps=2).cuda()
    assert isinstance(term.step(a, 0)[1], Compiled)
    torch.testing.assert_close(term.step(a, 0)[0], term.step(a.double(), 0)[0].float())
    monkeypatch.setenv("NORMRNN_NATIVE", "0")
    triton_steps.available.cache_clear()
    try:
        assert not triton_steps.applies(a, "l1") and isinstance(term.step(a, 0)[1], Estimated)
    finally:
        monkeypatch.undo()
        triton_steps.available.cache_clear()


@needs_compiler
def test_the_steps_are_taken_where_they_apply_and_not_elsewhere():
    """The batch norms use the compiled steps in training on contiguous float CPU tensors;
    L∞ with k > 1, half precision, strided inputs and L2 past its limit take torch's ops,
    with the same numbers."""
    a = torch.randn(64, 400)
    assert native.applies(a, "l1") and native.applies(a.double(), "l2")
    assert not native.applies(a.half(), "l1") and not native.applies(a.t(), "l1")
    block = torch.randn(native.LIMIT["l2"] // 400 + 1, 400)  # L2 past its limit: torch's
    assert isinstance(BatchNormTerm(400, max_steps=1).step(block, 0)[1], L2Kernel)
    assert isinstance(L1BatchNorm(400, max_steps=1).step(block, 0)[1], Compiled)
    assert isinstance(L1BatchNorm(400, max_steps=2).step(a, 0)[1], Compiled)
    assert not isinstance(LinfBatchNorm(400, max_steps=2, k=3).step(a, 0)[1], Compiled)
    assert LinfBatchNorm(400, max_steps=2).native_kind == "linf"

    class Median(L1BatchNorm):  # an estimator of its own: no kernel for it
        def statistic(self, centered, w=None):
            return centered.abs().median(1, keepdim=True).values

    assert Median(400, max_steps=2).native_kind is None
    term = BatchNormTerm(400, max_steps=2)
    strided = term.step(a.t().contiguous().t(), 0)  # torch's kernel
    assert isinstance(strided[1], L2Kernel)
    torch.testing.assert_close(strided[0], term.step(a, 0)[0], rtol=1e-5, atol=1e-5)


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """``native.library`` loaded anew, from a cache of the test's own (and afterwards anew
    again, from the usual one)."""
    monkeypatch.setenv("NORMRNN_NATIVE_CACHE", str(tmp_path / "cache"))
    native.library.cache_clear()
    yield tmp_path / "cache"
    native.library.cache_clear()


@needs_compiler
def test_parallel_builds_leave_one_library_that_later_calls_reuse(tmp_path):
    """Two jobs building into one empty cache at once both get the same file, nothing else
    is left there, and a later build finds it instead of compiling again."""
    cache = tmp_path / "cache"
    code = "import sys; from normrnn.compute import native; print(native.build(sys.argv[1]))"
    jobs = [
        subprocess.Popen([sys.executable, "-c", code, str(cache)], stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    paths = {job.communicate(timeout=300)[0].decode().strip() for job in jobs}
    assert [job.returncode for job in jobs] == [0, 0]
    (built,) = paths
    assert [p.name for p in cache.iterdir()] == [Path(built).name]
    stamp = Path(built).stat().st_mtime_ns
    assert native.build(cache) == Path(built) and Path(built).stat().st_mtime_ns == stamp


@needs_compiler
def test_a_changed_source_builds_a_new_library(tmp_path, monkeypatch):
    """A change to any source, or to a header (the sources include them from ``CSRC``),
    names a new library."""
    source = tmp_path / "recurrence.cpp"
    source.write_text(native.SOURCES[1].read_text() + "\n// changed\n")
    first = native.build(tmp_path / "cache")
    monkeypatch.setattr(native, "SOURCES", (native.SOURCES[0], source))
    second = native.build(tmp_path / "cache")
    headers = tmp_path / "csrc"
    headers.mkdir()
    for header in native.CSRC.glob("*.h"):
        (headers / header.name).write_text(header.read_text() + "\n// changed\n")
    monkeypatch.setattr(native, "CSRC", headers)
    third = native.build(tmp_path / "cache")
    assert len({first, second, third}) == 3 and all(p.exists() for p in (first, second, third))


@needs_compiler
def test_a_failed_build_names_the_error_and_falls_back(fresh_library, monkeypatch, tmp_path):
    """A source that does not compile: ``build`` raises with the compiler's message; the
    library is off with a warning saying so, and a batch norm steps in torch's ops."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCES", (native.SOURCES[0], broken))
    with pytest.raises(subprocess.CalledProcessError) as err:
        native.build(tmp_path / "other")
    assert "broken.cpp" in err.value.stderr
    with pytest.warns(UserWarning, match="torch's ops"):
        assert native.library() is None
    assert not native.applies(torch.randn(4, 3), "l1")
    assert isinstance(L1BatchNorm(3, max_steps=1).step(torch.randn(4, 3), 0)[1], Estimated)


def test_no_compiler_or_switched_off_means_torchs_ops(fresh_library, monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-normrnn")
    with pytest.warns(UserWarning, match="no C\\+\\+ compiler \\(no-such-compiler-normrnn\\)"):
        assert native.library() is None
    native.library.cache_clear()
    monkeypatch.setenv("NORMRNN_NATIVE", "0")
    monkeypatch.delenv("CXX")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is None
    assert not fresh_library.exists()  # nothing was built
