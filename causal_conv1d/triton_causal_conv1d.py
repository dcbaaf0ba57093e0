"""Triton depthwise causal conv1d (+SiLU), forward and backward; one or two directions per launch.

Each program computes a (BLOCK_T, BLOCK_D) tile of the output from K shifted loads of the input (the
tiles overlap, so the re-reads come from cache). Strides are arguments: channels-first (b, d, L) inputs
and the channels-last views the Vim mixer passes both load coalesced (Triton specialises unit strides).

Two directions (the DyVM bidirectional layer): direction 1 is the causal conv of the time-reversed
sequence, written back in original time order, i.e. an anti-causal conv: no flipped copies. A token mask
m multiplies the input before the conv and the output after it. A (sample, direction) whose gate is
off (SKIP_OFF, inference only) is not computed.
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from causal_conv1d.tuning import apply_tuning_file


@triton.jit
def _conv_tap(x_base, m_base, offs_t, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, k,
              r: tl.constexpr, WIDTH: tl.constexpr, HAS_MASK: tl.constexpr):
    """The (BLOCK_T, BLOCK_D) input tile that tap k of direction r reads (masked tokens as 0), fp32.
    Direction 0 is causal (looks back), direction 1 anti-causal (looks ahead): nothing is flipped."""
    if r == 0:
        src = offs_t - (WIDTH - 1) + k
    else:
        src = offs_t + (WIDTH - 1) - k
    ok = (src >= 0) & (src < seqlen)
    xv = tl.load(x_base + src[:, None] * sx_t + offs_d[None, :] * sx_d, mask=ok[:, None] & mask_d[None, :],
                 other=0.0).to(tl.float32)
    if HAS_MASK:
        xv *= tl.load(m_base + src * sm_t, mask=ok, other=0.0).to(tl.float32)[:, None]
    return xv


@triton.jit
def _conv_pre(x_base, w_base, bias_base, m_base, offs_t, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t,
              r: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr):
    """Pre-activation (BLOCK_T, BLOCK_D) tile of direction r at times offs_t, fp32."""
    acc = tl.zeros((offs_t.shape[0], offs_d.shape[0]), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_base + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        xv = _conv_tap(x_base, m_base, offs_t, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, k, r, WIDTH, HAS_MASK)
        w = tl.load(w_base + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
        acc += xv * w[None, :]
    return acc


@triton.jit
def _conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, gate_ptr, out_ptr,
    dim, seqlen,
    sx_b, sx_d, sx_t, sm_b, sm_t, sg_b, sg_r, so_r, so_b, so_d, so_t,
    N_DIRS: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    SILU: tl.constexpr, SKIP_OFF: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < seqlen
    mask_d = offs_d < dim
    x_base = x_ptr + pid_b * sx_b
    m_base = m_ptr + pid_b * sm_b
    for r in tl.static_range(N_DIRS):
        run = True
        if SKIP_OFF:
            run = tl.load(gate_ptr + pid_b * sg_b + r * sg_r) != 0
        if run:
            acc = _conv_pre(x_base, w_ptr + r * dim * WIDTH, bias_ptr + r * dim, m_base, offs_t, offs_d, mask_d,
                            seqlen, sx_d, sx_t, sm_t, r, WIDTH, HAS_BIAS, HAS_MASK)
            if SILU:
                acc = acc * tl.sigmoid(acc)
            if HAS_MASK:
                acc *= tl.load(m_base + offs_t * sm_t, mask=mask_t, other=0.0).to(tl.float32)[:, None]
            o_ptrs = out_ptr + r * so_r + pid_b * so_b + offs_t[:, None] * so_t + offs_d[None, :] * so_d
            tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


@triton.jit
def _conv_bwd_pre_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, dout_ptr, dpre_ptr, dw_ptr, dbias_ptr,
    dim, seqlen, n_tblocks,
    sx_b, sx_d, sx_t, sm_b, sm_t, sdo_r, sdo_b, sdo_d, sdo_t,
    N_DIRS: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    SILU: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dpre = d out / d pre-activation, (R, b, L, d) fp32; per-program partial dw (R, b, nT, d, K), dbias."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_t = tl.program_id(1)
    batch = tl.num_programs(0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < seqlen
    mask_d = offs_d < dim
    mask_td = mask_t[:, None] & mask_d[None, :]
    x_base = x_ptr + pid_b * sx_b
    m_base = m_ptr + pid_b * sm_b
    for r in tl.static_range(N_DIRS):
        dout = tl.load(dout_ptr + r * sdo_r + pid_b * sdo_b + offs_t[:, None] * sdo_t + offs_d[None, :] * sdo_d,
                       mask=mask_td, other=0.0).to(tl.float32)
        if HAS_MASK:
            dout *= tl.load(m_base + offs_t * sm_t, mask=mask_t, other=0.0).to(tl.float32)[:, None]
        if SILU:
            pre = _conv_pre(x_base, w_ptr + r * dim * WIDTH, bias_ptr + r * dim, m_base, offs_t, offs_d, mask_d,
                            seqlen, sx_d, sx_t, sm_t, r, WIDTH, HAS_BIAS, HAS_MASK)
            sig = tl.sigmoid(pre)
            dout = dout * sig * (1.0 + pre * (1.0 - sig))
        row = (r * batch + pid_b) * seqlen + offs_t
        tl.store(dpre_ptr + row[:, None] * dim + offs_d[None, :], dout, mask=mask_td)
        part = ((r * batch + pid_b) * n_tblocks + pid_t) * dim + offs_d
        if HAS_BIAS:
            tl.store(dbias_ptr + part, tl.sum(dout, axis=0), mask=mask_d)
        for k in tl.static_range(WIDTH):
            xv = _conv_tap(x_base, m_base, offs_t, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, k, r, WIDTH, HAS_MASK)
            tl.store(dw_ptr + part * WIDTH + k, tl.sum(dout * xv, axis=0), mask=mask_d)


@triton.jit
def _conv_bwd_dx_kernel(
    dpre_ptr, w_ptr, m_ptr, dx_ptr,
    dim, seqlen,
    sm_b, sm_t, sdx_b, sdx_d, sdx_t,
    N_DIRS: tl.constexpr, WIDTH: tl.constexpr, HAS_MASK: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[s] = m[s] * sum_r sum_k w[r, k] * dpre[r, t_k(s)], t_k the outputs that read s."""
    pid_b = tl.program_id(0).to(tl.int64)
    batch = tl.num_programs(0)
    offs_t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_t = offs_t < seqlen
    mask_d = offs_d < dim
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for r in tl.static_range(N_DIRS):
        for k in tl.static_range(WIDTH):
            if r == 0:
                dst = offs_t + (WIDTH - 1) - k
            else:
                dst = offs_t - (WIDTH - 1) + k
            ok = (dst >= 0) & (dst < seqlen)
            row = (r * batch + pid_b) * seqlen + dst
            dp = tl.load(dpre_ptr + row[:, None] * dim + offs_d[None, :], mask=ok[:, None] & mask_d[None, :],
                         other=0.0)
            w = tl.load(w_ptr + r * dim * WIDTH + offs_d * WIDTH + k, mask=mask_d, other=0.0).to(tl.float32)
            acc += dp * w[None, :]
    if HAS_MASK:
        acc *= tl.load(m_ptr + pid_b * sm_b + offs_t * sm_t, mask=mask_t, other=0.0).to(tl.float32)[:, None]
    tl.store(dx_ptr + pid_b * sdx_b + offs_t[:, None] * sdx_t + offs_d[None, :] * sdx_d,
             acc.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])


