"""The compiled batch-norm steps (``normrnn.native``) against torch's ops and autograd, and
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

from normrnn import native
from normrnn.norms import BatchNormTerm, L1BatchNorm, LinfBatchNorm, linf_constant

needs_compiler = pytest.mark.skipif(native.compiler() is None, reason="no C++ compiler")


def constant(kind: str, n: int) -> float:
    return {"l2": 1.0, "l1": math.sqrt(math.pi / 2), "linf": linf_constant(n)}[kind]


def reference(kind: str, a: torch.Tensor, eps: float):
    """x̂, mean, statistic and denominator of each step of ``a`` (C, B, F), from the
    estimators' definitions in float64, the mean correctly rounded (a column constant over
    the batch has x - mean = 0 exactly, not ±ulp, which x̂ would blow up to ±ulp / eps)."""
    a = a.double()
    exact = np.asarray(a.detach().numpy(), dtype=np.longdouble).mean(1, keepdims=True)
    mean = a.mean(1, keepdim=True)  # its gradient, with the correctly rounded value:
    mean = mean + (torch.from_numpy(exact.astype(np.float64)) - mean).detach()
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


@needs_compiler
@pytest.mark.parametrize("kind", sorted(native.KINDS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_column_constant_over_the_batch_normalizes_to_zero(kind, dtype):
    """x - mean is 0, not the last bit of a rounded mean (then x̂ would be that over eps):
    0.1 summed 3, 7 or 100 times in a row does not come to 0.3, 0.7 or 10."""
    for batch in (3, 7, 100):
        a = torch.randn(2, batch, 5, dtype=dtype)
        a[:, :, 1] = 0.1
        xhat, mean = native.step(kind, a, 1e-5, constant(kind, batch))[:2]
        assert torch.equal(xhat[:, :, 1], torch.zeros_like(xhat[:, :, 1])), batch
        assert torch.equal(mean[:, 1], a[:, 0, 1]), batch


@needs_compiler
@pytest.mark.parametrize("kind", sorted(native.KINDS))
def test_compiled_step_in_float32_and_of_a_single_step(kind):
    """float32 within rounding of the float64 result; a single (B, F) step as the same step
    stacked alone; a non-contiguous gradient as its contiguous copy."""
    a = torch.randn(3, 64, 400, dtype=torch.float64) * 3 + 1
    g = torch.randn_like(a)
    c = constant(kind, 64)
    want = native.step(kind, a, 1e-5, c)
    got = native.step(kind, a.float(), 1e-5, c)
    for w, x in zip(want, got, strict=True):
        assert x.dtype == torch.float32
        torch.testing.assert_close(x.double(), w, rtol=1e-5, atol=1e-5)
    dx = native.step_backward(kind, g, want[0], want[3], c)
    dx32 = native.step_backward(kind, g.float(), got[0], got[3], c)
    torch.testing.assert_close(dx32.double(), dx, rtol=1e-4, atol=1e-4 * dx.abs().max().item())
    one = native.step(kind, a[1], 1e-5, c)
    assert one[0].shape == (64, 400)
    for w, x in zip(want, one, strict=True):
        torch.testing.assert_close(x.view(w[1].shape), w[1], rtol=0, atol=0)
    strided = g.transpose(1, 2).contiguous().transpose(1, 2)
    assert not strided.is_contiguous()
    torch.testing.assert_close(native.step_backward(kind, strided, want[0], want[3], c), dx)


@needs_compiler
def test_the_steps_are_taken_where_they_apply_and_not_elsewhere():
    """The batch norms use the compiled steps in training on contiguous float CPU tensors;
    L∞ with k > 1, half precision, strided inputs and L2 past its limit take torch's ops,
    with the same numbers."""
    a = torch.randn(64, 400)
    assert native.applies(a, "l1") and native.applies(a.double(), "l2")
    assert not native.applies(a.half(), "l1") and not native.applies(a.t(), "l1")
    block = torch.randn(native.LIMIT["l2"] // 400 + 1, 400)  # L2 past its limit: torch's
    assert BatchNormTerm(400, max_steps=1).step(block, 0)[1][0] == "l2"
    assert L1BatchNorm(400, max_steps=1).step(block, 0)[1][0] == "native"
    assert L1BatchNorm(400, max_steps=2).step(a, 0)[1][0] == "native"
    assert LinfBatchNorm(400, max_steps=2, k=3).step(a, 0)[1][0] != "native"
    assert LinfBatchNorm(400, max_steps=2).native_kind == "linf"

    class Median(L1BatchNorm):  # an estimator of its own: no kernel for it
        def statistic(self, centered, w=None):
            return centered.abs().median(1, keepdim=True).values

    assert Median(400, max_steps=2).native_kind is None
    term = BatchNormTerm(400, max_steps=2)
    strided = term.step(a.t().contiguous().t(), 0)  # torch's kernel
    assert strided[1][0] == "l2"
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
    code = "import sys; from normrnn import native; print(native.build(sys.argv[1]))"
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
    source = tmp_path / "batchnorm_step.cpp"
    source.write_text(native.SOURCE.read_text() + "\n// changed\n")
    first = native.build(tmp_path / "cache")
    monkeypatch.setattr(native, "SOURCE", source)
    second = native.build(tmp_path / "cache")
    assert first != second and first.exists() and second.exists()


@needs_compiler
def test_a_failed_build_names_the_error_and_falls_back(fresh_library, monkeypatch, tmp_path):
    """A source that does not compile: ``build`` raises with the compiler's message; the
    library is off with a warning saying so, and a batch norm steps in torch's ops."""
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "SOURCE", broken)
    with pytest.raises(subprocess.CalledProcessError) as err:
        native.build(tmp_path / "other")
    assert "broken.cpp" in err.value.stderr
    with pytest.warns(UserWarning, match="torch's ops"):
        assert native.library() is None
    assert not native.applies(torch.randn(4, 3), "l1")
    assert L1BatchNorm(3, max_steps=1).step(torch.randn(4, 3), 0)[1][0] == "batch"


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
