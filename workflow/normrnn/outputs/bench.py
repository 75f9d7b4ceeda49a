"""Benchmark every norm × quantizer cell against the fused torch.nn.LSTM / GRU.

    python -m normrnn bench --hidden 256 --batch 64 --steps 100 [--json out.json]

For each variant and its fused baseline of the same size (same process, timed alternately,
warm-up excluded): training-step throughput (forward + backward of one sequence) and inference
throughput, as ratios to the baseline, each the median of the ``--repeats`` repeats' ratios
with their 25th and 75th percentiles (``*_ratio_lo``, ``*_ratio_hi``: the noise); the memory a
training step saves for backward (exact, from autograd's saved-tensor hooks; on CUDA the peak
allocated); and the fraction of the machine's sgemm roof the training step reaches. Each cell's
first row, norm ``fused``, times the fused kernel against a second instance of itself: its
ratio is 1 but for the noise, which its spread shows. The threads and the
memory allocator are recorded: the allocator alone moves the CPU baseline by a factor of up to
2.4 (``memory.py``). Like the pipeline's jobs, the bench has glibc keep freed memory, unless
``--glibc-defaults``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from ..compute import memory
from ..compute.paths import step_kernels
from ..compute.sequence import POOL
from ..methods.cells import CELLS
from ..methods.norms import NORMS
from ..methods.quantizers import QUANTIZERS
from ..pipeline.diagnostics import saved_bytes


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def sgemm_gflops(device, dtype, n=1024, repeats=10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def step_flops(cell, inp, hidden, batch, steps) -> float:
    """Matmul FLOPs of one training step (forward, and twice that for backward)."""
    gates = CELLS[cell].gates
    return 3 * 2 * steps * batch * (inp + hidden) * gates * hidden


def time_pair(f_base, f_var, device, warmup, repeats) -> tuple[list[float], list[float]]:
    """Every repeat's seconds of ``f_base()`` and of ``f_var()``, timed alternately (repeat
    ``i``'s two times are neighbours: their ratio is that repeat's)."""
    for _ in range(warmup):
        f_base()
        f_var()
    base, var = [], []
    for _ in range(repeats):
        for f, acc in ((f_base, base), (f_var, var)):
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            acc.append(time.perf_counter() - t0)
    return base, var


def ratio_spread(base: list[float], var: list[float]) -> tuple[float, float, float]:
    """The median of the per-repeat ratios ``base[i] / var[i]`` and their 25th and 75th
    percentiles (``statistics.quantiles``, inclusive: the median's own interpolation)."""
    ratios = [b / v for b, v in zip(base, var, strict=True)]
    median = statistics.median(ratios)
    if len(ratios) < 2:
        return median, median, median
    lo, _, hi = statistics.quantiles(ratios, n=4, method="inclusive")
    return median, min(lo, median), max(hi, median)  # (min/max: rounding only)


def _fused(cell, inp, hidden):
    return (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(inp, hidden)


def _train(module, x):
    def f():
        module.zero_grad(set_to_none=True)
        module(x)[0].pow(2).mean().backward()

    return f


def _infer(module, x):
    def f():
        with torch.no_grad():
            module(x)

    return f


def _memory(module, x, device) -> int:
    """What a training step of ``module`` keeps for backward (on CUDA: the peak allocated)."""
    module.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        _train(module, x)()
        return torch.cuda.max_memory_allocated(device)
    return saved_bytes(lambda: module(x)[0].pow(2).mean())


def _timings(train, infer, flops, roof) -> dict:
    """A row's timing columns from ``time_pair``'s training and inference repeats."""
    (base_t, var_t), (base_i, var_i) = train, infer
    train_ratio, train_lo, train_hi = ratio_spread(base_t, var_t)
    infer_ratio, infer_lo, infer_hi = ratio_spread(base_i, var_i)
    var_ms, base_ms = statistics.median(var_t), statistics.median(base_t)
    return {
        "train_ms": 1000 * var_ms,
        "train_ms_fused": 1000 * base_ms,
        "train_ratio": train_ratio,
        "train_ratio_lo": train_lo,
        "train_ratio_hi": train_hi,
        "infer_ratio": infer_ratio,
        "infer_ratio_lo": infer_lo,
        "infer_ratio_hi": infer_hi,
        "repeats": len(base_t),
        "roof_fraction": flops / var_ms / 1e9 / roof,
        "roof_fraction_fused": flops / base_ms / 1e9 / roof,
    }


def bench_fused(cell, args, device, dtype, roof):
    """The sanity check: the fused ``nn.LSTM`` (``nn.GRU``) timed against a second instance of
    itself, as every variant is against it. Its ratios are 1 but for the noise."""
    POOL.free.clear()
    torch.manual_seed(0)
    inp, h, b, t = args.input, args.hidden, args.batch, args.steps
    base = _fused(cell, inp, h).to(device, dtype)
    twin = _fused(cell, inp, h).to(device, dtype)
    x = torch.randn(t, b, inp, device=device, dtype=dtype)
    for module in (base, twin):
        module.train()
    train = time_pair(_train(base, x), _train(twin, x), device, args.warmup, args.repeats)
    for module in (base, twin):
        module.eval()
    infer = time_pair(_infer(base, x), _infer(twin, x), device, args.warmup, args.repeats)
    peak = _memory(twin, x, device)
    return {
        "cell": cell,
        "norm": "fused",
        "quant": "fp",
        "path": "fused",
        "recurrence": "",
        "step_kernels": "",
        "cuda_graphs": False,
        "hidden": h,
        "batch": b,
        "steps": t,
        "input": inp,
        **_timings(train, infer, step_flops(cell, inp, h, b, t), roof),
        "peak_mem_mb": peak / 2**20,
    }


def bench_variant(cell, norm, quant, args, device, dtype, roof):
    POOL.free.clear()  # the last variant's buffers and graphs would count in this one's memory
    torch.manual_seed(0)
    inp, h, b, t = args.input, args.hidden, args.batch, args.steps
    layer = CELLS[cell](inp, h, norm=norm, quant=quant, max_steps=t).to(device, dtype)
    fused = _fused(cell, inp, h).to(device, dtype)
    x = torch.randn(t, b, inp, device=device, dtype=dtype)

    layer.train()
    train = time_pair(_train(fused, x), _train(layer, x), device, args.warmup, args.repeats)
    route = layer.route  # how the timed training step ran (paths.choose)
    layer.eval()
    infer = time_pair(_infer(fused, x), _infer(layer, x), device, args.warmup, args.repeats)
    peak = _memory(layer, x, device)
    return {
        "cell": cell,
        "norm": norm,
        "quant": quant,
        "path": route.path,
        "recurrence": route.recurrence,
        "step_kernels": route.steps,
        "cuda_graphs": route.graphs,
        "hidden": h,
        "batch": b,
        "steps": t,
        "input": inp,
        **_timings(train, infer, step_flops(cell, inp, h, b, t), roof),
        "peak_mem_mb": peak / 2**20,
    }


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m normrnn bench", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100, help="sequence length T")
    p.add_argument("--input", type=int, default=None, help="input size (default: hidden)")
    p.add_argument("--norms", default=",".join(NORMS), help="comma-separated, default all")
    p.add_argument("--quants", default="fp,bc,twn")
    p.add_argument("--cells", default="lstm,gru")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA fp32 matmuls in TF32, for cuDNN and for torch alike (default: neither)",
    )
    p.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's malloc at its defaults: freed memory unmapped at once, which "
        "slows the fused baseline (default: kept, as in the pipeline's jobs)",
    )
    p.add_argument("--json", default=None, help="write the rows as a JSON list here")
    p.add_argument("--csv", default=None, help="write the rows as CSV here")
    args = p.parse_args(argv)
    args.input = args.input or args.hidden
    return args


