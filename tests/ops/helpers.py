"""Shared by the op tests: the float64 step-by-step oracles, input makers and tolerances.

The Triton kernels run on CPU tensors inside `triton_on_cpu()` through Triton's interpreter; TRITON_INTERPRET must be
set before the kernel modules are imported (done here, and in tests/conftest.py).
"""
import importlib
import os
import sys

os.environ["TRITON_INTERPRET"] = "1"
for _name in ("causal_conv1d.triton_causal_conv1d", "mamba_ssm.ops.triton.selective_scan",
              "mamba_ssm.ops.triton.layernorm_kernel"):
    if _name in sys.modules:  # imported before the variable was set: re-decorate the kernels
        importlib.reload(sys.modules[_name])

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mamba_ssm.ops.bimamba_interface import ScanWeights  # noqa: E402


TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}  # relative L2 error (see benchmarks for full-size numbers)


def conv_by_taps(x, weight, bias, activation):
    width = weight.shape[1]
    out = torch.zeros_like(x) if bias is None else bias[None, :, None].expand_as(x).clone()
    for k in range(width):
        shift = width - 1 - k  # tap k looks `shift` steps back
        out[..., shift:] += weight[None, :, k, None] * x[..., :x.shape[-1] - shift]
    return F.silu(out) if activation else out


def scan_by_steps(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan one time step at a time, in float64: the oracle."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []

    def at(M, t):  # B or C at step t as (batch, dim, N)
        if M.dim() == 2:
            return M.expand(batch, dim, -1)
        if M.dim() == 3:
            return M[:, None, :, t].expand(batch, dim, -1)
        return M[:, :, :, t].repeat_interleave(dim // M.shape[1], dim=1)

    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        ys.append((h * at(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def make_scan_inputs(batch=2, dim=6, length=13, d_state=4, bc="variable", dtype=torch.float32, requires_grad=False):
    shapes = {"fixed": (dim, d_state), "variable": (batch, d_state, length), "grouped": (batch, 2, d_state, length)}
    t = {
        "u": torch.randn(batch, dim, length),
        "delta": 0.5 * torch.randn(batch, dim, length),
        "A": -(0.1 + torch.rand(dim, d_state)),
        "B": torch.randn(shapes[bc]),
        "C": torch.randn(shapes[bc]),
        "D": torch.randn(dim),
        "z": torch.randn(batch, dim, length),
        "delta_bias": 0.5 * torch.randn(dim),
    }
    for k in ("u", "delta", "B", "C", "z"):
        t[k] = t[k].to(dtype)
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads(out, inputs, g):
    tensors = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, tensors, g)


def assert_close_all(outs, refs, dtype, names):
    for name, a, r in zip(names, outs, refs):
        assert torch.isfinite(a).all(), f"{name}: non-finite values"
        assert rel(a, r) < TOL[dtype], f"{name}: relative error {rel(a, r):.2e}"


def scan_inputs(batch, dim, seqlen, d_state, dtype, b_layout="var", groups=1):
    u = torch.randn(batch, dim, seqlen, dtype=dtype)
    delta = (0.5 * torch.randn(batch, dim, seqlen)).to(dtype)
    A = -torch.rand(dim, d_state) - 0.5
    if b_layout == "fixed":
        B = torch.randn(dim, d_state)
    elif groups > 1:
        B = torch.randn(batch, groups, d_state, seqlen, dtype=dtype)
    else:
        B = torch.randn(batch, d_state, seqlen, dtype=dtype)
    C = torch.randn(batch, d_state, seqlen, dtype=dtype)
    D = torch.randn(dim)
    z = torch.randn(batch, dim, seqlen, dtype=dtype)
    bias = 0.3 * torch.randn(dim)
    return [t.requires_grad_() for t in (u, delta, A, B, C, D, z, bias)]


def scan_weights(dim, dt_rank, d_state, dtype):
    w = ScanWeights(0.5 * torch.randn(dim, 1, 4), 0.1 * torch.randn(dim), 0.2 * torch.randn(dt_rank + 2 * d_state, dim),
                    0.3 * torch.randn(dim, dt_rank), 0.3 * torch.randn(dim) - 1, -torch.rand(dim, d_state) - 0.5,
                    torch.randn(dim))
    return ScanWeights(*[t.to(dtype) if i < 4 else t for i, t in enumerate(w)])
