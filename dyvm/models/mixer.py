"""DynamicMamba: the Vim bidirectional mixer plus DyVM's per-image direction gate head.

The gate head `block_head` Linear(2*d_inner, 2) reads the in_proj output xz (x and z) at the class token's
position (MambaReg: the mean over its registers' positions); column 0 gates the forward scan, column 1 the
backward scan. The gated scan itself lives in mamba_ssm (bimamba_v2_inner_fn): at inference a direction whose
gate is 0 for a sample is not computed.
"""
from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from causal_conv1d import causal_conv1d_fn
from causal_conv1d.kernel_utils import ops_watched, triton_enabled
from dyvm.pruning import ClsPositions, is_static, tap_cls_columns
from mamba_ssm.modules.mamba_simple import InferenceWeights, Mamba

GATE_INIT_BIAS = 5.0  # sigmoid(5) = 0.993: every direction starts on when a DyVM is made from a dense Vim
SSM_FEATURES = ("ssm_B", "ssm_delta")
GATE_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class DynamicMamba(Mamba):
    def __init__(self, d_model: int, *, block_selection: bool = True, **mamba_kwargs):
        super().__init__(d_model, **mamba_kwargs)
        if self.bimamba_type != "v2":
            raise ValueError("DynamicMamba needs the bidirectional bimamba_type='v2'")
        self.block_head = nn.Linear(2 * self.d_inner, 2) if block_selection else None
        if self.block_head is not None:
            reset_gate_head(self.block_head)

    def _cached_linears(self) -> dict:
        linears = super()._cached_linears()
        if self.block_head is not None:
            linears["block_head"] = self.block_head
        return linears

    def gate_logits(self, xz: Tensor, cls_positions: ClsPositions,
                    weights: Optional[InferenceWeights] = None) -> Tuple[Tensor, Tensor]:
        """xz (B, 2*d_inner, L) -> (gate logits (B, 2) [forward, backward] from the class token's column (the
        mean of the register columns for MambaReg's several class tokens), xz to mix from here on). With
        autograd the column read and the rest share one node (dyvm.pruning.tap_cls_columns): no full-size
        gradient for one column."""
        xz, columns = tap_cls_columns(xz, cls_positions)
        return self.linear("block_head", columns, weights), xz

    def gate_head_for(self, xz: Tensor, cls_positions: ClsPositions,
                      weights: Optional[InferenceWeights]) -> Optional[tuple]:
        """Inference without autograd on the GPU: (column, weight, bias) of this layer's gate head for the kernels
        (mamba_ssm.ops.triton.gated_proj: the column read, the head and the comparison in one kernel, or inside the
        projections kernel, which then needs no launch of its own: bimamba_stacked), or None where that path does
        not apply (then gate_logits and a comparison): other devices, torch.compile or a dispatch mode watching,
        several class tokens, per-sample positions, hooks on the head, dtypes the kernel does not take."""
        head = self.block_head
        if (ops_watched() or not triton_enabled(xz, "mamba_ssm.ops.triton.gated_proj") or head._forward_hooks
                or head._forward_pre_hooks or not is_static(cls_positions) or xz.dtype not in GATE_KERNEL_DTYPES):
            return None
        positions = (cls_positions,) if isinstance(cls_positions, int) else tuple(cls_positions)
        if len(positions) != 1:
            return None
        weight, bias = weights.linears["block_head"][:2] if weights is not None else (head.weight, head.bias)
        return positions[0], weight, bias

    def ssm_feature(self, xz: Tensor, kind: str, mask: Optional[Tensor] = None) -> Tensor:
        """The predictor-input ablation: direction-averaged SSM B (B, L, d_state) or raw delta (B, L, d_inner).

        delta is the dt projection before its bias and softplus; both are computed the way the scan sees them
        (masked x -> causal conv + SiLU -> masked -> x_proj), each direction on its own flipped sequence.
        """
        if kind not in SSM_FEATURES:
            raise ValueError(f"kind must be one of {SSM_FEATURES}, got {kind!r}")
        x = xz[:, :self.d_inner]
        feats = []
        for backward in (False, True):
            w = self.scan_weights(backward)
            xs, m = (x.flip(-1), None if mask is None else mask.flip(-1)) if backward else (x, mask)
            if m is not None:
                xs = xs * m.unsqueeze(1).to(xs.dtype)
            xs = causal_conv1d_fn(xs, w.conv_weight.reshape(self.d_inner, -1), w.conv_bias, activation="silu")
            if m is not None:
                xs = xs * m.unsqueeze(1).to(xs.dtype)
            x_dbl = F.linear(xs.transpose(1, 2), w.x_proj_weight)  # (B, L, dt_rank + 2*d_state)
            if kind == "ssm_B":
                f = x_dbl[..., self.dt_rank:self.dt_rank + self.d_state]
            else:
                f = x_dbl[..., :self.dt_rank] @ w.dt_proj_weight.t()
            feats.append(f.flip(1) if backward else f)
        return (feats[0] + feats[1]) / 2


def reset_gate_head(head: nn.Linear) -> None:
    """Weight 0, bias 5: the gate starts open for every image (used only for a DyVM fresh from a dense Vim)."""
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(GATE_INIT_BIAS)