def options(**spec) -> argparse.Namespace:
    """The bench's options as values (a config's ``bench.<name>``): the command line's
    defaults, then ``spec``, with lists for ``norms``, ``quants`` and ``cells``."""
    args = parse([])
    for key, value in spec.items():
        if key not in vars(args) or key in ("json", "csv"):
            raise ValueError(f"bench: unknown option {key!r}")
        setattr(args, key, ",".join(value) if isinstance(value, list | tuple) else value)
    args.input = spec.get("input") or args.hidden
    return args


ROW_ENV = (
    "threads",
    "allocator",
    "device",
    "dtype",
    "tf32",
)  # repeated in every row


def run(args) -> tuple[dict, list[dict]]:
    if not args.glibc_defaults:
        memory.keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    # cuDNN's RNN multiplies fp32 in TF32 by default, torch's matmul does not: a baseline
    # on other terms than the cells. One setting for both.
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.tf32
    roof = sgemm_gflops(device, dtype)
    env = {
        "torch": torch.__version__,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "allocator": memory.describe(),
        "sgemm_gflops": roof,
        "machine": platform.processor() or platform.machine(),
        "tf32": args.tf32 if device.type == "cuda" else None,
        "step_kernels": step_kernels(device),
    }
    rows = []
    for cell in args.cells.split(","):
        CELLS[cell]  # an unknown cell fails before its sanity row
        rows.append(_printed({**bench_fused(cell, args, device, dtype, roof), **_env(env)}))
        for norm in args.norms.split(","):
            for quant in args.quants.split(","):
                NORMS[norm], QUANTIZERS[quant]  # unknown names fail early
                row = bench_variant(cell, norm, quant, args, device, dtype, roof)
                rows.append(_printed({**row, **_env(env)}))
    return env, rows


def _env(env: dict) -> dict:
    return {k: env[k] for k in ROW_ENV}


def _printed(row: dict) -> dict:
    print(
        f"{row['cell']:4s} {row['norm']:12s} {row['quant']:5s} {row['path']:8s} "
        f"{row['recurrence']:8s} train {row['train_ratio']:.2f}x "
        f"[{row['train_ratio_lo']:.2f}-{row['train_ratio_hi']:.2f}] "
        f"infer {row['infer_ratio']:.2f}x [{row['infer_ratio_lo']:.2f}-{row['infer_ratio_hi']:.2f}]"
        f" of fused (median [25-75 %] of {row['repeats']}), {row['train_ms']:.1f} ms/step, "
        f"{row['roof_fraction']:.0%} of roof, saved {row['peak_mem_mb']:.1f} MB",
        flush=True,
    )
    return row


def main(argv=None) -> int:
    args = parse(argv)
    print(
        f"normrnn.outputs.bench: H={args.hidden} B={args.batch} T={args.steps} input={args.input}",
        flush=True,
    )
    env, rows = run(args)
    print(
        f"machine: {env['machine']}, {env['device']}, {env['dtype']}, {env['threads']} threads, "
        f"allocator {env['allocator']}, tf32 {env['tf32']}, compiled steps {env['step_kernels']}, "
        f"sgemm roof {env['sgemm_gflops']:.1f} GFLOP/s, "
        f"fused training step at {rows[0]['roof_fraction_fused']:.0%} of it"
        if rows
        else "",
        flush=True,
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    if args.csv:
        import pandas as pd

        pd.DataFrame(rows).assign(sgemm_gflops=env["sgemm_gflops"]).to_csv(args.csv, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
