"""Dispatch between the Triton kernels and the references, the custom ops (registration, FLOP formulas seen by
FlopCounterMode), the eager fast path, errors and the environment report."""
import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn
from causal_conv1d.conv_op import conv_macs
from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_fn
from mamba_ssm.ops.dispatch import FORCE_REFERENCE_ENV, triton_enabled, triton_on_cpu
from mamba_ssm.ops.scan_op import scan_macs
from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
from mamba_ssm.ops.triton.layernorm import rms_norm_fn
from tests.ops.helpers import grads, scan_inputs, scan_weights


def test_flop_counter_sees_the_scan():
    """FlopCounterMode counts the custom op with the MACs of docs/reference.md section 4 (x2 FLOPs), per direction run."""
    u, delta, A, B, C, D, z, bias = scan_inputs(2, 40, 23, 8, torch.float32)
    with triton_on_cpu(), FlopCounterMode(display=False) as counter:
        selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)
    assert counter.get_total_flops() == 2 * (9 * 2 * 23 * 40 * 8 + 2 * 2 * 23 * 40)
    assert scan_macs((2, 2, 40, 23), 8) == 2 * (9 * 2 * 23 * 40 * 8 + 2 * 2 * 23 * 40)
    x, w = torch.randn(2, 40, 23), torch.randn(40, 4)
    with triton_on_cpu(), FlopCounterMode(display=False) as counter:
        causal_conv1d_fn(x, w, None, activation="silu")
    assert counter.get_total_flops() == 2 * conv_macs((2, 40, 23), (1, 40, 4)) == 2 * 2 * (23 + 3) * 40 * 4


def test_eager_calls_skip_the_dispatcher_but_not_what_watches_ops():
    """Eager calls run the implementations (an autograd.Function when a gradient is needed); torch.compile,
    FlopCounterMode and FakeTensorMode get the custom ops. Same values and gradients either way."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from causal_conv1d.kernel_utils import needs_grad, ops_watched

    x, w = torch.randn(2, 3), torch.randn(3).requires_grad_()
    assert not ops_watched() and needs_grad(x, w) and not needs_grad(x, None)
    with torch.no_grad():
        assert not needs_grad(x, w)
        with FlopCounterMode(display=False):
            assert ops_watched()
    with FakeTensorMode():
        assert ops_watched()
    batch, dim, seqlen = 2, 16, 19
    weights = [scan_weights(dim, 4, 8, torch.float32) for _ in range(2)]
    leaves = [t.detach().requires_grad_() for t in (torch.randn(batch, seqlen, 2 * dim).transpose(1, 2),
                                                   *weights[0], *weights[1])]
    args = (leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]))
    g = torch.randn(batch, dim, seqlen)
    results, backward_nodes = [], []
    for watched in (False, True):
        with triton_on_cpu(), FlopCounterMode(display=False) if watched else torch.enable_grad() as counter:
            out = bimamba_v2_inner_fn(*args)
            backward_nodes.append(type(out.grad_fn).__name__)
            results.append([out, *grads(out, leaves, g)])
    assert backward_nodes[0].startswith("_EagerScan") and not backward_nodes[1].startswith("_EagerScan")
    counts = {str(k) for k in counter.get_flop_counts()["Global"]}
    assert {"mamba_ssm.scan_bwd", "causal_conv1d.conv_bwd"} <= counts  # the watched backward ran the ops
    for a, b in zip(*results):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    with torch.no_grad(), triton_on_cpu():
        with FlopCounterMode(display=False) as counter:
            bimamba_v2_inner_fn(*args)
    counts = {str(k): v for k, v in counter.get_flop_counts()["Global"].items()}
    assert counts["mamba_ssm.scan_fwd"] == 2 * scan_macs((2, batch, dim, seqlen), 8)
    assert counts["causal_conv1d.conv_fwd"] == 2 * conv_macs((batch, dim, seqlen), (2, dim, 4))


def test_dispatch_and_errors(monkeypatch):
    x = torch.randn(2, 4, 8)
    assert not triton_enabled(x, "selective_scan")  # CPU tensors take the reference
    with triton_on_cpu():
        assert triton_enabled(x, "selective_scan")
        # a dotted name is a module's whole name (causal_conv1d's kernels), not one under mamba_ssm.ops.triton
        assert triton_enabled(x, "causal_conv1d.partial_sums") and triton_enabled(x, "mamba_ssm.ops.triton.gated_proj")
        assert not triton_enabled(x, "causal_conv1d.no_such_kernels")
        monkeypatch.setenv(FORCE_REFERENCE_ENV, "1")
        assert not triton_enabled(x, "selective_scan")
    u, delta, A, B, C, D, z, bias = scan_inputs(2, 40, 23, 8, torch.float32)
    with triton_on_cpu(), pytest.raises(ValueError, match="D must be"):
        selective_scan_fn(u, delta, A, B, C, D[:3])


def test_reference_forced_follows_the_environment_as_it_changes(monkeypatch):
    """reference_forced reads os.environ's own store (a fast path): every way of setting or clearing the
    variable is seen at the next call, and a replaced os.environ falls back to the plain lookup."""
    from causal_conv1d.kernel_utils import reference_forced

    monkeypatch.delenv(FORCE_REFERENCE_ENV, raising=False)
    assert not reference_forced()
    for value, forced in (("1", True), ("0", False), ("", False), ("yes", True)):
        monkeypatch.setenv(FORCE_REFERENCE_ENV, value)
        assert reference_forced() is forced, value
    monkeypatch.delenv(FORCE_REFERENCE_ENV)
    assert not reference_forced()
    with mock.patch.dict(os.environ, {FORCE_REFERENCE_ENV: "1"}):
        assert reference_forced()
    assert not reference_forced()
    monkeypatch.setattr(os, "environ", {FORCE_REFERENCE_ENV: "1"})
    assert reference_forced()


def test_env_report_names_every_op():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-m", "dyvm.env"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("torch:", "triton:", "gpu:", "selective_scan_fn: PyTorch implementation (cpu tensors)",
                   "bimamba_v2_inner_fn", "rms_norm_fn", "causal_conv1d_fn", "DyVM gate head",
                   "MAMBA_TRITON_FAST_LAUNCH=", "MAMBA_FP32_LINEAR=",
                   "in_proj / out_proj / x_proj / predictors (and DyVM's gated x_proj + dt_proj at inference) in fp32: "
                   "F.linear (cpu tensors)"):
        assert needle in out.stdout, out.stdout


def test_custom_op_registration():
    """Schema, fake implementation (torch.compile), autograd registration: torch.library's own checks."""
    b, d, L, N = 2, 8, 5, 4
    args = [torch.randn(2, b, d, L), torch.randn(2, b, d, L), -torch.rand(2, d, N), torch.randn(2, b, 1, N, L),
            torch.randn(2, b, 1, N, L), torch.randn(2, d), torch.randn(b, d, L), torch.randn(2, d), torch.rand(b, 2)]
    args = [t.requires_grad_() for t in args]
    result = torch.library.opcheck(torch.ops.mamba_ssm.scan_fwd.default, (*args, True, 0.5, False, True))
    assert all(v == "SUCCESS" for v in result.values()), result
    conv_args = [torch.randn(b, d, L), torch.randn(2, d, 4), torch.randn(2, d)]
    conv_args = [t.requires_grad_() for t in conv_args] + [(torch.rand(b, L) > 0.3).float(), None]
    result = torch.library.opcheck(torch.ops.causal_conv1d.conv_fwd.default, (*conv_args, True, True))
    assert all(v == "SUCCESS" for v in result.values()), result


