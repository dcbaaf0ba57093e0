"""mamba_ssm: the mamba-ssm 1.1.1 API with Vim's bidirectional Mamba and the DyVM gated scan.

No compiled extension: Triton kernels on CUDA tensors (compiled at first use), PyTorch references
elsewhere. `python -m dyvm.env` reports which implementation each op uses.
"""
__version__ = "1.1.1+dyvm"

from mamba_ssm.modules.mamba_simple import Mamba  # noqa: E402
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, selective_scan_fn  # noqa: E402

__all__ = ["Mamba", "mamba_inner_fn", "selective_scan_fn"]
