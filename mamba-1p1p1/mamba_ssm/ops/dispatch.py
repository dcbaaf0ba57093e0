"""Which implementation an op takes: Triton kernels for CUDA tensors, the PyTorch implementations otherwise.

mamba_ssm's names over causal_conv1d.kernel_utils, which holds the checks both packages share:
MAMBA_FORCE_REFERENCE=1 forces the plain references (e.g. to rule a kernel out when debugging); tests run
the kernels on CPU tensors through the Triton interpreter inside `triton_on_cpu()`.
"""
from causal_conv1d.kernel_utils import (FORCE_REFERENCE_ENV, graph_capturing, module_importable,  # noqa: F401
                                        needs_grad, ops_watched, reference_forced, triton_on_cpu)
from causal_conv1d.kernel_utils import triton_enabled as _triton_enabled

# The kernel module an op runs on, by the name callers use (the DyVM bidirectional op composes the scan
# and conv kernels: see bimamba_stacked.py).
_KERNEL_MODULES = {"bimamba": "selective_scan"}


def kernel_importable(module: str) -> bool:
    """True when the Triton kernel module mamba_ssm.ops.triton.<module> imports (Triton installed)."""
    return module_importable(f"mamba_ssm.ops.triton.{_KERNEL_MODULES.get(module, module)}")


def triton_enabled(x, module: str) -> bool:
    """True when tensor `x` should take the kernels of mamba_ssm.ops.triton.<module>."""
    return _triton_enabled(x, f"mamba_ssm.ops.triton.{_KERNEL_MODULES.get(module, module)}")
