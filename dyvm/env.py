"""Environment report for bug reports: `python -m dyvm.env`.

Prints the versions of Python, torch, CUDA, Triton and timm, the GPU, and which implementation each op
takes (Triton kernel, PyTorch implementation, or the plain PyTorch reference when forced) for a tensor on
the default device. One line per item.
"""
import os
import platform
import sys

import torch


def _version(module_name: str) -> str:
    try:
        module = __import__(module_name)
    except ImportError:
        return "not installed"
    return getattr(module, "__version__", "installed")


def _fallback(device: torch.device, kernel_found: bool, has_implementation: bool = True) -> str:
    """What runs instead of a Triton kernel: the PyTorch implementation, or the plain reference when forced
    (or when the op has no separate implementation)."""
    from mamba_ssm.ops.dispatch import FORCE_REFERENCE_ENV, reference_forced

    kind = "PyTorch implementation" if has_implementation else "PyTorch reference"
    if reference_forced():
        return f"PyTorch reference ({FORCE_REFERENCE_ENV} is set)"
    if device.type == "cuda" and not kernel_found:
        return f"{kind} (Triton kernel not importable)"
    return f"{kind} ({device.type} tensors)"


def _implementation(kernel_module: str, device: torch.device, has_implementation: bool = True) -> str:
    from mamba_ssm.ops.dispatch import kernel_importable, triton_enabled

    if triton_enabled(torch.empty(0, device=device), kernel_module):
        return f"Triton kernel (mamba_ssm.ops.triton.{kernel_module})"
    return _fallback(device, kernel_importable(kernel_module), has_implementation)


def _conv_implementation(device: torch.device) -> str:
    from causal_conv1d.causal_conv1d_interface import use_triton
    from causal_conv1d.kernel_utils import module_importable

    if use_triton(torch.empty(0, device=device)):
        return "Triton kernel (causal_conv1d.triton_causal_conv1d)"
    return _fallback(device, module_importable("causal_conv1d.triton_causal_conv1d"))


def _fp32_linear(device: torch.device) -> str:
    """What the mixers' in_proj, out_proj and x_proj's forward and DyVM's score predictors run in fp32 (no autocast)
    at training sizes (mamba_ssm.ops.linear_fp32)."""
    from mamba_ssm.ops import linear_fp32

    x = torch.empty(1, linear_fp32.MIN_ROWS, 8, device=device)
    if linear_fp32.tf32x3_applies(x, torch.empty(8, 8, device=device)):
        return "three TF32 tensor-core products (mamba_ssm.ops.triton.linear_tf32x3)"
    if not linear_fp32.ENABLED:
        why = "MAMBA_FP32_LINEAR=cublas"
    elif device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        why = "TF32 matmuls allowed: cuBLAS's TF32"
    elif device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 0):
        why = "no TF32 tensor cores"
    else:
        why = f"{device.type} tensors"
    return f"F.linear ({why})"


def report() -> str:
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    lines = [
        f"python: {platform.python_version()} ({sys.platform})",
        f"torch: {torch.__version__} (CUDA build {torch.version.cuda or 'none'})",
        f"triton: {_version('triton')}",
        f"timm: {_version('timm')}",
        f"mamba_ssm: {_version('mamba_ssm')}, causal_conv1d: {_version('causal_conv1d')}",
        f"gpu: {torch.cuda.get_device_name() + ' (capability %d.%d)' % torch.cuda.get_device_capability() if cuda else 'none'}",
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r} "
        f"MAMBA_FORCE_REFERENCE={os.environ.get('MAMBA_FORCE_REFERENCE', '')!r} "
        f"MAMBA_TRITON_FAST_LAUNCH={os.environ.get('MAMBA_TRITON_FAST_LAUNCH', '')!r} "
        "(0: Triton's own launch path instead of direct launches) "
        f"MAMBA_FP32_LINEAR={os.environ.get('MAMBA_FP32_LINEAR', '')!r} "
        "(cublas: fp32 in_proj / out_proj / x_proj / dt_proj / predictors on cuBLAS) "
        f"MAMBA_SCAN_CKPT_CHUNK={os.environ.get('MAMBA_SCAN_CKPT_CHUNK', '')!r} "
        "(steps between the training scan's stored states: 8 faster, 32 less memory, 16 when unset) "
        f"MAMBA_REBUILD_SCAN_INPUTS={os.environ.get('MAMBA_REBUILD_SCAN_INPUTS', '')!r} "
        "(1: training recomputes the scan's inputs in the backward, for 27% less memory; 0 or unset: keeps them)",
        f"ops on {device.type} tensors:",
        f"  selective_scan_fn: {_implementation('selective_scan', device)}",
        f"  bimamba_v2_inner_fn (DyVM scan): {_implementation('bimamba', device)}",
        f"  rms_norm_fn / layer_norm_fn: {_implementation('layernorm_kernel', device)}",
        f"  causal_conv1d_fn: {_conv_implementation(device)}",
        f"  DyVM gate head at inference: {_implementation('gate_head', device, has_implementation=False)}",
        f"  in_proj / out_proj / x_proj / predictors (and DyVM's gated x_proj + dt_proj at inference) in fp32: "
        f"{_fp32_linear(device)}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
