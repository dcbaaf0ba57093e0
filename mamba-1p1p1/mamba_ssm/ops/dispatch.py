"""Which implementation an op takes: Triton kernels for CUDA tensors, the PyTorch implementations otherwise.

mamba_ssm's names over causal_conv1d.kernel_utils, which holds the checks both packages share:
MAMBA_FORCE_REFERENCE=1 forces the plain references (e.g. to rule a kernel out when debugging); tests run
the kernels on CPU tensors through the Triton interpreter inside `triton_on_cpu()`.
"""
from causal_conv1d.kernel_utils import (FORCE_REFERENCE_ENV, graph_capturing, kept_in,  # noqa: F401
                                        module_importable, needs_grad, ops_watched, reference_forced, triton_on_cpu)
from causal_conv1d.kernel_utils import triton_enabled as _triton_enabled

# The kernel module an op runs on, by the name callers use (the DyVM bidirectional op composes the scan
# and conv kernels: see bimamba_stacked.py).
_KERNEL_MODULES = {"bimamba": "selective_scan"}


def _kernel_module(module: str) -> str:
    """mamba_ssm.ops.triton.<module> for a short name (or the op's, _KERNEL_MODULES); a dotted name as it is (a
    module of causal_conv1d's, say)."""
    return module if "." in module else f"mamba_ssm.ops.triton.{_KERNEL_MODULES.get(module, module)}"


def kernel_importable(module: str) -> bool:
    """True when the Triton kernel module (see _kernel_module) imports (Triton installed)."""
    return module_importable(_kernel_module(module))


def triton_enabled(x, module: str) -> bool:
    """True when tensor `x` should take the kernels of the module (see _kernel_module)."""
    return _triton_enabled(x, _kernel_module(module))