# Tile (time x channels) and warps per program, per input layout: "cf" time-contiguous (b, d, L),
# "cl" channel-contiguous (the Vim mixer's). Chosen by benchmarks/kernels.py --sweep on an H200.
# MAMBA_TRITON_TUNING=file.json (benchmarks/kernels.py --sweep --save-tuning) overrides them ("conv" entry).
CONV_TUNING = {"cf": {"block_t": 256, "block_d": 16, "num_warps": 4},
               "cl": {"block_t": 16, "block_d": 128, "num_warps": 4}}


apply_tuning_file("conv", CONV_TUNING)


def _tiles(x: Tensor, block_t: Optional[int] = None, block_d: Optional[int] = None,
           num_warps: Optional[int] = None):
    _, dim, seqlen = x.shape
    tuning = CONV_TUNING["cf" if x.stride(-1) == 1 else "cl"]
    block_d = min(block_d or tuning["block_d"], triton.next_power_of_2(dim))
    block_t = min(block_t or tuning["block_t"], triton.next_power_of_2(seqlen))
    return block_t, block_d, num_warps or tuning["num_warps"]


def _strides(t: Optional[Tensor], n: int):
    return [t.stride(i) for i in range(t.dim())] if t is not None else [0] * n


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], silu: bool,
                 out: Tensor, gate: Optional[Tensor] = None, block_t: Optional[int] = None,
                 block_d: Optional[int] = None, num_warps: Optional[int] = None) -> Tensor:
    """x: (b, d, L) view; weight: (R, d, K) contiguous; bias: (R, d) or None; mask: (b, L) or None;
    out: (R, b, d, L) view, written. gate (b, R): skip the (sample, direction) pairs whose gate is 0.
    block_t, block_d, num_warps override CONV_TUNING (the benchmark's sweep)."""
    batch, dim, seqlen = x.shape
    R, _, width = weight.shape
    block_t, block_d, num_warps = _tiles(x, block_t, block_d, num_warps)
    grid = (batch, triton.cdiv(seqlen, block_t), triton.cdiv(dim, block_d))
    _conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else weight, mask if mask is not None else x,
        gate if gate is not None else x, out, dim, seqlen,
        *_strides(x, 3), *_strides(mask, 2), *_strides(gate, 2), *_strides(out, 4),
        N_DIRS=R, WIDTH=width, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu,
        SKIP_OFF=gate is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    return out


