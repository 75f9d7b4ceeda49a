"""The compute paths run side by side: a layer's outputs, state, gradients and buffers on a
path, and the comparisons the path tests make (CPU and GPU)."""

import torch

from normrnn import CELLS, NORMS, QUANTIZERS


def default_path(cell, norm):
    return CELLS[cell](2, 4, norm=norm).path


FAST = [(c, n) for c in sorted(CELLS) for n in sorted(NORMS) if default_path(c, n) != "loop"]


def run_path(cell, norm, quant, path, train=True, steps=6, hidden=16, device="cpu", opts=None):
    """Outputs, final state, the input's and every parameter's gradient, and the buffers
    (batch norms' population statistics) after one forward and backward on ``path``. In eval
    mode the population statistics come from one training batch first. The same numbers on
    any ``device``: the layer and the inputs are drawn on the CPU, then moved. ``opts``: the
    norm's options."""
    torch.manual_seed(0)
    # pRMS's default p leaves k = 1 of 16 units: conditioning too poor for a 1e-5 comparison
    opts = {"p": 0.25} if norm in ("prms", "prms_zhang") else opts
    layer = CELLS[cell](5, hidden, norm=norm, quant=quant, max_steps=steps, norm_opts=opts)
    layer.to(device)
    if not train:
        layer(torch.randn(steps, 4, 5).to(device))
        layer.eval()
    layer.path = path
    x = torch.randn(steps, 4, 5).to(device).requires_grad_()
    state = tuple(
        torch.randn(4, hidden).to(device).requires_grad_() for _ in layer.initial_state(x)
    )
    y, last = layer(x, state)
    (y.pow(2).mean() + sum(s.mean() for s in last)).backward()
    out = {"y": y, "x.grad": x.grad}
    out.update({f"last{i}": s for i, s in enumerate(last)})
    out.update({f"state{i}.grad": s.grad for i, s in enumerate(state)})
    out.update({f"{n}.grad": p.grad for n, p in layer.named_parameters() if p.grad is not None})
    out.update({n: b for n, b in layer.named_buffers() if b.is_floating_point()})
    return out


def assert_same(got: dict, ref: dict) -> None:
    """Each tensor of ``got`` equals ``ref``'s to 1e-5 of its scale (fp32 paths)."""
    for name, expected in ref.items():
        atol = 1e-5 * max(1.0, expected.abs().max().item())
        torch.testing.assert_close(got[name], expected, atol=atol, rtol=1e-5, msg=name)


# every quantizer in training; in eval mode, where only the batch norms change, two
MODES = [(q, True) for q in sorted(QUANTIZERS)] + [("fp", False), ("twn", False)]


def close(got, expected, label, scale=1.0):
    """To 1e-5 of the tensor's scale (times ``scale``), as the CPU's path tests."""
    atol = 1e-5 * scale * max(1.0, expected.abs().max().item())
    torch.testing.assert_close(got, expected, atol=atol, rtol=1e-5, msg=lambda m: f"{label}: {m}")