def test_kernel_files_are_leaves():
    """The kernel files (Triton and CPU) import only the standard library, torch, Triton and the shared kernel
    utilities (no op module, no interface), so the op layers sit on top of them without import cycles, as in
    upstream mamba. ops/triton/layernorm.py is the norm's API module (upstream's import path): it may load its
    two implementations, which are leaves themselves."""
    import ast
    import pathlib

    import causal_conv1d
    import mamba_ssm

    stdlib_and_deps = {"typing", "json", "os", "importlib", "contextlib", "functools", "inspect", "itertools",
                       "threading", "operator", "torch", "triton"}
    shared = {"causal_conv1d.kernel_utils", "causal_conv1d.triton_utils", "causal_conv1d.partial_sums",
              "causal_conv1d.launch_replay"}
    implementations = {"mamba_ssm.ops.triton.layernorm_kernel", "mamba_ssm.ops.cpu.layernorm"}
    conv_dir, ops_dir = pathlib.Path(causal_conv1d.__file__).parent, pathlib.Path(mamba_ssm.__file__).parent / "ops"
    files = [conv_dir / n for n in ("triton_causal_conv1d.py", "cpu_causal_conv1d.py", "kernel_utils.py",
                                    "triton_utils.py", "partial_sums.py", "launch_replay.py")]
    files += sorted((ops_dir / "triton").glob("*.py")) + sorted((ops_dir / "cpu").glob("*.py"))
    for path in files:
        allowed = shared | (implementations if path.name == "layernorm.py" and path.parent.name == "triton" else set())
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] in stdlib_and_deps or name in allowed, f"{path.name} imports {name}"
