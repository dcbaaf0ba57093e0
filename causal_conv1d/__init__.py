"""causal_conv1d: upstream-compatible depthwise causal conv1d (Triton on GPU, PyTorch reference on CPU)."""
from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn, causal_conv1d_ref

__version__ = "1.4.0+dyvm"
__all__ = ["causal_conv1d_fn", "causal_conv1d_ref"]
