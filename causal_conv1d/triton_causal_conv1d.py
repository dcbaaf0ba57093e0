"""Triton depthwise causal conv1d (+SiLU), forward and backward; one or two directions per launch.

Each program computes a (BLOCK_T, BLOCK_D) tile of the output from K shifted loads of the input (the
tiles overlap, so the re-reads come from cache). Strides are arguments: channels-first (b, d, L) inputs
and the channels-last views the Vim mixer passes both load coalesced (Triton specialises unit strides).

Two directions (the DyVM bidirectional layer): direction 1 is the causal conv of the time-reversed
sequence, written back in original time order, i.e. an anti-causal conv: no flipped copies. A token mask
m multiplies the input before the conv and the output after it. A (sample, direction) whose gate is
off (SKIP_OFF, inference only) is not computed. The backward is one kernel that recomputes the
pre-activations it needs from shifted input tiles instead of storing their gradient (see _conv_bwd_kernel).

The mask's gradient (MASK_GRAD; in DyVM training the mask carries the straight-through keep decisions):
out_r = m * act_r(conv_r(x * m)), so

    dmask[b, t] = sum_d x[b, d, t] * dxm[b, d, t] + sum_{r, d} dout_r[b, d, t] * act_r[b, d, t]

with dxm the gradient of the masked input (the backward's dx before its multiplication by m) and x, dout
as given (unmasked). Each program sums its block of channels and writes one row of a (b, n_blocks, L)
buffer, which conv_backward adds up (deterministic, no atomics).
"""
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from causal_conv1d.kernel_utils import apply_tuning_file
from causal_conv1d.partial_sums import sum_middle
from causal_conv1d.triton_utils import cdiv, launch, next_pow2, pick4, remember


@triton.jit
def _load_shifted(x_base, m_base, src, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK: tl.constexpr):
    """Input tile at times src (masked tokens and times outside the sequence as 0), fp32."""
    ok = (src >= 0) & (src < seqlen)
    xv = tl.load(x_base + src[:, None] * sx_t + offs_d[None, :] * sx_d, mask=ok[:, None] & mask_d[None, :],
                 other=0.0).to(tl.float32)
    if HAS_MASK:
        xv *= tl.load(m_base + src * sm_t, mask=ok, other=0.0).to(tl.float32)[:, None]
    return xv


@triton.jit
def _conv_tap(x_base, m_base, offs_t, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, k,
              r: tl.constexpr, WIDTH: tl.constexpr, HAS_MASK: tl.constexpr):
    """The (BLOCK_T, BLOCK_D) input tile that tap k of direction r reads (masked tokens as 0), fp32.
    Direction 0 is causal (looks back), direction 1 anti-causal (looks ahead): nothing is flipped."""
    if r == 0:
        src = offs_t - (WIDTH - 1) + k
    else:
        src = offs_t + (WIDTH - 1) - k
    return _load_shifted(x_base, m_base, src, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)


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
def _pick(xm3, xm2, xm1, x0, xp1, xp2, xp3, e: tl.constexpr):
    """The one of the seven input tiles that sits at time shift e (-3..3) from the output tile."""
    if e < 0:
        v = pick4(x0, xm1, xm2, xm3, -e)
    else:
        v = pick4(x0, xp1, xp2, xp3, e)
    return v


