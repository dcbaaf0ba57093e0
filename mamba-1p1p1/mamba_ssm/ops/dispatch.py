"""Which implementation an op takes: Triton kernels for CUDA tensors, the PyTorch references otherwise.

MAMBA_FORCE_REFERENCE=1 forces the references on a GPU too (e.g. to rule a kernel out when debugging).
Tests run the kernels on CPU tensors through the Triton interpreter inside `triton_on_cpu()`.
"""
import importlib
import os
from contextlib import contextmanager
from functools import lru_cache

# Shared with the causal_conv1d package (which cannot import this one): whether autograd needs a call's
# tensors, and whether torch.compile or a dispatch mode watches ops (then calls go through the custom ops).
from causal_conv1d.causal_conv1d_interface import needs_grad, ops_watched  # noqa: F401

FORCE_REFERENCE_ENV = "MAMBA_FORCE_REFERENCE"
_triton_on_cpu = False


def reference_forced() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0")


@lru_cache(maxsize=None)
def kernel_importable(module: str) -> bool:
    """True when the Triton kernel module mamba_ssm.ops.triton.<module> imports (Triton installed)."""
    try:
        importlib.import_module(f"mamba_ssm.ops.triton.{module}")
    except ImportError:
        return False
    return True


def triton_enabled(x, module: str) -> bool:
    """True when tensor `x` should take the kernels of mamba_ssm.ops.triton.<module>."""
    if reference_forced() or not (x.is_cuda or _triton_on_cpu):
        return False
    return kernel_importable(module)


@contextmanager
def triton_on_cpu():
    """Send CPU tensors to the Triton kernels (only meaningful with TRITON_INTERPRET=1; for tests)."""
    from causal_conv1d.causal_conv1d_interface import triton_on_cpu as conv_triton_on_cpu

    global _triton_on_cpu
    previous, _triton_on_cpu = _triton_on_cpu, True
    try:
        with conv_triton_on_cpu():
            yield
    finally:
        _triton_on_cpu = previous
