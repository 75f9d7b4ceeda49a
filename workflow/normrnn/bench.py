"""Benchmark every norm × quantizer cell against the fused torch.nn.LSTM / GRU.

    python -m normrnn.bench --hidden 256 --batch 64 --steps 100 [--json out.json]

For each variant and its fused baseline of the same size (same process, timed alternately,
warm-up excluded, median of ``--repeats``): training-step throughput (forward + backward of
one sequence) and inference throughput, as ratios to the baseline; the memory a training step
saves for backward (exact, from autograd's saved-tensor hooks; on CUDA the peak allocated);
and the fraction of the machine's sgemm roof the training step reaches. The threads and the
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

from . import memory
from .cells import CELLS
from .norms import NORMS
from .paths import step_kernels
from .quantizers import QUANTIZERS
from .sequence import POOL, kept_tensors


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


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors kept for backward by ``fn()``'s graph: those autograd
    saves, and those the sequence path keeps beside it (its workspace and the terms' steps)."""
    seen = {}

    def pack(t):
        if t.device.type != "meta":
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    for node in _graph_nodes(out.grad_fn):
        for t in kept_tensors(node):
            pack(t)
    del out
    return sum(seen.values())


def _graph_nodes(root) -> list:
    nodes, todo, seen = [], [root], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        todo.extend(n for n, _ in node.next_functions)
    return nodes


def time_pair(f_base, f_var, device, warmup, repeats):
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
    return statistics.median(base), statistics.median(var)


def bench_variant(cell, norm, quant, args, device, dtype, roof):
    POOL.free.clear()  # the last variant's buffers and graphs would count in this one's memory
    torch.manual_seed(0)
    inp, h, b, t = args.input, args.hidden, args.batch, args.steps
    layer = CELLS[cell](inp, h, norm=norm, quant=quant, max_steps=t).to(device, dtype)
    fused = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(inp, h).to(device, dtype)
    x = torch.randn(t, b, inp, device=device, dtype=dtype)

    def train(module):
        def f():
            module.zero_grad(set_to_none=True)
            module(x)[0].pow(2).mean().backward()

        return f

    def infer(module):
        def f():
            with torch.no_grad():
                module(x)

        return f

    layer.train()
    base_t, var_t = time_pair(train(fused), train(layer), device, args.warmup, args.repeats)
    route = layer.route  # how the timed training step ran (paths.choose)
    layer.eval()
    base_i, var_i = time_pair(infer(fused), infer(layer), device, args.warmup, args.repeats)
    layer.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        train(layer)()
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = saved_bytes(lambda: layer(x)[0].pow(2).mean())
    flops = step_flops(cell, inp, h, b, t)
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
        "train_ms": 1000 * var_t,
        "train_ms_fused": 1000 * base_t,
        "train_ratio": base_t / var_t,
        "infer_ratio": base_i / var_i,
        "peak_mem_mb": peak / 2**20,
        "roof_fraction": flops / var_t / 1e9 / roof,
        "roof_fraction_fused": flops / base_t / 1e9 / roof,
    }


def parse(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m normrnn.bench", description=__doc__.split("\n\n")[0]
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
        for norm in args.norms.split(","):
            for quant in args.quants.split(","):
                NORMS[norm], QUANTIZERS[quant], CELLS[cell]  # unknown names fail early
                row = bench_variant(cell, norm, quant, args, device, dtype, roof)
                rows.append({**row, **{k: env[k] for k in ROW_ENV}})
                print(
                    f"{cell:4s} {norm:12s} {quant:5s} {row['path']:8s} {row['recurrence']:8s} "
                    f"train {row['train_ratio']:.2f}x "
                    f"infer {row['infer_ratio']:.2f}x of fused, {row['train_ms']:.1f} ms/step, "
                    f"{row['roof_fraction']:.0%} of roof, saved {row['peak_mem_mb']:.1f} MB",
                    flush=True,
                )
    return env, rows


def main(argv=None) -> int:
    args = parse(argv)
    print(
        f"normrnn.bench: H={args.hidden} B={args.batch} T={args.steps} input={args.input}",
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
