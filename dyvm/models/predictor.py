"""The token-score predictor (docs/reference.md section 2; the authors call it PredictorLG).

Module names (in_conv.0/1, out_conv.0/2/4) follow the authors' state-dict layout so their files load.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor

from dyvm.pruning import ClsPositions, single_static_position, split_cls, stage_kernels_apply

from mamba_ssm.modules.mamba_simple import cached_for_inference, inference_cache_usable
from mamba_ssm.ops import linear_fp32


class TokenScorePredictor(nn.Module):
    """Patch features (B, N, C) and policy (B, N, 1) -> log-probabilities (B, N, 2) of [keep, drop].

    Each token sees its own first half of channels and a policy-weighted mean of the second half over the
    kept tokens; the mean divides by (number kept + 1), as the authors' code does.
    """

    def __init__(self, dim: int):
        super().__init__()
        if dim % 4:
            raise ValueError(f"predictor width {dim} must be a multiple of 4")
        self.in_conv = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU())
        self.out_conv = nn.Sequential(nn.Linear(dim, dim // 2), nn.GELU(), nn.Linear(dim // 2, dim // 4), nn.GELU(),
                                      nn.Linear(dim // 4, 2), nn.LogSoftmax(dim=-1))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor, policy: Tensor) -> Tensor:
        linears = self._linears(x)
        x = self.in_conv(x) if linears is None else F.gelu(linear_fp32.linear(self.in_conv[0](x), *linears[0]))
        return self._scores(x, policy, linears)

    def score_stream(self, hidden: Tensor, residual: Tensor, cls_positions: ClsPositions, policy: Tensor) -> Tensor:
        """The scores of a pruning stage's patch tokens from the residual stream: this predictor applied to
        split_cls(hidden + residual)'s patch tokens, policy (B, N). At inference on the GPU (where
        dyvm.pruning.stage_kernels_apply, and no hooks would miss their calls) the add, the class token's removal
        and the LayerNorm are one kernel (mamba_ssm.ops.triton.pruning_stage.patch_layer_norm), which writes the
        normalised tokens in the dtype the first Linear reads."""
        x_dtype = torch.promote_types(hidden.dtype, residual.dtype)  # hidden + residual's
        policy = policy if policy.dtype == x_dtype else policy.to(x_dtype)  # (the features' dtype, in both paths)
        if not self._fused_norm_applies(hidden, residual, cls_positions):
            return self(split_cls(hidden + residual, cls_positions)[1], policy.unsqueeze(-1))
        from mamba_ssm.ops.triton.pruning_stage import patch_layer_norm

        norm, device = self.in_conv[0], hidden.device.type
        out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_dtype
        normed = patch_layer_norm(hidden, residual, single_static_position(cls_positions), norm.weight, norm.bias,
                                  norm.eps, out_dtype)
        linears = self._linears(normed)
        pre = self.in_conv[1](normed) if linears is None else linear_fp32.linear(normed, *linears[0])
        # the GELU and the pooled half in one kernel where its input is what the next Linear computes in (fp32
        # tokens and policy, or autocast's dtype)
        if policy.dtype == torch.float32 and pre.dtype == out_dtype:
            from mamba_ssm.ops.triton.pruning_stage import pool_concat

            return self._head(pool_concat(pre, policy), linears)
        return self._scores(self.in_conv[2](pre), policy.unsqueeze(-1), linears)

    def _fused_norm_applies(self, hidden: Tensor, residual: Tensor, cls_positions: ClsPositions) -> bool:
        """No hooks that the plain calls would run (on this predictor, in_conv, its LayerNorm or GELU), a LayerNorm
        with weight and bias over the last axis, and dyvm.pruning.stage_kernels_apply."""
        norm = self.in_conv[0]
        return (not any(m._forward_hooks or m._forward_pre_hooks for m in (self, self.in_conv, norm, self.in_conv[2]))
                and norm.weight is not None and norm.bias is not None
                and tuple(norm.normalized_shape) == hidden.shape[-1:]
                and stage_kernels_apply(hidden, residual, cls_positions))

    def _scores(self, x: Tensor, policy: Tensor, linears) -> Tensor:
        """in_conv's output (B, N, C) -> log-probabilities."""
        return self._head(self._pool(x, policy), linears)

    @staticmethod
    def _pool(x: Tensor, policy: Tensor) -> Tensor:
        """in_conv's output (B, N, C) -> out_conv's input: the local half with the policy-weighted mean of the
        other half over the kept tokens (mamba_ssm.ops.triton.pruning_stage.pool_concat at inference)."""
        half = x.shape[-1] // 2
        local, pooled = x[..., :half], x[..., half:]
        pooled = (pooled * policy).sum(1, keepdim=True) / (policy.sum(1, keepdim=True) + 1)
        return torch.cat([local, pooled.expand_as(local)], dim=-1)

    def _head(self, x: Tensor, linears) -> Tensor:
        """out_conv: the three Linears with their GELUs, then log-softmax."""
        if linears is None:
            return self.out_conv(x)
        for weight_bias_memo in linears[1:3]:
            x = F.gelu(linear_fp32.linear(x, *weight_bias_memo))
        return F.log_softmax(F.linear(x, *linears[3][:2]), dim=-1)  # (2 columns: no use for the kernel's tiles)

    def _linears(self, x: Tensor):
        """The four Linears' (weight, bias, memo) for the functional path (linear_fp32.linear: fp32 on the tf32x3
        kernel where it applies, training and inference alike, as the mixers' Linears), or None where the modules
        run: hooks that must see their calls, or autocast with no cache (autocast casts the modules' weights itself).
        Eager inference keeps them while the parameters are unchanged, cast to the autocast dtype (as the Mamba
        mixers keep theirs: autocast would cast each weight and bias on every call, 8 small ops per stage), with the
        memo where the fp32 kernel keeps the weights' split; elsewhere (training, CUDA graph captures of weights not
        declared constant) they are the parameters themselves."""
        modules = [self.in_conv[1], self.out_conv[0], self.out_conv[2], self.out_conv[4]]
        if ({type(m) for m in modules} != {nn.Linear}
                or linear_fp32.module_hooked(self.in_conv, self.out_conv, *self.in_conv, *self.out_conv)):
            return None
        if inference_cache_usable(x, self):
            params = [p for m in modules for p in (m.weight, m.bias)]
            cached = cached_for_inference(
                self, params, x, lambda dtype: [(m.weight if dtype is None else m.weight.to(dtype),
                                                 m.bias if dtype is None else m.bias.to(dtype), {}) for m in modules])
            if cached is not None:
                return cached
        return None if torch.is_autocast_enabled(x.device.type) else [(m.weight, m.bias, None) for m in modules]