@triton.jit
def _pre_at_shift(xm3, xm2, xm1, x0, xp1, xp2, xp3, w_base, bias_base, offs_d, mask_d, r: tl.constexpr,
                  j: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Pre-activation of direction r at output times s + j (direction 0) or s - j (direction 1), s the tile's
    times, from the seven shifted input tiles of _conv_bwd_kernel."""
    pre = tl.zeros(x0.shape, dtype=tl.float32)
    if HAS_BIAS:
        pre += tl.load(bias_base + offs_d, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    for k in tl.static_range(WIDTH):
        wk = tl.load(w_base + k, mask=mask_d, other=0.0).to(tl.float32)
        if r == 0:
            pre += wk[None, :] * _pick(xm3, xm2, xm1, x0, xp1, xp2, xp3, j + k - (WIDTH - 1))
        else:
            pre += wk[None, :] * _pick(xm3, xm2, xm1, x0, xp1, xp2, xp3, (WIDTH - 1) - j - k)
    return pre


@triton.jit
def _act(pre, SILU: tl.constexpr):
    if SILU:
        pre = pre * tl.sigmoid(pre)
    return pre


@triton.jit
def _silu_grad(pre, g, SILU: tl.constexpr):
    if SILU:
        sig = tl.sigmoid(pre)
        g = g * sig * (1.0 + pre * (1.0 - sig))
    return g


@triton.jit
def _conv_bwd_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, dm_ptr,
    dim, seqlen,
    sx_b, sx_d, sx_t, sm_b, sm_t, sdo_r, sdo_b, sdo_d, sdo_t, sdx_b, sdx_d, sdx_t,
    N_DIRS: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    SILU: tl.constexpr, MASK_GRAD: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The whole backward in one pass, nothing written but dx, per-sample dw, dbias (R, b, d, K / 1) and, with
    MASK_GRAD, this block of channels' part of dmask (b, n_blocks, L; the module docstring).

    One program per (sample, block of channels) walks the sequence in BLOCK_T-step tiles. For input times
    s, dx[s] = m[s] * sum_r sum_j w_r[K-1-j] * g_r(s +- j) (+ for the causal direction 0, - for the
    anti-causal direction 1), where g_r(t) = dout_r(t) m(t) silu'(pre_r(t)). The pre-activations at those
    K output shifts read the input at shifts -(K-1)..K-1 of the tile: the 2K-1 shifted tiles are loaded
    once (from cache after the first) and shared by both directions, so no pre-activation gradient is
    stored and read back. WIDTH <= 4."""
    pid_b = tl.program_id(0).to(tl.int64)
    batch = tl.num_programs(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_k = tl.arange(0, 4)
    mask_d = offs_d < dim
    x_base = x_ptr + pid_b * sx_b
    m_base = m_ptr + pid_b * sm_b
    dw0 = tl.zeros((4, BLOCK_D), dtype=tl.float32)  # (tap, channel), per direction
    dw1 = tl.zeros((4, BLOCK_D), dtype=tl.float32)
    db0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    db1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for t0 in range(0, seqlen, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < seqlen
        # unused shifts (WIDTH < 4) are dead code and never loaded
        xm3 = _load_shifted(x_base, m_base, offs_t - 3, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)
        xm2 = _load_shifted(x_base, m_base, offs_t - 2, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)
        xm1 = _load_shifted(x_base, m_base, offs_t - 1, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)
        x0 = _load_shifted(x_base, m_base, offs_t, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)
        xp1 = _load_shifted(x_base, m_base, offs_t + 1, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)
        xp2 = _load_shifted(x_base, m_base, offs_t + 2, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)
        xp3 = _load_shifted(x_base, m_base, offs_t + 3, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, HAS_MASK)
        acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        dm = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)  # MASK_GRAD: sum_r dout_r * act_r, the tile's times
        for r in tl.static_range(N_DIRS):
            w_base = w_ptr + r * dim * WIDTH + offs_d * WIDTH
            for j in tl.static_range(WIDTH):
                # output time t = s + j (direction 0) or s - j (direction 1) reads s through tap K-1-j
                if r == 0:
                    tj = offs_t + j
                else:
                    tj = offs_t - j
                ok = (tj >= 0) & (tj < seqlen)
                d = tl.load(dout_ptr + r * sdo_r + pid_b * sdo_b + tj[:, None] * sdo_t + offs_d[None, :] * sdo_d,
                            mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
                g = d
                if HAS_MASK:
                    g = d * tl.load(m_base + tj * sm_t, mask=ok, other=0.0).to(tl.float32)[:, None]
                if SILU:
                    pre = _pre_at_shift(xm3, xm2, xm1, x0, xp1, xp2, xp3, w_base, bias_ptr + r * dim, offs_d, mask_d,
                                        r, j, WIDTH, HAS_BIAS)
                    g = _silu_grad(pre, g, SILU)
                if MASK_GRAD:
                    if j == 0:  # dmask's output term at the tile's own times, from the unmasked dout
                        if not SILU:
                            pre = _pre_at_shift(xm3, xm2, xm1, x0, xp1, xp2, xp3, w_base, bias_ptr + r * dim, offs_d,
                                                mask_d, r, j, WIDTH, HAS_BIAS)
                        dm += d * _act(pre, SILU)
                acc += tl.load(w_base + (WIDTH - 1 - j), mask=mask_d, other=0.0).to(tl.float32)[None, :] * g
                if j == 0:  # g at the tile's own times: the weight and bias gradients
                    for k in tl.static_range(WIDTH):
                        if r == 0:
                            xk = _pick(xm3, xm2, xm1, x0, xp1, xp2, xp3, k - (WIDTH - 1))
                        else:
                            xk = _pick(xm3, xm2, xm1, x0, xp1, xp2, xp3, (WIDTH - 1) - k)
                        dwk = tl.sum(g * xk, axis=0)
                        if r == 0:
                            dw0 += tl.where(offs_k[:, None] == k, dwk[None, :], 0.0)
                        else:
                            dw1 += tl.where(offs_k[:, None] == k, dwk[None, :], 0.0)
                    if r == 0:
                        db0 += tl.sum(g, axis=0)
                    else:
                        db1 += tl.sum(g, axis=0)
        if MASK_GRAD:  # acc is the gradient of the masked input here; x0 is masked, so read the raw x again
            x_raw = _load_shifted(x_base, m_base, offs_t, offs_d, mask_d, seqlen, sx_d, sx_t, sm_t, False)
            part = tl.sum(x_raw * acc + dm, axis=1)
            tl.store(dm_ptr + (pid_b * tl.num_programs(1) + tl.program_id(1)) * seqlen + offs_t, part, mask=mask_t)
        if HAS_MASK:
            acc *= tl.load(m_base + offs_t * sm_t, mask=mask_t, other=0.0).to(tl.float32)[:, None]
        tl.store(dx_ptr + pid_b * sdx_b + offs_t[:, None] * sdx_t + offs_d[None, :] * sdx_d,
                 acc.to(dx_ptr.dtype.element_ty), mask=mask_t[:, None] & mask_d[None, :])
    mask_kd = (offs_k < WIDTH)[:, None] & mask_d[None, :]
    row = pid_b * dim + offs_d
    tl.store(dw_ptr + row[None, :] * WIDTH + offs_k[:, None], dw0, mask=mask_kd)
    if HAS_BIAS:
        tl.store(dbias_ptr + row, db0, mask=mask_d)
    if N_DIRS == 2:
        row += batch * dim
        tl.store(dw_ptr + row[None, :] * WIDTH + offs_k[:, None], dw1, mask=mask_kd)
        if HAS_BIAS:
            tl.store(dbias_ptr + row, db1, mask=mask_d)


@triton.jit
def _walk_loads(x_base, m_base, do0_base, do1_base, t, mask_d, seqlen, sx_t, sm_t, sdo_t,
                N_DIRS: tl.constexpr, HAS_MASK: tl.constexpr, MASK_GRAD: tl.constexpr):
    """What step t of the walk reads: x[t+3] and dout_0[t+3] (masked), dout_1[t] (masked), m[t] (1 without a
    mask), and m[t+3]. With MASK_GRAD the three are returned unmasked, as the mask's gradient needs them, and
    the step applies m[t+3] and m[t]; without, m[t+3] is applied here and returned as 1, so that the
    walk does not carry it. Every returned value is a (BLOCK_D,) fp32 tensor (scalars broadcast), so that
    they can be carried by the loop."""
    tn = t + 3
    ok_n = (tn >= 0) & (tn < seqlen)
    ok_t = (t >= 0) & (t < seqlen)
    vec = tl.zeros(mask_d.shape, dtype=tl.int32)  # broadcast the scalar tests first (for the interpreter)
    md_n = mask_d & ((vec + tn) >= 0) & ((vec + tn) < seqlen)
    md_t = mask_d & ((vec + t) >= 0) & ((vec + t) < seqlen)
    xn = tl.load(x_base + tn * sx_t, mask=md_n, other=0.0).to(tl.float32)
    go = tl.load(do0_base + tn * sdo_t, mask=md_n, other=0.0).to(tl.float32)
    gb = tl.zeros(mask_d.shape, dtype=tl.float32)
    if N_DIRS == 2:
        gb += tl.load(do1_base + t * sdo_t, mask=md_t, other=0.0).to(tl.float32)
    m_n = tl.zeros(mask_d.shape, dtype=tl.float32) + 1.0
    m_t = tl.zeros(mask_d.shape, dtype=tl.float32) + 1.0
    if HAS_MASK:
        mask_n = tl.load(m_base + tn * sm_t, mask=ok_n, other=0.0).to(tl.float32)
        m_t *= tl.load(m_base + t * sm_t, mask=ok_t, other=0.0).to(tl.float32)
        if MASK_GRAD:
            m_n *= mask_n
        else:
            xn *= mask_n
            go *= mask_n
            gb *= m_t
    return xn, go, gb, m_n, m_t


@triton.jit
def _conv_bwd_walk_kernel(
    x_ptr, w_ptr, bias_ptr, m_ptr, dout_ptr, dx_ptr, dw_ptr, dbias_ptr, dm_ptr, len_ptr,
    dim, seqlen,
    sx_b, sx_d, sx_t, sm_b, sm_t, sdo_r, sdo_b, sdo_d, sdo_t, sdx_b, sdx_d, sdx_t,
    N_DIRS: tl.constexpr, WIDTH: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_MASK: tl.constexpr,
    SILU: tl.constexpr, MASK_GRAD: tl.constexpr, BLOCK_D: tl.constexpr, HAS_LEN: tl.constexpr,
):
    """The backward for channel-contiguous inputs: each lane owns a channel and walks the sequence once,
    keeping the inputs x[t-3 .. t+2] and the pre-activation gradients g_0[t+1 .. t+3] (causal) and
    g_1[t-3 .. t-1] (anti-causal) of its channel in registers. Per step it loads x[t+3] and the output
    gradients, computes one pre-activation per direction (g_0 at t+3, g_1 at t), and stores dx[t]: one
    read of x and dout, one write of dx, one sigmoid per element and direction. Widths under 4 are run
    as width 4 with leading zero taps (the same convolution). Outputs like _conv_bwd_kernel's.

    MASK_GRAD: each step also sums its lanes' terms of dmask[t] (the module docstring) and stores that one
    value per program (b, n_blocks, L): the raw x[t] and dout_0[t] * act_0[t] (formed at step t-3, with
    g_0[t]) are carried in two more 3-slot windows.

    Steps go in groups of 4 whose loads are issued one group ahead (software pipelining): Triton cannot
    tell that the dx stores do not alias the inputs, so a load written after a store waits for it in
    program order, and without the prefetch every step would wait a full memory latency.

    HAS_LEN (with a mask and an output gradient that are 0 from len_ptr[b] on, as DyVM's kept-only training
    gives): the walk stops 3 steps after that point, where dx, dmask and the weight terms are all zeros from then
    on (dmask is not 0 in the 3 steps: direction 1 reads 3 steps ahead), and writes zeros for the rest."""
    pid_b = tl.program_id(0).to(tl.int64)
    batch = tl.num_programs(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < dim
    pad = 4 - WIDTH  # tap k' of the width-4 form is tap k' - pad of the real one
    w0 = w_ptr + offs_d * WIDTH - pad
    a0 = tl.load(w0, mask=mask_d & (pad <= 0), other=0.0).to(tl.float32)
    a1 = tl.load(w0 + 1, mask=mask_d & (pad <= 1), other=0.0).to(tl.float32)
    a2 = tl.load(w0 + 2, mask=mask_d & (pad <= 2), other=0.0).to(tl.float32)
    a3 = tl.load(w0 + 3, mask=mask_d, other=0.0).to(tl.float32)
    w1 = w0 + dim * WIDTH
    b0 = tl.load(w1, mask=mask_d & (pad <= 0) & (N_DIRS == 2), other=0.0).to(tl.float32)
    b1 = tl.load(w1 + 1, mask=mask_d & (pad <= 1) & (N_DIRS == 2), other=0.0).to(tl.float32)
    b2 = tl.load(w1 + 2, mask=mask_d & (pad <= 2) & (N_DIRS == 2), other=0.0).to(tl.float32)
    b3 = tl.load(w1 + 3, mask=mask_d & (N_DIRS == 2), other=0.0).to(tl.float32)
    bias0 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    bias1 = tl.zeros((BLOCK_D,), dtype=tl.float32)
    if HAS_BIAS:
        bias0 += tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        if N_DIRS == 2:
            bias1 += tl.load(bias_ptr + dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    x_base = x_ptr + pid_b * sx_b + offs_d * sx_d
    m_base = m_ptr + pid_b * sm_b
    do0_base = dout_ptr + pid_b * sdo_b + offs_d * sdo_d
    dx_base = dx_ptr + pid_b * sdx_b + offs_d * sdx_d
    dm_base = dm_ptr + (pid_b * tl.num_programs(1) + tl.program_id(1)) * seqlen
    zero = tl.zeros((BLOCK_D,), dtype=tl.float32)
    xm3 = zero  # x[t-3] ... x[t+2] entering step t (masked tokens and times outside as 0)
    xm2 = zero
    xm1 = zero
    x0 = zero
    xp1 = zero
    xp2 = zero
    f1 = zero  # g_0[t+1], g_0[t+2], g_0[t+3]... entering step t: f1 = g_0[t], f2 = g_0[t+1], f3 = g_0[t+2]
    f2 = zero
    f3 = zero
    h1 = zero  # g_1[t-1], g_1[t-2], g_1[t-3]
    h2 = zero
    h3 = zero
    r1 = zero  # MASK_GRAD: raw x[t], x[t+1], x[t+2] entering step t
    r2 = zero
    r3 = zero
    e1 = zero  # MASK_GRAD: dout_0 * act_0 (raw dout) at t, t+1, t+2 entering step t
    e2 = zero
    e3 = zero
    dw00 = zero
    dw01 = zero
    dw02 = zero
    dw03 = zero
    dw10 = zero
    dw11 = zero
    dw12 = zero
    dw13 = zero
    db0 = zero
    db1 = zero
    walk_end = seqlen
    if HAS_LEN:
        walk_end = tl.minimum(tl.load(len_ptr + pid_b).to(tl.int32) + 3, seqlen)
    # Steps t = -3 .. walk_end-1: the first three only fill the windows (their outputs are masked off).
    nx0, ng0, nb0, nn0, nm0 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, -3, mask_d, seqlen, sx_t,
                                          sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
    nx1, ng1, nb1, nn1, nm1 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, -2, mask_d, seqlen, sx_t,
                                          sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
    nx2, ng2, nb2, nn2, nm2 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, -1, mask_d, seqlen, sx_t,
                                          sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
    nx3, ng3, nb3, nn3, nm3 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, 0, mask_d, seqlen, sx_t,
                                          sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
    for t0 in range(-3, walk_end, 4):
        cx0, cg0, cb0, cn0, cm0 = nx0, ng0, nb0, nn0, nm0
        cx1, cg1, cb1, cn1, cm1 = nx1, ng1, nb1, nn1, nm1
        cx2, cg2, cb2, cn2, cm2 = nx2, ng2, nb2, nn2, nm2
        cx3, cg3, cb3, cn3, cm3 = nx3, ng3, nb3, nn3, nm3
        nx0, ng0, nb0, nn0, nm0 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, t0 + 4, mask_d, seqlen,
                                              sx_t, sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
        nx1, ng1, nb1, nn1, nm1 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, t0 + 5, mask_d, seqlen,
                                              sx_t, sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
        nx2, ng2, nb2, nn2, nm2 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, t0 + 6, mask_d, seqlen,
                                              sx_t, sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
        nx3, ng3, nb3, nn3, nm3 = _walk_loads(x_base, m_base, do0_base, do0_base + sdo_r, t0 + 7, mask_d, seqlen,
                                              sx_t, sm_t, sdo_t, N_DIRS, HAS_MASK, MASK_GRAD)
        for j in tl.static_range(4):
            t = t0 + j
            vec_t = t + tl.zeros((BLOCK_D,), dtype=tl.int32)
            md_t = mask_d & (vec_t >= 0) & (vec_t < seqlen)
            xn = pick4(cx0, cx1, cx2, cx3, j)  # x[t+3], dout_0[t+3], dout_1[t] (unmasked with MASK_GRAD)
            go = pick4(cg0, cg1, cg2, cg3, j)
            gb = pick4(cb0, cb1, cb2, cb3, j)
            m_t = pick4(cm0, cm1, cm2, cm3, j)
            xp3 = xn
            g0_in = go
            g1_in = gb
            if MASK_GRAD:
                m_n = pick4(cn0, cn1, cn2, cn3, j)
                xp3 = xn * m_n
                g0_in = go * m_n
                g1_in = gb * m_t
            # direction 0 (causal): g_0[t+3] from x[t .. t+3]
            pre0 = bias0 + a0 * x0 + a1 * xp1 + a2 * xp2 + a3 * xp3
            g0n = _silu_grad(pre0, g0_in, SILU)
            acc = a3 * f1 + a2 * f2 + a1 * f3 + a0 * g0n
            dw00 += f1 * xm3
            dw01 += f1 * xm2
            dw02 += f1 * xm1
            dw03 += f1 * x0
            db0 += f1
            if N_DIRS == 2:  # direction 1 (anti-causal): g_1[t] from x[t .. t+3]
                pre1 = bias1 + b3 * x0 + b2 * xp1 + b1 * xp2 + b0 * xp3
                g1t = _silu_grad(pre1, g1_in, SILU)
                acc += b3 * g1t + b2 * h1 + b1 * h2 + b0 * h3
                dw10 += g1t * xp3
                dw11 += g1t * xp2
                dw12 += g1t * xp1
                dw13 += g1t * x0
                db1 += g1t
                h3 = h2
                h2 = h1
                h1 = g1t
            if MASK_GRAD:  # acc is the gradient of the masked input x[t] * m[t] here
                part = r1 * acc + e1
                if N_DIRS == 2:
                    part += gb * _act(pre1, SILU)
                tl.store(dm_base + t, tl.sum(part, axis=0), mask=(t >= 0) & (t < seqlen))
                r1 = r2
                r2 = r3
                r3 = xn
                e1 = e2
                e2 = e3
                e3 = go * _act(pre0, SILU)
            if HAS_MASK:
                acc *= m_t
            tl.store(dx_base + t * sdx_t, acc.to(dx_ptr.dtype.element_ty), mask=md_t)
            xm3 = xm2
            xm2 = xm1
            xm1 = x0
            x0 = xp1
            xp1 = xp2
            xp2 = xp3
            f1 = f2
            f2 = f3
            f3 = g0n
        # Workaround for a Triton 3.6 miscompile (found on an H200, invisible to the interpreter): when the
        # loop yields values that are other loop-carried values passed through (here the window, rotated
        # by 4 slots), the weight gradient came out wrong (relative error 0.4; dx and dbias right). Adding
        # 0.0 makes them new values (x + 0.0 is not folded for floats). Checked at full size by
        # benchmarks/kernels.py.
        xm3 = xm3 + 0.0
        xm2 = xm2 + 0.0
        xm1 = xm1 + 0.0
        x0 = x0 + 0.0
        xp1 = xp1 + 0.0
        xp2 = xp2 + 0.0
        if MASK_GRAD:  # the raw window likewise
            r1 = r1 + 0.0
            r2 = r2 + 0.0
            r3 = r3 + 0.0
    if HAS_LEN:  # the rest of the sequence: zeros (a few of them written again after the last group)
        for t in range(walk_end, seqlen):
            tl.store(dx_base + t * sdx_t, zero.to(dx_ptr.dtype.element_ty), mask=mask_d)
            if MASK_GRAD:
                tl.store(dm_base + t, 0.0)
    # tap k of the real kernel is tap k + pad of the width-4 form
    row = pid_b * dim + offs_d
    dwp = dw_ptr + row * WIDTH - pad
    tl.store(dwp, dw00, mask=mask_d & (pad <= 0))
    tl.store(dwp + 1, dw01, mask=mask_d & (pad <= 1))
    tl.store(dwp + 2, dw02, mask=mask_d & (pad <= 2))
    tl.store(dwp + 3, dw03, mask=mask_d)
    if HAS_BIAS:
        tl.store(dbias_ptr + row, db0, mask=mask_d)
    if N_DIRS == 2:
        dwp += batch * dim * WIDTH
        tl.store(dwp, dw10, mask=mask_d & (pad <= 0))
        tl.store(dwp + 1, dw11, mask=mask_d & (pad <= 1))
        tl.store(dwp + 2, dw12, mask=mask_d & (pad <= 2))
        tl.store(dwp + 3, dw13, mask=mask_d)
        if HAS_BIAS:
            tl.store(dbias_ptr + batch * dim + row, db1, mask=mask_d)


# Tile (time x channels) and warps per program, per input layout: "cf" time-contiguous (b, d, L),
# "cl" channel-contiguous (the Vim mixer's). Chosen by benchmarks/kernels.py --sweep on an H200.
# MAMBA_TRITON_TUNING=file.json (benchmarks/kernels.py --sweep --save-tuning) overrides them ("conv" entry).
# The backward ("cf_bwd", "cl_bwd"): one program per block of channels walks the sequence, in block_t-step
# tiles (time-contiguous, _conv_bwd_kernel) or one step at a time, 4 steps per group (channel-contiguous,
# _conv_bwd_walk_kernel, which ignores block_t).
CONV_TUNING = {"cf": {"block_t": 256, "block_d": 16, "num_warps": 4},
               "cl": {"block_t": 16, "block_d": 128, "num_warps": 4},
               "cf_bwd": {"block_t": 256, "block_d": 2, "num_warps": 1},
               "cl_bwd": {"block_t": 4, "block_d": 64, "num_warps": 2}}


apply_tuning_file("conv", CONV_TUNING)


def _tiles(x: Tensor, block_t: Optional[int] = None, block_d: Optional[int] = None,
           num_warps: Optional[int] = None, backward: bool = False):
    _, dim, seqlen = x.shape
    tuning = CONV_TUNING[("cf" if x.stride(-1) == 1 else "cl") + ("_bwd" if backward else "")]
    block_d = min(block_d or tuning["block_d"], next_pow2(dim))
    block_t = min(block_t or tuning["block_t"], next_pow2(seqlen))
    return block_t, block_d, num_warps or tuning["num_warps"]


def _strides(t: Optional[Tensor], n: int):
    return [t.stride(i) for i in range(t.dim())] if t is not None else [0] * n


_forward_plans = {}  # (grid, integer arguments, constexprs) per key: eager inference is bound by the host


def conv_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], silu: bool,
                 out: Tensor, gate: Optional[Tensor] = None, block_t: Optional[int] = None,
                 block_d: Optional[int] = None, num_warps: Optional[int] = None) -> Tensor:
    """x: (b, d, L) view; weight: (R, d, K) contiguous; bias: (R, d) or None; mask: (b, L) or None;
    out: (R, b, d, L) view, written. gate (b, R): skip the (sample, direction) pairs whose gate is 0.
    block_t, block_d, num_warps override CONV_TUNING (the benchmark's sweep). (No lengths here, unlike the
    backward: tiles past a sample's end still write their zeros, the bulk of the forward's memory traffic, and
    skipping their reads measured no faster.)"""
    key = (x.shape, x.stride(), weight.shape, bias is None, None if mask is None else mask.stride(),
           None if gate is None else gate.stride(), out.stride(), silu, block_t, block_d, num_warps)
    plan = _forward_plans.get(key)
    if plan is None:
        batch, dim, seqlen = x.shape
        R, _, width = weight.shape
        block_t, block_d, num_warps = _tiles(x, block_t, block_d, num_warps)
        plan = remember(_forward_plans, key, (
            (batch, cdiv(seqlen, block_t), cdiv(dim, block_d)),
            (dim, seqlen, *_strides(x, 3), *_strides(mask, 2), *_strides(gate, 2), *_strides(out, 4)),
            dict(N_DIRS=R, WIDTH=width, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu,
                 SKIP_OFF=gate is not None, BLOCK_T=block_t, BLOCK_D=block_d, num_warps=num_warps)))
    grid, ints, kwargs = plan
    launch(_conv_fwd_kernel, grid, x, weight, bias if bias is not None else weight, mask if mask is not None else x,
           gate if gate is not None else x, out, *ints, **kwargs)
    return out


def conv_backward(x: Tensor, weight: Tensor, bias: Optional[Tensor], mask: Optional[Tensor], silu: bool,
                  dout: Tensor, mask_grad: bool = False, block_t: Optional[int] = None,
                  block_d: Optional[int] = None, num_warps: Optional[int] = None, dx_out: Optional[Tensor] = None,
                  lengths: Optional[Tensor] = None):
    """Gradients of conv_forward (without gates): dx like x's dtype and memory layout (b, d, L), or written into
    dx_out (x's shape and dtype, any strides); dweight (R, d, K) fp32; dbias (R, d) fp32 or None; dmask (b, L)
    fp32 when mask_grad and a mask is given, else None. dout: (R, b, d, L) view. lengths (b,) int32, where the
    mask and dout are 0 from lengths[b] on: the channel-contiguous walk stops 3 steps later and writes zeros after
    (the same result; the time-contiguous kernel ignores it). block_t, block_d, num_warps override CONV_TUNING's
    backward entries (the benchmark's sweep)."""
    batch, dim, seqlen = x.shape
    R, _, width = weight.shape
    if width > 4:
        raise ValueError(f"the conv backward kernel supports widths up to 4, got {width}")
    mask_grad = mask_grad and mask is not None
    block_t, block_d, num_warps = _tiles(x, block_t, block_d, num_warps, backward=True)
    dev, f32 = x.device, torch.float32
    dw = torch.empty((R, batch, dim, width), device=dev, dtype=f32)
    dbias = torch.empty((R, batch, dim), device=dev, dtype=f32) if bias is not None else None
    if dx_out is not None:
        if dx_out.shape != x.shape or dx_out.dtype != x.dtype:
            raise ValueError(f"conv backward: dx_out {tuple(dx_out.shape)} {dx_out.dtype} does not fit x "
                             f"{tuple(x.shape)} {x.dtype}")
        dx = dx_out
    else:
        dx = torch.empty((batch, seqlen, dim), device=dev, dtype=x.dtype).transpose(1, 2) if x.stride(1) == 1 \
            else torch.empty((batch, dim, seqlen), device=dev, dtype=x.dtype)
    grid = (batch, cdiv(dim, block_d))
    # dmask's sums over channels: one row per program (block of channels), added up here (deterministic)
    dm_parts = torch.empty((batch, grid[1], seqlen), device=dev, dtype=f32) if mask_grad else None
    args = (x, weight, bias if bias is not None else weight, mask if mask is not None else x, dout, dx, dw,
            dbias if dbias is not None else dw, dm_parts if mask_grad else dw, dim, seqlen,
            *_strides(x, 3), *_strides(mask, 2), *_strides(dout, 4), *_strides(dx, 3))
    flags = dict(N_DIRS=R, WIDTH=width, HAS_BIAS=bias is not None, HAS_MASK=mask is not None, SILU=silu,
                 MASK_GRAD=mask_grad, BLOCK_D=block_d, num_warps=num_warps)
    if x.stride(1) == 1:  # channel-contiguous: a lane per channel walks time (block_t unused)
        has_len = lengths is not None and mask is not None
        launch(_conv_bwd_walk_kernel, grid, *args[:9], lengths if has_len else dw, *args[9:], HAS_LEN=has_len,
               **flags)
    else:
        launch(_conv_bwd_kernel, grid, *args, BLOCK_T=block_t, **flags)
    # the per-sample rows of dweight and dbias and the channel blocks' of dmask in one launch
    dw_sum, db_sum, dm_sum = sum_middle(dw.view(R, batch, -1), dbias, dm_parts)
    return dx, dw_sum.view(R, dim, width), db_sum, dm_sum