def conv_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], silu: bool,
                  dout: Tensor):
    """Gradients of conv_forward (without gates): dx like x's dtype (b, d, L); dweight (R, d, K) fp32;
    dbias (R, d) fp32 or None. dout: (R, b, d, L) view."""
    batch, dim, seqlen = x.shape
    R, _, width = weight.shape
    block_t, block_d, num_warps = _tiles(x)
    n_t = triton.cdiv(seqlen, block_t)
    grid = (batch, n_t, triton.cdiv(dim, block_d))
    dev, f32 = x.device, torch.float32
    dpre = torch.empty((R, batch, seqlen, dim), device=dev, dtype=f32)
    dw_part = torch.empty((R, batch, n_t, dim, width), device=dev, dtype=f32)
    dbias_part = torch.empty((R, batch, n_t, dim), device=dev, dtype=f32) if bias is not None else None
    _conv_bwd_pre_kernel[grid](
        x, weight, bias if bias is not None else weight, mask if mask is not None else x, dout, dpre, dw_part,
        dbias_part if dbias_part is not None else dpre, dim, seqlen, n_t,
        *_strides(x, 3), *_strides(mask, 2), *_strides(dout, 4),
        N_DIRS=R, WIDTH=width, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    dx = torch.empty((batch, seqlen, dim), device=dev, dtype=x.dtype).transpose(1, 2) if x.stride(1) == 1 \
        else torch.empty((batch, dim, seqlen), device=dev, dtype=x.dtype)
    _conv_bwd_dx_kernel[grid](
        dpre, weight, mask if mask is not None else x, dx, dim, seqlen,
        *_strides(mask, 2), *_strides(dx, 3),
        N_DIRS=R, WIDTH=width, HAS_MASK=mask is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps,
    )
    return dx, dw_part.sum((1, 2)), dbias_part.sum((1, 2)) if dbias_part is not None else None


def causal_conv1d_triton(x, weight, bias=None, activation=None):
    """causal_conv1d_fn on the Triton kernels, through the custom op causal_conv1d::conv_fwd (arguments
    checked by the caller)."""
    from causal_conv1d.conv_op import conv_fwd

    return conv_fwd(x, weight.contiguous()[None], None if bias is None else bias[None], None, None,
                    activation is not None, False)[0]
