"""Triton selective scan: forward and backward, one or two directions per launch, per-sample gates.

One program owns (sample, block of BLOCK_D channels) and walks the sequence once per direction with the
state h (BLOCK_D, d_state) in registers: at Vim's short sequences (L = 197) a sequential walk over time
with many programs in flight beats a parallel scan, and nothing of size (B, D, L, N) is ever written.

Two directions (the DyVM bidirectional layer): direction 1 walks time backwards over the same tensors (so
no flipped copies are made). Either one program runs direction 0, then direction 1, which reads back and
accumulates what direction 0 wrote, or (split_dirs) each direction has its own programs and output, summed
after the launch. A (sample, direction) whose gate is exactly 0 is skipped in the forward pass (its
contribution 0 * y is zero): no work, no copy. At inference the programs of the pairs that run are
dispatched first, in the plain grid's order (_active_pair): interleaved with gated-off ones they fill the
machine unevenly.

Backward: from the states the forward stored every CKPT_CHUNK steps (checkpoints), the program takes the
chunks from last to first, recomputes each chunk's states into a small per-program scratch and walks it
in reverse with the adjoint state g_t = C_t dy_t + a_{t+1} g_{t+1}. A chunk may be taken in pieces of
sub_chunk steps (last piece first, each recomputed from the chunk's checkpoint): a smaller scratch, for some
steps walked twice. The scratch is in shared memory (smem_scratch; else in global memory, where it stays in L2).

Prefetch (both walks): loads are issued ahead of the stores of the current step(s). Triton does not know that the
stores cannot alias the inputs, so a load written after a store waits for it, and each step would expose a memory
latency (docs/kernels.md). The backward also asks L2 for each checkpoint chunk's inputs a chunk ahead (l2_prefetch),
and L1 as the chunk starts (l1_prefetch). Cross-channel sums
(dB, dC) and cross-sample sums (dA, dD, d delta_bias, d gate) are written as per-program partial sums
and reduced in a fixed order after the launch (dB and dC by _sum_bc_partials_kernel, the rest by torch), so results
are deterministic.

Math in fp32 whatever the input dtype; exp via exp2 with A pre-scaled by log2(e).
"""
import os
from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from causal_conv1d.kernel_utils import apply_tuning_file
from causal_conv1d.partial_sums import sum_middle
from causal_conv1d.triton_utils import cdiv, interpreted, launch, next_pow2, pick4, remember

# Launch parameters, chosen on an H200 (docs/kernels.md; benchmarks/kernels.py --sweep re-measures them).
# Forward: per input layout (time-contiguous "cf", as selective_scan_fn callers pass; channel-contiguous
# "cl", as the Vim mixer passes). Backward: chunk = checkpoint interval (steps).
# Keys: layout / element size ("cf/4": time-contiguous fp32, "cl/2": channel-contiguous bf16 or fp16).
# MAMBA_TRITON_TUNING=file.json (written by benchmarks/kernels.py --sweep --save-tuning) overrides them.
# prefetch: walk in groups of 4 steps whose loads are issued one group ahead (unroll then unused).
# split_dirs (two directions): a program per direction rather than one running both, then a gate-aware sum
# of the two outputs. Such a program compiles one walk instead of two, never reads the other direction's
# output back, and a gated-off direction leaves its slot at once: at Vim-S shapes on an H200, 536 against
# 591 us (bf16, all directions on) and 510 against 576 us (3/4 on), the sum included (docs/kernels.md).
# ckpt_maxnreg: a cap on the registers per thread of the training forward (which stores checkpoints and holds
# more live values: 210 registers against 157 without), 0 for none. At Vim-S training shapes on an H200, 168
# took 480 against 602 us (fp32); in bf16 no cap helped (160: 470 against 473 us; 128: 512 us).
FWD_TUNING = {
    "cf/4": {"block_d": 32, "num_warps": 2, "unroll": 4, "lanes_on_channels": False, "prefetch": True,
             "split_dirs": False, "ckpt_maxnreg": 0},
    "cf/2": {"block_d": 64, "num_warps": 2, "unroll": 4, "lanes_on_channels": False, "prefetch": True,
             "split_dirs": False, "ckpt_maxnreg": 0},
    "cl/4": {"block_d": 32, "num_warps": 1, "unroll": 4, "lanes_on_channels": False, "prefetch": True,
             "split_dirs": True, "ckpt_maxnreg": 168},
    "cl/2": {"block_d": 32, "num_warps": 1, "unroll": 4, "lanes_on_channels": True, "prefetch": True,
             "split_dirs": True, "ckpt_maxnreg": 0},
}
# The backward runs on channel-contiguous inputs only (time-contiguous ones are copied: its per-lane loads
# would not coalesce; measured 2.9 ms against 1.6 ms at Vim-S, fp32, H200).
# sub_chunk: the steps of a checkpoint chunk recomputed into the per-program scratch at a time (the rest of the
# chunk's steps are walked again without storing); scratch_evict: the L2 eviction policy of the scratch's stores;
# maxnreg: a cap on registers per thread (0: none), for more programs in flight at the cost of spills to L1.
# At Vim-S training shapes on an H200 (both directions, gated, batch 128; benchmarks/scan_train_tuning.py),
# pieces of 8 steps with evict_last took 2373 against 2564 us (bf16) and 2487 against 2660 us (fp32); every
# register cap tried was slower (168: 3023 us, 128: 4945 us, bf16): the spills sit in the walk's inner loop.
# With the piece in two walks (forward, then adjoint): 2411 us bf16, 2461 us fp32; caps of 160 and below slower
# (2677 us and up), 168 within the noise, pieces of 4 slower (2871 us) (bwd_two_walks_h200_2026-11-27i.txt).
# smem_scratch: the walks' scratch (19 KiB a program) in shared memory rather than global memory (where lane_sums
# holds: nothing else reads it): its stores no longer go to L2, a state is four 16-byte stores (loads) rather than
# 16, and the kernel needs 222 registers instead of 251 (still two warps a scheduler). Vim-S training shapes, H200:
# 1874 against 1999 us bf16 (-6.3%), 1883 against 2055 fp32 (-8.3%), gradients bit for bit the same
# (scan_bwd_smem_scratch_h200_2026-11-28.txt).
# l2_prefetch (where the scratch is in shared memory): at the start of each checkpoint chunk, prefetch instructions
# ask L2 for everything the walks of the next chunk will read first (its checkpoint; u, dt, B, C, dout, z of its
# steps): those first touches came from DRAM, which the one-step-ahead loads do not hide (Nsight Compute: the
# advance and forward walk's long-scoreboard stalls).
# Vim-S training shapes, H200: 1750 against 1844 us bf16 (-5.1%), kept lengths -5.3%; fp32 -0.3%, kept lengths -2%;
# the same prefetch in the forward kernel was slower in training and in fp32 (not kept). l1_prefetch (with
# l2_prefetch): at the start of each chunk, its own inputs asked from L2 into L1 as well: 1716 against 1764 us bf16
# (-2.7%), graphed dense training +2.6% (scan_bwd_l2_prefetch_h200_2026-11-28.txt).
BWD_TUNING = {"cl/4": {"block_d": 32, "num_warps": 1, "prefetch": True, "sub_chunk": 8, "scratch_evict": "evict_last",
                       "maxnreg": 0, "sum_steps": 4, "lane_sums": True, "smem_scratch": True,
                       "l2_prefetch": True, "l1_prefetch": True},
              "cl/2": {"block_d": 32, "num_warps": 1, "prefetch": True, "sub_chunk": 8, "scratch_evict": "evict_last",
                       "maxnreg": 0, "sum_steps": 4, "lane_sums": True, "smem_scratch": True,
                       "l2_prefetch": True, "l1_prefetch": True}}
# The forward stores the state every CKPT_CHUNK steps when a backward will follow; the backward
# recomputes one chunk at a time from it (memory: 4 * d_state / CKPT_CHUNK bytes per input element).
# MAMBA_SCAN_CKPT_CHUNK=8 trades memory for speed: a chunk is then one piece, which the backward walks twice, not
# 2.5 times (no advance). Vim-S training shapes, bf16, H200: the scan backward 1958 against 2153 us a layer (forward
# 487 against 472), graphed training +3% dense and DyVM-S (1566 against 1520 images/s) for 3.3 GiB more at batch
# 128 (4 more bytes per step, channel and direction of each layer). 32 keeps half the states of 16: 1.7 GiB less,
# training about 10% slower (benchmarks/results/ckpt_interval_h200_2026-11-28.txt).
CKPT_CHUNK_ENV = "MAMBA_SCAN_CKPT_CHUNK"
CKPT_CHUNKS = (8, 16, 32)


def ckpt_chunk_from_env() -> int:
    """The checkpoint interval: MAMBA_SCAN_CKPT_CHUNK (8, 16 or 32; a multiple of every piece length the backward
    is tuned to), 16 when unset."""
    value = os.environ.get(CKPT_CHUNK_ENV, "16")
    if value not in {str(c) for c in CKPT_CHUNKS}:
        raise RuntimeError(f"{CKPT_CHUNK_ENV}={value}: the scan's checkpoint interval must be one of "
                           f"{', '.join(map(str, CKPT_CHUNKS))} (steps)")
    return int(value)


CKPT_CHUNK = ckpt_chunk_from_env()
# Gated inference walks in the order of their gates (_active_pair) up to this many (sample, direction) pairs:
# each program ranks them all (batch 2048 with two directions).
MAX_ACTIVE_PAIRS = 4096


def _tuning_key(t: Tensor) -> str:
    return f"{'cf' if t.stride(-1) == 1 else 'cl'}/{min(t.element_size(), 4)}"


def forward_lanes_on_channels(u: Tensor) -> bool:
    """Whether scan_forward's default plan for inputs like u reads A (R, N, d)-contiguous (lanes along channels),
    else (R, d, N)-contiguous: inference keeps A in that order (mamba_ssm.ops.scan_op.scan_output)."""
    return FWD_TUNING[_tuning_key(u)]["lanes_on_channels"]


def A_in_kernel_layout(A: Tensor, lanes_on_channels: bool) -> bool:
    """Whether A (R, d, N) is laid out in the memory order the forward kernel reads (it takes the pointer):
    (R, N, d)-contiguous with lanes on channels (the stacked weights hold it so: mamba_ssm.ops.bimamba_stacked), else
    (R, d, N)-contiguous."""
    R, dim, d_state = A.shape
    return A.stride() == ((d_state * dim, 1, dim) if lanes_on_channels else (dim * d_state, d_state, 1))


def A_in_kernel_order(A: Tensor, lanes_on_channels: bool) -> Tensor:
    """A (R, d, N) laid out as the forward kernel reads it (A_in_kernel_layout): A itself where it is, else a copy
    (fp32 inference keeps that copy with its cached weights: mamba_ssm.ops.scan_op._A_as_read)."""
    if A_in_kernel_layout(A, lanes_on_channels):
        return A
    return A.transpose(-1, -2).contiguous().transpose(-1, -2) if lanes_on_channels else A.contiguous()


apply_tuning_file("fwd", FWD_TUNING)
apply_tuning_file("bwd", BWD_TUNING)


@triton.jit
def _softplus(x):
    # Matches torch's softplus (threshold 20) without log1p, which the interpreter lacks.
    return tl.where(x > 20.0, x, tl.where(x < -15.0, tl.exp(x), tl.log(1.0 + tl.exp(x))))


@triton.jit
def _walk_time(s, seqlen, r):
    """The time index of step s of direction r's walk (direction 1 walks backwards); r may be a constant or,
    with split directions, a run-time value."""
    return s + r * (seqlen - 1 - 2 * s)


@triton.jit
def _sample_length(len_ptr, pid_b, seqlen, HAS_LEN: tl.constexpr):
    """The number of positions sample pid_b's walks cover: len_ptr[pid_b] clipped to [0, seqlen] (HAS_LEN), else
    seqlen. The rest of the sequence is outside the sample: no step there runs."""
    if HAS_LEN:
        return tl.minimum(tl.maximum(tl.load(len_ptr + pid_b).to(tl.int32), 0), seqlen)
    return seqlen


@triton.jit
def _longest_first_program(order_ptr, n_blocks):
    """(sample, channel block) of this program where the kernels run the samples longest first (per-sample lengths):
    the grid's (sample, channel block) ids read as one linear id, all of a sample's channel blocks together, the
    samples in order_ptr's order (by length, descending). In the grid's own order the last wave's long walks started
    last and ran on after the short ones were done."""
    pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    return tl.load(order_ptr + pid // n_blocks).to(tl.int64), pid % n_blocks


@triton.jit
def _fwd_loads(u_base, dt_base, B_base, C_base, z_base, o_base, s, seqlen, su_t, sdt_t, sB_t, sC_t, sz_t, so_t,
               mask_d, mask_n, mask_acc, r, ACCUMULATE: tl.constexpr, HAS_Z: tl.constexpr):
    """What step s of direction r's walk reads, in fp32: u, dt, z, the output so far (ACCUMULATE: direction
    1 adds to direction 0's), B and C. Zeros past the end (and for absent z)."""
    t = _walk_time(s, seqlen, r)
    ok = (s + tl.zeros(mask_d.shape, tl.int32)) < seqlen
    ok_n = (s + tl.zeros(mask_n.shape, tl.int32)) < seqlen
    md = mask_d & ok
    u = tl.load(u_base + t * su_t, mask=md, other=0.0).to(tl.float32)
    dt = tl.load(dt_base + t * sdt_t, mask=md, other=0.0).to(tl.float32)
    z = tl.zeros(mask_d.shape, tl.float32)
    if HAS_Z:
        z += tl.load(z_base + t * sz_t, mask=md, other=0.0).to(tl.float32)
    prev = tl.zeros(mask_d.shape, tl.float32)
    if ACCUMULATE:
        prev += tl.load(o_base + t * so_t, mask=mask_acc & ok, other=0.0).to(tl.float32)
    Bt = tl.load(B_base + t * sB_t, mask=mask_n & ok_n, other=0.0).to(tl.float32)
    Ct = tl.load(C_base + t * sC_t, mask=mask_n & ok_n, other=0.0).to(tl.float32)
    return u, dt, z, prev, Bt, Ct


@triton.jit
def _fwd_group_loads(u_base, dt_base, B_base, C_base, z_base, o_base, s0, seqlen, su_t, sdt_t, sB_t, sC_t, sz_t,
                     so_t, mask_d, mask_n, mask_acc, r, ACCUMULATE: tl.constexpr, HAS_Z: tl.constexpr):
    """_fwd_loads of the 4 steps s0 .. s0 + 3 (the prefetching walk's group), flattened step by step."""
    u0, dt0, z0, pv0, B0, C0 = _fwd_loads(u_base, dt_base, B_base, C_base, z_base, o_base, s0, seqlen, su_t, sdt_t,
                                          sB_t, sC_t, sz_t, so_t, mask_d, mask_n, mask_acc, r, ACCUMULATE, HAS_Z)
    u1, dt1, z1, pv1, B1, C1 = _fwd_loads(u_base, dt_base, B_base, C_base, z_base, o_base, s0 + 1, seqlen, su_t,
                                          sdt_t, sB_t, sC_t, sz_t, so_t, mask_d, mask_n, mask_acc, r, ACCUMULATE,
                                          HAS_Z)
    u2, dt2, z2, pv2, B2, C2 = _fwd_loads(u_base, dt_base, B_base, C_base, z_base, o_base, s0 + 2, seqlen, su_t,
                                          sdt_t, sB_t, sC_t, sz_t, so_t, mask_d, mask_n, mask_acc, r, ACCUMULATE,
                                          HAS_Z)
    u3, dt3, z3, pv3, B3, C3 = _fwd_loads(u_base, dt_base, B_base, C_base, z_base, o_base, s0 + 3, seqlen, su_t,
                                          sdt_t, sB_t, sC_t, sz_t, so_t, mask_d, mask_n, mask_acc, r, ACCUMULATE,
                                          HAS_Z)
    return (u0, dt0, z0, pv0, B0, C0, u1, dt1, z1, pv1, B1, C1,
            u2, dt2, z2, pv2, B2, C2, u3, dt3, z3, pv3, B3, C3)


@triton.jit
def _fwd_step(h, A2, u, dt, z, prev, Bt, Ct, Dv, bias, g_scale, LANES_ON_CHANNELS: tl.constexpr,
              HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
              ACCUMULATE: tl.constexpr, ok):
    """One step of the walk from its loaded inputs -> (new state, output y)."""
    if HAS_BIAS:
        dt += bias
    if SOFTPLUS:
        dt = _softplus(dt)
    dt = tl.where(ok, dt, 0.0)  # steps past the end leave h unchanged
    if LANES_ON_CHANNELS:
        h = tl.exp2(dt[None, :] * A2) * h + (dt * u)[None, :] * Bt[:, None]
        y = tl.sum(h * Ct[:, None], axis=0)
    else:
        h = tl.exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * Bt[None, :]
        y = tl.sum(h * Ct[None, :], axis=1)
    if HAS_D:
        y += Dv * u
    if HAS_Z:
        y *= z * tl.sigmoid(z)
    y *= g_scale
    if ACCUMULATE:
        y += prev
    return h, y


@triton.jit
def _store_ckpt(ckpt_base, s0, h, offs_n, offs_d, mask_nd, mask_dn, dim, d_state, CKPT_T: tl.constexpr,
                LANES_ON_CHANNELS: tl.constexpr):
    """At the start of every CKPT_T-step chunk, store the state entering it ((n, d) order) for the backward."""
    if s0 % CKPT_T == 0:
        c_off = ckpt_base + (s0 // CKPT_T) * d_state * dim
        if LANES_ON_CHANNELS:
            tl.store(c_off + offs_n[:, None] * dim + offs_d[None, :], h, mask=mask_nd)
        else:
            tl.store(c_off + offs_n[None, :] * dim + offs_d[:, None], h, mask=mask_dn)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, gate_ptr, out_ptr, last_ptr, ckpt_ptr, len_ptr,
    order_ptr, dim, seqlen, d_state, dpg_B, dpg_C,
    su_r, su_b, su_d, su_t,
    sdt_r, sdt_b, sdt_d, sdt_t,
    sz_b, sz_d, sz_t,
    sB_r, sB_b, sB_g, sB_n, sB_t,
    sC_r, sC_b, sC_g, sC_n, sC_t,
    so_r, so_b, so_d, so_t,
    sg_b, sg_r,
    scale,
    N_DIRS: tl.constexpr, SPLIT_DIRS: tl.constexpr,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_GATE: tl.constexpr, STORE_LAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, UNROLL: tl.constexpr, LANES_ON_CHANNELS: tl.constexpr,
    CKPT_T: tl.constexpr, PREFETCH: tl.constexpr, ACTIVE_SAMPLES: tl.constexpr, HAS_LEN: tl.constexpr,
):
    """CKPT_T > 0 (training): store the state entering every CKPT_T-th step of each walk into ckpt
    (r, b, n_chunks, n, d) fp32 for the backward, and run gated-off directions too (the backward needs
    their states for the gate's gradient). UNROLL divides CKPT_T.
    SPLIT_DIRS: program_id(2) picks the one direction this program runs, and each direction writes its
    own output (out_ptr + r * so_r), which the launcher sums; otherwise one program runs both directions
    and direction 1 adds to direction 0's output.
    ACTIVE_SAMPLES > 0 (split directions with gates, no checkpoints; a power of 2 >= batch): a 1-D grid of
    batch * directions * channel blocks programs; the first ones run the (sample, direction) pairs whose
    gate is on, in the plain grid's order, and the rest nothing (_active_pair).
    HAS_LEN: sample b's sequence is its first len_ptr[b] positions (_sample_length): the walks cover those, and
    after them each direction that runs writes zeros, into the output (_sum_directions_kernel writes them where the
    directions are split); the programs of each direction run the samples longest first (order_ptr: the samples
    by length, descending), as the backward's do."""
    if ACTIVE_SAMPLES > 0:
        n_blocks = tl.cdiv(dim, BLOCK_D)
        batch = tl.num_programs(0) // (n_blocks * N_DIRS)
        sample, pid_r, pid_d = _active_pair(gate_ptr, tl.program_id(0), batch, n_blocks, sg_b, sg_r, N_DIRS,
                                            ACTIVE_SAMPLES)
        pid_b = tl.maximum(sample, 0).to(tl.int64)
    elif HAS_LEN:
        pid_b, pid_d = _longest_first_program(order_ptr, tl.num_programs(1))
        pid_r = tl.program_id(2)
        batch = tl.num_programs(0)
    else:
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
        pid_r = tl.program_id(2)
        batch = tl.num_programs(0)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group_B = (pid_d * BLOCK_D) // dpg_B  # a block never straddles groups (see _block_d)
    group_C = (pid_d * BLOCK_D) // dpg_C
    o_base = out_ptr + pid_b * so_b + offs_d * so_d
    gate0 = 1.0
    gate1 = 1.0
    if HAS_GATE:
        gate0 = tl.load(gate_ptr + pid_b * sg_b).to(tl.float32)
        if N_DIRS == 2:
            gate1 = tl.load(gate_ptr + pid_b * sg_b + sg_r).to(tl.float32)
        if ACTIVE_SAMPLES > 0:  # an item past the last pair that runs: nothing to do
            gate0 = tl.where(sample < 0, 0.0, gate0)
            gate1 = tl.where(sample < 0, 0.0, gate1)
    n_chunks = tl.cdiv(seqlen, CKPT_T) if CKPT_T > 0 else 1  # (the checkpoints' layout: the full length)
    walk_len = _sample_length(len_ptr, pid_b, seqlen, HAS_LEN)
    for rr in tl.static_range(1 if SPLIT_DIRS else N_DIRS):
        if SPLIT_DIRS:  # the direction is known at run time only: one walk is compiled, not two
            r = pid_r
            gate = tl.where(pid_r == 0, gate0, gate1)
        else:
            r = rr
            gate = gate0 if rr == 0 else gate1
        run = gate
        if CKPT_T > 0:
            run = 1.0
        # direction 1 adds to direction 0's output, unless each direction has its own
        accumulate = False if SPLIT_DIRS else rr == 1  # (a compile-time constant)
        o_dir = o_base + r * so_r
        if run != 0.0:
            # The state tile's orientation decides Triton's layout. LANES_ON_CHANNELS: (N, channels), lanes
            # along channels, so a thread owns whole channels (no replicated per-channel work, the y sum
            # over N inside the thread): faster for channel-contiguous inputs. Otherwise (channels, N), the
            # states of a channel spread over lanes: faster for time-contiguous inputs, whose strided loads
            # are then shared by fewer lanes. A comes as (R, N, d) for the first, (R, d, N) for the second
            # (the A load's contiguous axis steers the layout Triton picks for the whole tile).
            if LANES_ON_CHANNELS:
                A2 = tl.load(A_ptr + r * dim * d_state + offs_n[:, None] * dim + offs_d[None, :],
                             mask=mask_nd, other=0.0).to(tl.float32) * 1.4426950408889634
                h = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
            else:
                A2 = tl.load(A_ptr + r * dim * d_state + offs_d[:, None] * d_state + offs_n[None, :],
                             mask=mask_dn, other=0.0).to(tl.float32) * 1.4426950408889634
                h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
            Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
            bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
            if HAS_D:
                Dv += tl.load(D_ptr + r * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            if HAS_BIAS:
                bias += tl.load(bias_ptr + r * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
            u_base = u_ptr + r * su_r + pid_b * su_b + offs_d * su_d
            dt_base = dt_ptr + r * sdt_r + pid_b * sdt_b + offs_d * sdt_d
            B_base = B_ptr + r * sB_r + pid_b * sB_b + group_B * sB_g + offs_n * sB_n
            C_base = C_ptr + r * sC_r + pid_b * sC_b + group_C * sC_g + offs_n * sC_n
            z_base = z_ptr + pid_b * sz_b + offs_d * sz_d
            g_scale = gate * scale
            # ... and not where direction 0 was gated off (it wrote nothing there)
            mask_acc = mask_d
            if HAS_GATE:
                # broadcast the scalar first: the interpreter cannot & a scalar with a vector
                mask_acc = mask_d & ((gate0 + tl.zeros((BLOCK_D,), tl.float32)) != 0.0)
            ckpt_base = ckpt_ptr + (r * batch + pid_b) * n_chunks * d_state * dim
            if PREFETCH:
                # Groups of 4 steps whose loads are issued one group ahead: Triton cannot tell that the
                # output stores do not alias the inputs, so loads written after a store wait for it.
                (nu0, ndt0, nz0, npv0, nB0, nC0, nu1, ndt1, nz1, npv1, nB1, nC1,
                 nu2, ndt2, nz2, npv2, nB2, nC2, nu3, ndt3, nz3, npv3, nB3, nC3) = _fwd_group_loads(
                    u_base, dt_base, B_base, C_base, z_base, o_dir, 0, walk_len, su_t, sdt_t, sB_t, sC_t, sz_t,
                    so_t, mask_d, mask_n, mask_acc, r, accumulate, HAS_Z)
                for s0 in range(0, walk_len, 4):
                    if CKPT_T > 0:
                        _store_ckpt(ckpt_base, s0, h, offs_n, offs_d, mask_nd, mask_dn, dim, d_state, CKPT_T,
                                    LANES_ON_CHANNELS)
                    cu0, cdt0, cz0, cpv0, cB0, cC0 = nu0, ndt0, nz0, npv0, nB0, nC0
                    cu1, cdt1, cz1, cpv1, cB1, cC1 = nu1, ndt1, nz1, npv1, nB1, nC1
                    cu2, cdt2, cz2, cpv2, cB2, cC2 = nu2, ndt2, nz2, npv2, nB2, nC2
                    cu3, cdt3, cz3, cpv3, cB3, cC3 = nu3, ndt3, nz3, npv3, nB3, nC3
                    (nu0, ndt0, nz0, npv0, nB0, nC0, nu1, ndt1, nz1, npv1, nB1, nC1,
                     nu2, ndt2, nz2, npv2, nB2, nC2, nu3, ndt3, nz3, npv3, nB3, nC3) = _fwd_group_loads(
                        u_base, dt_base, B_base, C_base, z_base, o_dir, s0 + 4, walk_len, su_t, sdt_t, sB_t, sC_t,
                        sz_t, so_t, mask_d, mask_n, mask_acc, r, accumulate, HAS_Z)
                    for j in tl.static_range(4):
                        s = s0 + j
                        t = _walk_time(s, walk_len, r)
                        ok = (s + tl.zeros((BLOCK_D,), tl.int32)) < walk_len
                        h, y = _fwd_step(h, A2, pick4(cu0, cu1, cu2, cu3, j), pick4(cdt0, cdt1, cdt2, cdt3, j),
                                         pick4(cz0, cz1, cz2, cz3, j), pick4(cpv0, cpv1, cpv2, cpv3, j),
                                         pick4(cB0, cB1, cB2, cB3, j), pick4(cC0, cC1, cC2, cC3, j), Dv, bias,
                                         g_scale, LANES_ON_CHANNELS, HAS_D, HAS_Z, HAS_BIAS, SOFTPLUS, accumulate, ok)
                        tl.store(o_dir + t * so_t, y.to(out_ptr.dtype.element_ty), mask=mask_d & ok)
            else:  # a plain unrolled walk: each step's loads wait for the previous step's store
                for s0 in range(0, walk_len, UNROLL):
                    if CKPT_T > 0:
                        _store_ckpt(ckpt_base, s0, h, offs_n, offs_d, mask_nd, mask_dn, dim, d_state, CKPT_T,
                                    LANES_ON_CHANNELS)
                    for j in tl.static_range(UNROLL):
                        s = s0 + j
                        t = _walk_time(s, walk_len, r)
                        ok = (s + tl.zeros((BLOCK_D,), tl.int32)) < walk_len
                        u, dt, z, prev, Bt, Ct = _fwd_loads(
                            u_base, dt_base, B_base, C_base, z_base, o_dir, s, walk_len, su_t, sdt_t, sB_t, sC_t, sz_t,
                            so_t, mask_d, mask_n, mask_acc, r, accumulate, HAS_Z)
                        h, y = _fwd_step(h, A2, u, dt, z, prev, Bt, Ct, Dv, bias, g_scale, LANES_ON_CHANNELS, HAS_D,
                                         HAS_Z, HAS_BIAS, SOFTPLUS, accumulate, ok)
                        tl.store(o_dir + t * so_t, y.to(out_ptr.dtype.element_ty), mask=mask_d & ok)
            if HAS_LEN and not SPLIT_DIRS:  # past the sample's end: zeros (direction 1 adds zeros to direction 0's)
                zero = tl.zeros((BLOCK_D,), dtype=out_ptr.dtype.element_ty)
                for t in range(walk_len, seqlen):
                    tl.store(o_dir + t * so_t, zero, mask=mask_d)
            if STORE_LAST:
                if LANES_ON_CHANNELS:
                    tl.store(last_ptr + ((r * batch + pid_b) * dim + offs_d[None, :]) * d_state
                             + offs_n[:, None], h, mask=mask_nd)
                else:
                    tl.store(last_ptr + ((r * batch + pid_b) * dim + offs_d[:, None]) * d_state
                             + offs_n[None, :], h, mask=mask_dn)
        if not SPLIT_DIRS:
            tl.debug_barrier()  # direction 1 reads what direction 0 stored (maybe from another thread)
    if HAS_GATE and CKPT_T == 0:
        if not SPLIT_DIRS:  # (split: _sum_directions_kernel reads only the directions that ran)
            none_on = gate0 == 0.0
            if N_DIRS == 2:
                none_on = none_on & (gate1 == 0.0)
            if none_on:  # every direction gated off: this sample's output is zeros
                zero = tl.zeros((BLOCK_D,), dtype=out_ptr.dtype.element_ty)
                for t in range(seqlen):
                    tl.store(o_base + t * so_t, zero, mask=mask_d)


@triton.jit
def _active_pair(gate_ptr, item, batch, n_blocks, sg_b, sg_r, N_DIRS: tl.constexpr, SAMPLES: tl.constexpr):
    """Program `item` of the gated inference grid -> (sample, direction, channel block), in the plain grid's
    order (sample fastest, then channel block, then direction) with the (sample, direction) pairs whose gate
    is 0 left out; sample -1 for the items past those that run (nothing to do).

    Why: a gated-off program returns at once, but where on and off pairs interleave in the plain grid the
    walks that run fill the machine unevenly. At Vim-S shapes on an H200 (bf16, L 197), 3/4 of the pairs on
    at random took 412 to 419 us on the plain grid against 340 to 389 us in this order (two random draws), all
    pairs 445 us.
    The order matters too: a grid of pairs with directions or channel blocks fastest took 541 to 551 us with
    every pair on (docs/kernels.md). Each program reads the gates (a few hundred bytes, from L2) and ranks
    them itself: no launch, no buffer, nothing kept between calls."""
    samples = tl.arange(0, SAMPLES)
    in_batch = samples < batch
    on0 = tl.where(in_batch & (tl.load(gate_ptr + samples * sg_b, mask=in_batch, other=0.0).to(tl.float32)
                               != 0.0), 1, 0)
    n0 = tl.sum(on0, axis=0)
    on, n_on, k, r = on0, n0, item, 0
    if N_DIRS == 2:
        on1 = tl.where(in_batch & (tl.load(gate_ptr + samples * sg_b + sg_r, mask=in_batch, other=0.0)
                                   .to(tl.float32) != 0.0), 1, 0)
        second = item >= n0 * n_blocks
        on = tl.where(second, on1, on0)
        n_on = tl.where(second, tl.sum(on1, axis=0), n0)
        k = tl.where(second, item - n0 * n_blocks, item)
        r = tl.where(second, 1, 0)
    n_on = tl.maximum(n_on, 1)
    rank = tl.cumsum(on, axis=0)  # inclusive: the j-th sample on has rank j
    sample = tl.max(tl.where((on != 0) & (rank == k % n_on + 1), samples, -1), axis=0)
    return tl.where(k < n_on * n_blocks, sample, -1), r, k // n_on


@triton.jit
def _sum_directions_kernel(y_ptr, gate_ptr, len_ptr, out_ptr, n, seqlen, dim, sy_r, sg_b, sg_r,
                           HAS_GATE: tl.constexpr, HAS_LEN: tl.constexpr, CHANNELS_LAST: tl.constexpr,
                           BLOCK: tl.constexpr):
    """out[b] = y[0, b] + y[1, b] over a sample's n = d * L elements (buffers in the same dense layout),
    skipping a direction whose gate is 0 for the sample: its program wrote nothing there; HAS_LEN: zeros at the
    sample's positions from len_ptr[b] on, where the walks wrote nothing (CHANNELS_LAST: the layout (L, d), else
    (d, L))."""
    pid_b = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_range = offs < n
    live = in_range
    if HAS_LEN:
        length = tl.minimum(tl.maximum(tl.load(len_ptr + pid_b).to(tl.int32), 0), seqlen)
        if CHANNELS_LAST:
            live = in_range & (offs < length * dim)
        else:
            live = in_range & (offs % seqlen < length)
    mask0 = live
    mask1 = live
    if HAS_GATE:  # (scalars broadcast before the &: the interpreter cannot & a scalar with a vector)
        zeros = tl.zeros((BLOCK,), tl.float32)
        mask0 = live & ((tl.load(gate_ptr + pid_b * sg_b).to(tl.float32) + zeros) != 0.0)
        mask1 = live & ((tl.load(gate_ptr + pid_b * sg_b + sg_r).to(tl.float32) + zeros) != 0.0)
    y0 = tl.load(y_ptr + pid_b * n + offs, mask=mask0, other=0.0).to(tl.float32)
    y1 = tl.load(y_ptr + sy_r + pid_b * n + offs, mask=mask1, other=0.0).to(tl.float32)
    tl.store(out_ptr + pid_b * n + offs, (y0 + y1).to(out_ptr.dtype.element_ty), mask=in_range)


@triton.jit
def _state_vector(ptr, off, offs_n, s_n, mask_n, EVEN_N: tl.constexpr, ALIGN: tl.constexpr):
    """A step's (d_state,) vector of B or C, in its own dtype. Its offset is off * ALIGN elements: the launcher
    passes B's and C's strides (but the states') in units of ALIGN elements, so that Triton knows each step's
    vector starts 16 bytes aligned and loads it in wide pieces (a tl.multiple_of hint on the offset did not
    survive its passes)."""
    if EVEN_N:
        return tl.load(ptr + off * ALIGN + offs_n * s_n)
    return tl.load(ptr + off * ALIGN + offs_n * s_n, mask=mask_n, other=0.0)


@triton.jit
def _channel_vector(base, off, mask_d, EVEN_D: tl.constexpr):
    """A step's (BLOCK_D,) per-channel vector (u, dt, dout, z...) in its own dtype."""
    if EVEN_D:
        return tl.load(base + off)
    return tl.load(base + off, mask=mask_d, other=0.0)


@triton.jit
def _channel_store(ptr, value, mask_d, EVEN_D: tl.constexpr):
    """A step's per-channel vector stored in ptr's dtype (unmasked where the channel block is full)."""
    if EVEN_D:
        tl.store(ptr, value.to(ptr.dtype.element_ty))
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def _step_state(h, A, u, dt_raw, Bt, bias, SOFTPLUS: tl.constexpr):
    """The state after a step from the one before: exp(dt A) h + dt u B, dt = softplus(dt_raw + bias)."""
    dt = dt_raw.to(tl.float32) + bias
    if SOFTPLUS:
        dt = _softplus(dt)
    return tl.exp2((dt * 1.4426950408889634)[None, :] * A) * h + (dt * u.to(tl.float32))[None, :] * \
        Bt.to(tl.float32)[:, None]


@triton.jit
def _recompute_loads(u_base, dt_base, B_ptr, B_off, offs_n, s, s_last, seqlen, su_t, sdt_t, sB_n, sB_t, mask_d,
                     mask_n, r: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, BC_ALIGN: tl.constexpr):
    """u, dt (before bias), B of step s for the backward's walks, in their own dtypes. A step past s_last (a
    prefetch beyond the walk's end) reads s_last again: its values are never used, and no mask is needed."""
    t = _walk_time(tl.minimum(s, s_last), seqlen, r)
    u = _channel_vector(u_base, t * su_t, mask_d, EVEN_D)
    dt = _channel_vector(dt_base, t * sdt_t, mask_d, EVEN_D)
    Bt = _state_vector(B_ptr, B_off + t * sB_t, offs_n, sB_n, mask_n, EVEN_N, BC_ALIGN)
    return u, dt, Bt


@triton.jit
def _advance(h, A, bias, u_base, dt_base, B_ptr, B_off, offs_n, s_from, s_to, seqlen, su_t, sdt_t, sB_n, sB_t, mask_d,
             mask_n, r: tl.constexpr, SOFTPLUS: tl.constexpr, PREFETCH: tl.constexpr, EVEN_D: tl.constexpr,
             EVEN_N: tl.constexpr, BC_ALIGN: tl.constexpr):
    """The state entering step s_to from the one entering s_from, storing nothing."""
    s_last = tl.maximum(s_to - 1, 0)
    if PREFETCH:
        nxt = _recompute_loads(u_base, dt_base, B_ptr, B_off, offs_n, s_from, s_last, seqlen, su_t, sdt_t, sB_n, sB_t,
                               mask_d, mask_n, r, EVEN_D, EVEN_N, BC_ALIGN)
    for s in range(s_from, s_to):
        if PREFETCH:
            u, dt, Bt = nxt
            nxt = _recompute_loads(u_base, dt_base, B_ptr, B_off, offs_n, s + 1, s_last, seqlen, su_t, sdt_t, sB_n,
                                   sB_t, mask_d, mask_n, r, EVEN_D, EVEN_N, BC_ALIGN)
        else:
            u, dt, Bt = _recompute_loads(u_base, dt_base, B_ptr, B_off, offs_n, s, s_last, seqlen, su_t, sdt_t, sB_n,
                                         sB_t, mask_d, mask_n, r, EVEN_D, EVEN_N, BC_ALIGN)
        h = _step_state(h, A, u, dt, Bt, bias, SOFTPLUS)
    return h


@triton.jit
def _prefetch(addresses, L1: tl.constexpr):
    """Asks L2 (L1: L1) for the lines at `addresses` (int64 tensor): PTX prefetch, which no instruction waits on."""
    if L1:
        tl.inline_asm_elementwise("prefetch.global.L1 [$1];\nmov.b32 $0, 0;", "=r,l", [addresses], dtype=tl.int32,
                                  is_pure=False, pack=1)
    else:
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\nmov.b32 $0, 0;", "=r,l", [addresses], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def _prefetch_steps(u_blk, dt_blk, z_blk, B_ptr, B_off, C_ptr, C_off, s_from, s_to, seqlen, su_t, sdt_t, sz_t, sB_t,
                    sC_t, r, HAS_Z: tl.constexpr, BC_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, L1: tl.constexpr):
    """Prefetches (into L2, or L1) of the inputs of a walk's steps s_from .. s_to - 1 (direction r): each step's u,
    dt, z, B and C, a line each (a program's channels of a step are one 64- or 128-byte segment, a step's states one of
    32 or 64). *_blk: the program's first channel; B's and C's offsets in units of BC_ALIGN elements. Issued well ahead,
    they make the walks' first touches of their inputs, which wait on DRAM (the loads issued a step or a group
    ahead do not hide that), L2 hits."""
    HALF: tl.constexpr = BLOCK_D // 2
    lane = tl.arange(0, BLOCK_D)
    first = lane < HALF
    for k0 in range(s_from, s_to, HALF):
        t = _walk_time(tl.minimum(k0 + lane % HALF, s_to - 1), seqlen, r).to(tl.int64)
        _prefetch(tl.where(first, (u_blk + t * su_t).to(tl.int64), (dt_blk + t * sdt_t).to(tl.int64)), L1)
        _prefetch(tl.where(first, (B_ptr + (B_off + t * sB_t) * BC_ALIGN).to(tl.int64),
                              (C_ptr + (C_off + t * sC_t) * BC_ALIGN).to(tl.int64)), L1)
        if HAS_Z:
            _prefetch((z_blk + t * sz_t).to(tl.int64), L1)


@triton.jit
def _prefetch_rows(blk, s_from, s_to, seqlen, s_t, r, BLOCK_D: tl.constexpr, L1: tl.constexpr):
    """Prefetches of one more per-channel input of steps s_from .. s_to - 1 (see _prefetch_steps)."""
    lane = tl.arange(0, BLOCK_D)
    for k0 in range(s_from, s_to, BLOCK_D):
        t = _walk_time(tl.minimum(k0 + lane, s_to - 1), seqlen, r).to(tl.int64)
        _prefetch((blk + t * s_t).to(tl.int64), L1)


def _shared_tile_asm(load: bool) -> str:
    """PTX storing (load: loading) a lane's 16 fp32 states at shared byte address $16 (per lane: the tile's 16 inputs
    all carry it) as four 16-byte vectors, vector k of every lane 512 bytes after vector k - 1 (layout (4, 32 lanes,
    4)): each instruction covers 512 contiguous bytes, no bank conflicts. Store: the values are $32..$47 and the 16
    results dead registers (an inline-asm op must have one, ptxas drops them)."""
    lines = []
    for k in range(4):
        regs = ", ".join(f"${(0 if load else 32) + 4 * k + j}" for j in range(4))
        lines.append(f"ld.shared.v4.f32 {{{regs}}}, [$16+{512 * k}];" if load else
                     f"st.shared.v4.f32 [$16+{512 * k}], {{{regs}}};")
    if not load:
        lines += [f"mov.b32 ${j}, 0;" for j in range(16)]
    return "\n".join(lines)


SHARED_TILE_STORE_ASM = tl.constexpr(_shared_tile_asm(False))
SHARED_TILE_LOAD_ASM = tl.constexpr(_shared_tile_asm(True))


@triton.jit
def _state_slot_store(slots, k, h, offs_tile, SMEM: tl.constexpr, SCRATCH_EVICT: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_N, BLOCK_D) state tile h into the scratch's state slot k: global memory (slots a pointer, the tile
    in its (n, d) order) or SMEM (slots the shared scratch's byte address; _shared_tile_asm's layout, 16 states)."""
    if SMEM:
        lane = slots + k * (BLOCK_N * BLOCK_D * 4) + tl.arange(0, BLOCK_D) * 16
        tl.inline_asm_elementwise(SHARED_TILE_STORE_ASM, "=r," * 16 + "r," * 16 + "f," * 15 + "f",
                                  [tl.broadcast_to(lane[None, :], (BLOCK_N, BLOCK_D)), h], dtype=tl.int32,
                                  is_pure=False, pack=16)
    else:
        tl.store(slots + k * (BLOCK_N * BLOCK_D) + offs_tile, h, eviction_policy=SCRATCH_EVICT)


@triton.jit
def _state_slot_load(slots, k, offs_tile, SMEM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The state tile that _state_slot_store put into slot k."""
    if SMEM:
        lane = slots + k * (BLOCK_N * BLOCK_D * 4) + tl.arange(0, BLOCK_D) * 16
        return tl.inline_asm_elementwise(SHARED_TILE_LOAD_ASM, "=f," * 16 + "r," * 15 + "r",
                                         [tl.broadcast_to(lane[None, :], (BLOCK_N, BLOCK_D))], dtype=tl.float32,
                                         is_pure=False, pack=16)
    else:
        return tl.load(slots + k * (BLOCK_N * BLOCK_D) + offs_tile)


@triton.jit
def _dy_slot_store(dy_slots, k, dy, SMEM: tl.constexpr, SCRATCH_EVICT: tl.constexpr, BLOCK_D: tl.constexpr):
    """The (BLOCK_D,) row dy into the scratch's dy slot k (dy_slots: the slot 0 of each lane, pointers or SMEM's
    byte addresses)."""
    if SMEM:
        tl.inline_asm_elementwise("st.shared.f32 [$1], $2;\nmov.b32 $0, 0;", "=r,r,f",
                                  [dy_slots + k * (BLOCK_D * 4), dy], dtype=tl.int32, is_pure=False, pack=1)
    else:
        tl.store(dy_slots + k * BLOCK_D, dy, eviction_policy=SCRATCH_EVICT)


@triton.jit
def _dy_slot_load(dy_slots, k, SMEM: tl.constexpr, BLOCK_D: tl.constexpr):
    """The row that _dy_slot_store put into dy slot k."""
    if SMEM:
        return tl.inline_asm_elementwise("ld.shared.f32 $0, [$1];", "=f,r", [dy_slots + k * (BLOCK_D * 4)],
                                         dtype=tl.float32, is_pure=False, pack=1)
    else:
        return tl.load(dy_slots + k * BLOCK_D)


@triton.jit
def _piece_loads(u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n, do_base, z_base, dz_base, s, s_last, seqlen,
                 su_t, sdt_t, sB_n, sB_t, sC_n, sC_t, sdo_t, sz_t, sdz_t, mask_d, mask_n, r: tl.constexpr,
                 HAS_Z: tl.constexpr, EVEN_D: tl.constexpr, EVEN_N: tl.constexpr, BC_ALIGN: tl.constexpr):
    """What step s of a piece's forward walk reads: _recompute_loads's u, dt (before bias) and B, then C, dout, z
    and direction 0's dz (direction 1), in their own dtypes (z, dz: zeros without z)."""
    u, dt, Bt = _recompute_loads(u_base, dt_base, B_ptr, B_off, offs_n, s, s_last, seqlen, su_t, sdt_t, sB_n, sB_t,
                                 mask_d, mask_n, r, EVEN_D, EVEN_N, BC_ALIGN)
    t = _walk_time(tl.minimum(s, s_last), seqlen, r)
    Ct = _state_vector(C_ptr, C_off + t * sC_t, offs_n, sC_n, mask_n, EVEN_N, BC_ALIGN)
    dout = _channel_vector(do_base, t * sdo_t, mask_d, EVEN_D)
    z = tl.zeros(u.shape, tl.float32)
    dzp = tl.zeros(u.shape, tl.float32)
    if HAS_Z:
        z = _channel_vector(z_base, t * sz_t, mask_d, EVEN_D)
        if r > 0:
            dzp = _channel_vector(dz_base, t * sdz_t, mask_d, EVEN_D)
    return u, dt, Bt, Ct, dout, z, dzp


@triton.jit
def _piece_forward(h, A, Dv, bias, g_scale, walk_slots, dy_slots, offs_tile, u_base, dt_base, B_ptr, B_off, C_ptr,
                   C_off, offs_n, do_base, z_base, dz_base, s0, s1, seqlen, su_t, sdt_t, sB_n, sB_t, sC_n,
                   sC_t, sdo_t, sz_t, sdz_t, mask_d, mask_n, dgate_acc, dD_acc, r: tl.constexpr, HAS_Z: tl.constexpr,
                   SOFTPLUS: tl.constexpr, PREFETCH: tl.constexpr, SCRATCH_EVICT: tl.constexpr, EVEN_D: tl.constexpr,
                   EVEN_N: tl.constexpr, BC_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SMEM: tl.constexpr):
    """The forward walk of the piece s0 .. s1 from h, the state entering s0: into slot k of the scratch the state
    entering step s0 + k (and into slot s1 - s0 the state after the last step), into the dy slots dy of each
    step; out: dz of every step; returns dgate_acc and dD_acc."""
    s_last = s1 - 1
    if PREFETCH:
        nxt = _piece_loads(u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n, do_base, z_base, dz_base, s0, s_last,
                           seqlen, su_t, sdt_t, sB_n, sB_t, sC_n, sC_t, sdo_t, sz_t, sdz_t, mask_d, mask_n, r, HAS_Z,
                           EVEN_D, EVEN_N, BC_ALIGN)
    for s in range(s0, s1):
        t = _walk_time(s, seqlen, r)
        if PREFETCH:
            u, dt, Bt, Ct, dout, z, dzp = nxt
            nxt = _piece_loads(u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n, do_base, z_base, dz_base, s + 1,
                               s_last, seqlen, su_t, sdt_t, sB_n, sB_t, sC_n, sC_t, sdo_t, sz_t, sdz_t, mask_d, mask_n,
                               r, HAS_Z, EVEN_D, EVEN_N, BC_ALIGN)
        else:
            u, dt, Bt, Ct, dout, z, dzp = _piece_loads(
                u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n, do_base, z_base, dz_base, s, s_last, seqlen, su_t,
                sdt_t, sB_n, sB_t, sC_n, sC_t, sdo_t, sz_t, sdz_t, mask_d, mask_n, r, HAS_Z, EVEN_D, EVEN_N, BC_ALIGN)
        _state_slot_store(walk_slots, s - s0, h, offs_tile, SMEM, SCRATCH_EVICT, BLOCK_D, BLOCK_N)
        h = _step_state(h, A, u, dt, Bt, bias, SOFTPLUS)
        u = u.to(tl.float32)
        dout = dout.to(tl.float32)
        y = tl.sum(h * Ct.to(tl.float32)[:, None], axis=0) + Dv * u
        if HAS_Z:
            z = z.to(tl.float32)
            sig = tl.sigmoid(z)
            silu = z * sig
            dgate_acc += dout * y * silu
            dyz = dout * g_scale
            dz = dyz * y * sig * (1.0 + z * (1.0 - sig)) + dzp.to(tl.float32)
            _channel_store(dz_base + t * sdz_t, dz, mask_d, EVEN_D)
            dy = dyz * silu
        else:
            dgate_acc += dout * y
            dy = dout * g_scale
        _dy_slot_store(dy_slots, s - s0, dy, SMEM, SCRATCH_EVICT, BLOCK_D)
        dD_acc += dy * u
    _state_slot_store(walk_slots, s1 - s0, h, offs_tile, SMEM, SCRATCH_EVICT, BLOCK_D, BLOCK_N)
    return dgate_acc, dD_acc


@triton.jit
def _piece_sums(slots, dy_slots, part_base, s0, s1, seqlen, r: tl.constexpr, FIRST: tl.constexpr,
                WITH_DY: tl.constexpr, SUB_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                SUM_T: tl.constexpr):
    """The sums over the program's channels of the scratch's slots FIRST + k (times dy of step s0 + k: WITH_DY),
    for the piece's steps s0 + k < s1, into the partial sums' rows of those steps' times (part_base + t * BLOCK_N).
    Summed after the walk, SUM_T steps at a time, rather than at every step: a step's sum over channels, which
    lie on the warp's lanes during the walk, would be 5 rounds of shuffles for each of 16 values; here most of it
    is in-thread (the scratch is read back in the layout Triton picks for these sums)."""
    offs_k = tl.arange(0, SUM_T)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_D)
    for k0 in range(0, s1 - s0, SUM_T):
        ks = tl.minimum(k0 + offs_k, s1 - s0 - 1)  # (steps past the piece's end: its last again, not stored)
        tiles = tl.load(slots + ((ks[:, None, None] + FIRST) * BLOCK_N + offs_n[None, :, None]) * BLOCK_D
                        + offs_c[None, None, :])
        if WITH_DY:
            tiles = tiles * tl.load(dy_slots + ks[:, None] * BLOCK_D + offs_c[None, :])[:, None, :]
        t = _walk_time(s0 + ks, seqlen, r)
        tl.store(part_base + t[:, None] * BLOCK_N + offs_n[None, :], tl.sum(tiles, axis=2),
                 mask=(k0 + offs_k < s1 - s0)[:, None])


def _reduce_scatter_asm() -> str:
    """PTX summing a warp's (16 states x 32 lanes) tile over its lanes, each lane holding one channel's 16 states
    in $16..$31: four rounds of butterfly shuffles, each sending half of the values still held to the partner
    lane and adding the other half received, then one round of a single value (16 + 8 + 4 + 2 + 1 values
    exchanged, where summing each state over the lanes would take 5 rounds of 16). Lane l ends with the sum of
    state l >> 1, written to all of $0..$15."""
    lines = ["{", ".reg .pred q<4>;", ".reg .b32 lane, bit;", ".reg .f32 v<16>, snd, got;",
             "mov.u32 lane, %laneid;"]
    for k, mask in enumerate((16, 8, 4, 2)):
        lines += [f"and.b32 bit, lane, {mask};", f"setp.ne.u32 q{k}, bit, 0;"]
    lines += [f"mov.f32 v{j}, ${16 + j};" for j in range(16)]
    held = 16
    for k, mask in enumerate((16, 8, 4, 2)):
        held //= 2
        for j in range(held):  # a lane with the bit set keeps the upper half, its partner the lower
            lines += [f"selp.f32 snd, v{j}, v{j + held}, q{k};", f"selp.f32 v{j}, v{j + held}, v{j}, q{k};",
                      f"shfl.sync.bfly.b32 got, snd, {mask}, 31, -1;", f"add.f32 v{j}, v{j}, got;"]
    lines += ["shfl.sync.bfly.b32 got, v0, 1, 31, -1;", "add.f32 v0, v0, got;"]
    lines += [f"mov.f32 ${j}, v0;" for j in range(16)] + ["}"]
    return "\n".join(lines)


REDUCE_SCATTER_ASM = tl.constexpr(_reduce_scatter_asm())


@triton.jit
def _first(a, b):
    """A reduction's combine that keeps one of equal values: REDUCE_SCATTER_ASM writes its sum to all 16 of a lane's
    outputs, so taking one needs no arithmetic."""
    return a


@triton.jit
def _store_lane_sums(tile, row_ptr, ok, REDUCE_ASM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_N,) sums over the channels (the lanes) of a walk's (BLOCK_N, BLOCK_D) tile into row_ptr[0:BLOCK_N]
    where ok. REDUCE_ASM (16 states, a warp of 32 lanes, compiled): REDUCE_SCATTER_ASM, and the even lanes store
    their state's sum; else Triton's sum over the lanes (the interpreter, which runs no PTX)."""
    if REDUCE_ASM:
        sums = tl.inline_asm_elementwise(REDUCE_SCATTER_ASM, "=f," * 16 + "f," * 15 + "f", [tile],
                                         dtype=tl.float32, is_pure=True, pack=16)
        lane = tl.arange(0, BLOCK_D)
        tl.store(row_ptr + lane // 2, tl.reduce(sums, 0, _first), mask=ok & (lane % 2 == 0))
    else:
        tl.store(row_ptr + tl.arange(0, BLOCK_N), tl.sum(tile, axis=1), mask=ok)


@triton.jit
def _adjoint_loads(walk_slots, dy_slots, offs_tile, u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n, s, s0,
                   seqlen, su_t, sdt_t, sB_n, sB_t, sC_n, sC_t, mask_d, mask_n, r: tl.constexpr, EVEN_D: tl.constexpr,
                   EVEN_N: tl.constexpr, BC_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                   SMEM: tl.constexpr):
    """What step s of a piece's adjoint walk reads: the state entering the step and its dy (from the scratch),
    u, dt (before bias), B and C in their own dtypes. A step before s0 (the prefetch past the walk's end) reads
    s0 again: its values are never used, and no mask is needed."""
    s = tl.maximum(s, s0)
    t = _walk_time(s, seqlen, r)
    h_prev = _state_slot_load(walk_slots, s - s0, offs_tile, SMEM, BLOCK_D, BLOCK_N)
    dy = _dy_slot_load(dy_slots, s - s0, SMEM, BLOCK_D)
    u = _channel_vector(u_base, t * su_t, mask_d, EVEN_D)
    dt = _channel_vector(dt_base, t * sdt_t, mask_d, EVEN_D)
    Bt = _state_vector(B_ptr, B_off + t * sB_t, offs_n, sB_n, mask_n, EVEN_N, BC_ALIGN)
    Ct = _state_vector(C_ptr, C_off + t * sC_t, offs_n, sC_n, mask_n, EVEN_N, BC_ALIGN)
    return h_prev, dy, u, dt, Bt, Ct


@triton.jit
def _prefetch_chunk(u_blk, dt_blk, do_blk, z_blk, dz_blk, B_ptr, B_off, C_ptr, C_off, ckpt_rows, s_from, s_to,
                    walk_len, su_t, sdt_t, sdo_t, sz_t, sdz_t, sB_t, sC_t, r: tl.constexpr, HAS_Z: tl.constexpr,
                    BC_ALIGN: tl.constexpr, BLOCK_D: tl.constexpr, L1: tl.constexpr):
    """The backward's prefetches of what its walks over the chunk of steps s_from .. s_to - 1 read first: the
    chunk's checkpoint (ckpt_rows: its rows' addresses), the steps' inputs (_prefetch_steps), dout and, in direction
    1, direction 0's dz. Into L2 a chunk ahead, into L1 (L1) as the chunk starts."""
    _prefetch(ckpt_rows.to(tl.int64), L1)
    _prefetch_steps(u_blk, dt_blk, z_blk, B_ptr, B_off, C_ptr, C_off, s_from, s_to, walk_len, su_t, sdt_t, sz_t, sB_t,
                    sC_t, r, HAS_Z, BC_ALIGN, BLOCK_D, L1)
    _prefetch_rows(do_blk, s_from, s_to, walk_len, sdo_t, r, BLOCK_D, L1)
    if HAS_Z and r > 0:
        _prefetch_rows(dz_blk, s_from, s_to, walk_len, sdz_t, r, BLOCK_D, L1)


@triton.jit(do_not_specialize=["skew"])
def _scan_bwd_kernel(
    u_ptr, dt_ptr, z_ptr, B_ptr, C_ptr, A_ptr, D_ptr, bias_ptr, gate_ptr, dout_ptr,
    du_ptr, ddt_ptr, dz_ptr, dB_ptr, dC_ptr, dA_ptr, dD_ptr, dbias_ptr, dgate_ptr, dlast_ptr,
    ckpt_ptr, scratch_ptr, len_ptr, order_ptr,
    dim, seqlen, d_state, dpg_B, dpg_C, n_dblocks,
    su_r, su_b, su_d, su_t,
    sdt_r, sdt_b, sdt_d, sdt_t,
    sz_b, sz_d, sz_t,
    sB_r, sB_b, sB_g, sB_n, sB_t,
    sC_r, sC_b, sC_g, sC_n, sC_t,
    sdo_b, sdo_d, sdo_t,
    sg_b, sg_r,
    sdu_r, sdu_b, sdu_d, sdu_t,
    sdz_b, sdz_d, sdz_t,
    scale, skew,
    N_DIRS: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_DLAST: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, CHUNK_T: tl.constexpr, SUB_T: tl.constexpr,
    PREFETCH: tl.constexpr, SCRATCH_EVICT: tl.constexpr, HAS_LEN: tl.constexpr, EVEN_D: tl.constexpr,
    EVEN_N: tl.constexpr, BC_ALIGN: tl.constexpr, SUM_T: tl.constexpr, LANE_SUMS: tl.constexpr,
    REDUCE_ASM: tl.constexpr, SMEM_SCRATCH: tl.constexpr, SCRATCH_DECL: tl.constexpr, L2_PREFETCH: tl.constexpr,
    L1_PREFETCH: tl.constexpr, ZERO_BC_TAIL: tl.constexpr,
):
    """Outputs: du, ddt (r, b, d, t) and dz (b, d, t, summed over directions) in the dtypes of u, delta and z
    (no separate cast afterwards), channel-contiguous; fp32 partial sums dB, dC (r, n_dblocks, b, t, n);
    dA (r, b, d, n); dD, dbias (r, b, d);
    dgate (b, r, n_dblocks). ckpt (r, b, n_chunks, n, d): the state entering each CHUNK_T-step chunk of the
    walk, as the forward kernel stored it. A comes as (r, n, d).

    Tiles are (d_state, channels), a channel per lane and all its states in that thread (BLOCK_D = 32, one
    warp): the sums over states are in-thread and the per-channel vectors need no layout conversion. Triton picks
    that layout from the accesses of the checkpoints, A and the global scratch, whose addresses it cannot prove
    aligned (`skew`, a run-time 0 that is not specialised): it then gives each lane one element of a row.
    SMEM_SCRATCH: the walks' scratch is a static shared array that SCRATCH_DECL declares (the same slots; state
    tiles in _shared_tile_asm's layout), which only the lane that wrote an element reads back: no barriers. The
    sums over channels (dB, dC):
    LANE_SUMS, in the adjoint walk (dC of step t - 1 from the state it reads for step t) across the lanes,
    REDUCE_ASM by the warp reduce-scatter of REDUCE_SCATTER_ASM (else Triton's sum: the interpreter); otherwise
    once per piece from the scratch (_piece_sums).

    EVEN_D / EVEN_N: dim is a multiple of BLOCK_D / d_state is BLOCK_N (no masks). BC_ALIGN: B's and C's strides
    but the states' come in units of that many elements (_state_vector).
    HAS_LEN: sample b's sequence is its first len_ptr[b] positions (_sample_length): the walks cover those, and
    the per-position gradients after them (du, ddt, dB, dC, dz) are zeros; the partial sums of dB and dC there are
    written only with ZERO_BC_TAIL (torch sums them; _sum_bc_partials_kernel reads none past the end). The
    programs then run the samples longest first, all of a sample's channel blocks together (order_ptr: the samples
    by length, descending): in the grid's order the last wave's long walks ran on after the short ones were done,
    9% to 15% of the kernel's time at DyVM-S's kept lengths
    (benchmarks/results/train_longest_first_h200_2026-11-29.txt)."""
    batch = tl.num_programs(0)
    if HAS_LEN:
        pid_b, pid_d = _longest_first_program(order_ptr, n_dblocks)
    else:
        pid_b = tl.program_id(0).to(tl.int64)
        pid_d = tl.program_id(1)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_tile = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :]  # the scratch's (n, d) tile
    mask_d = offs_d < dim
    mask_n = offs_n < d_state
    mask_nd = mask_n[:, None] & mask_d[None, :]
    group_B = (pid_d * BLOCK_D) // dpg_B
    group_C = (pid_d * BLOCK_D) // dpg_C
    n_chunks = tl.cdiv(seqlen, CHUNK_T)  # (the checkpoints' layout: the full length)
    walk_len = _sample_length(len_ptr, pid_b, seqlen, HAS_LEN)
    walk_chunks = tl.cdiv(walk_len, CHUNK_T)
    # The program's scratch: SUB_T + 1 state slots (n, d), then SUB_T dy slots (d,).
    if SMEM_SCRATCH:  # in shared memory (byte addresses)
        walk_slots = tl.inline_asm_elementwise(SCRATCH_DECL, "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        dy_walk = walk_slots + ((SUB_T + 1) * BLOCK_N * BLOCK_D + tl.arange(0, BLOCK_D)) * 4
    else:  # in global memory, this program's part of scratch_ptr
        slots = scratch_ptr + (pid_b * n_dblocks + pid_d) * ((SUB_T + 1) * BLOCK_N + SUB_T) * BLOCK_D
        walk_slots = slots + skew  # (the same memory, for the walks: see the layout above)
        dy_slots = slots + (SUB_T + 1) * BLOCK_N * BLOCK_D
        dy_walk = dy_slots + skew + tl.arange(0, BLOCK_D)
    dz_base = dz_ptr + pid_b * sdz_b + offs_d * sdz_d
    for r in tl.static_range(N_DIRS):
        g_scale = scale
        if HAS_GATE:
            gate = tl.load(gate_ptr + pid_b * sg_b + r * sg_r).to(tl.float32)
            g_scale = gate * scale
        A = tl.load(A_ptr + skew + r * dim * d_state + offs_n[:, None] * dim + offs_d[None, :],
                    mask=mask_nd, other=0.0).to(tl.float32)
        Dv = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if HAS_D:
            Dv = tl.load(D_ptr + r * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        bias = tl.zeros((BLOCK_D,), dtype=tl.float32)
        if HAS_BIAS:
            bias = tl.load(bias_ptr + r * dim + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        u_base = u_ptr + r * su_r + pid_b * su_b + offs_d * su_d
        dt_base = dt_ptr + r * sdt_r + pid_b * sdt_b + offs_d * sdt_d
        B_off = r * sB_r + pid_b * sB_b + group_B * sB_g
        C_off = r * sC_r + pid_b * sC_b + group_C * sC_g
        z_base = z_ptr + pid_b * sz_b + offs_d * sz_d
        do_base = dout_ptr + pid_b * sdo_b + offs_d * sdo_d
        dud_base = r * sdu_r + pid_b * sdu_b + offs_d * sdu_d  # du / ddt
        part_base = ((r * n_dblocks + pid_d) * batch + pid_b) * seqlen * BLOCK_N  # + t * BLOCK_N + n
        ckpt_base = ckpt_ptr + skew + (r * batch + pid_b) * n_chunks * d_state * dim + offs_n[:, None] * dim \
            + offs_d[None, :]
        if L2_PREFETCH:  # the program's first channel of each input, and its checkpoint rows of chunk 0; the first
            # chunk the walks take asked of L2 now (with L1_PREFETCH asked of L1 again as the chunk loop starts: left
            # so, as measured; without this call the offline build takes 227 registers instead of 220)
            first_d = pid_d * BLOCK_D
            u_blk = u_ptr + r * su_r + pid_b * su_b + first_d * su_d
            dt_blk = dt_ptr + r * sdt_r + pid_b * sdt_b + first_d * sdt_d
            do_blk = dout_ptr + pid_b * sdo_b + first_d * sdo_d
            z_blk = z_ptr + pid_b * sz_b + first_d * sz_d
            dz_blk = dz_ptr + pid_b * sdz_b + first_d * sdz_d
            ckpt_rows = ckpt_ptr + (r * batch + pid_b) * n_chunks * d_state * dim + \
                (tl.arange(0, BLOCK_D) % BLOCK_N) * dim + first_d
            c_last = tl.maximum(walk_chunks - 1, 0)
            _prefetch_chunk(u_blk, dt_blk, do_blk, z_blk, dz_blk, B_ptr, B_off, C_ptr, C_off,
                            ckpt_rows + c_last * d_state * dim, c_last * CHUNK_T, walk_len, walk_len, su_t, sdt_t,
                            sdo_t, sz_t, sdz_t, sB_t, sC_t, r, HAS_Z, BC_ALIGN, BLOCK_D, False)
        g = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)  # a_{t+1} * adjoint_{t+1}
        if HAS_DLAST:
            g = tl.load(dlast_ptr + ((r * batch + pid_b) * dim + offs_d[None, :]) * d_state + offs_n[:, None],
                        mask=mask_nd, other=0.0).to(tl.float32)
        dA_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dbias_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        dgate_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        # Chunks from last to first, and within a chunk its SUB_T-step pieces from last to first. Each piece in
        # two walks. Forward: advance the chunk's checkpoint to the piece's first step (no stores), then walk the
        # piece, storing the state entering each step into the scratch and doing everything that needs the
        # state but not the adjoint (y, dz, dgate, dD) and dy, kept in the scratch too. Backward: the adjoint
        # walk, which then needs only the state before each step and dy; dB from its g * dt * u and dC from the
        # states it reads (LANE_SUMS; else _piece_sums from the scratch). Splitting the work this way shortens the
        # backward walk's chain per step, the part that carries the recurrence of the adjoint. SUB_T < CHUNK_T
        # keeps the scratch that all resident programs hold small enough for shared memory (or L2).
        for ci in range(walk_chunks):
            c = walk_chunks - 1 - ci
            cs = c * CHUNK_T
            ce = tl.minimum(cs + CHUNK_T, walk_len)
            if L1_PREFETCH:  # this chunk's inputs, from L2 into L1
                _prefetch_chunk(u_blk, dt_blk, do_blk, z_blk, dz_blk, B_ptr, B_off, C_ptr, C_off,
                                ckpt_rows + c * d_state * dim, cs, ce, walk_len, su_t, sdt_t, sdo_t,
                                sz_t, sdz_t, sB_t, sC_t, r, HAS_Z, BC_ALIGN, BLOCK_D, True)
            if L2_PREFETCH and c > 0:  # the next chunk's inputs, while this one's walks run
                _prefetch_chunk(u_blk, dt_blk, do_blk, z_blk, dz_blk, B_ptr, B_off, C_ptr, C_off,
                                ckpt_rows + (c - 1) * d_state * dim, cs - CHUNK_T, cs, walk_len, su_t, sdt_t, sdo_t,
                                sz_t, sdz_t, sB_t, sC_t, r, HAS_Z, BC_ALIGN, BLOCK_D, False)
            n_sub = tl.cdiv(ce - cs, SUB_T)
            for pi in range(n_sub):
                s0 = cs + (n_sub - 1 - pi) * SUB_T
                s1 = tl.minimum(s0 + SUB_T, ce)
                tl.debug_barrier()  # the scratch is reused: earlier reads must be done
                if EVEN_D and EVEN_N:
                    h = tl.load(ckpt_base + c * d_state * dim)
                else:
                    h = tl.load(ckpt_base + c * d_state * dim, mask=mask_nd, other=0.0)
                h = _advance(h, A, bias, u_base, dt_base, B_ptr, B_off, offs_n, cs, s0, walk_len, su_t, sdt_t, sB_n,
                             sB_t, mask_d, mask_n, r, SOFTPLUS, PREFETCH, EVEN_D, EVEN_N, BC_ALIGN)
                dgate_acc, dD_acc = _piece_forward(
                    h, A, Dv, bias, g_scale, walk_slots, dy_walk, offs_tile, u_base, dt_base, B_ptr, B_off, C_ptr,
                    C_off, offs_n, do_base, z_base, dz_base, s0, s1, walk_len, su_t, sdt_t, sB_n, sB_t, sC_n,
                    sC_t, sdo_t, sz_t, sdz_t, mask_d, mask_n, dgate_acc, dD_acc, r, HAS_Z, SOFTPLUS, PREFETCH,
                    SCRATCH_EVICT, EVEN_D, EVEN_N, BC_ALIGN, BLOCK_D, BLOCK_N, SMEM_SCRATCH)
                tl.debug_barrier()
                if LANE_SUMS:  # dC of the piece's last step (the others' in the adjoint walk)
                    h_last = _state_slot_load(walk_slots, s1 - s0, offs_tile, SMEM_SCRATCH, BLOCK_D, BLOCK_N)
                    dy_last = _dy_slot_load(dy_walk, s1 - 1 - s0, SMEM_SCRATCH, BLOCK_D)
                    _store_lane_sums(h_last * dy_last[None, :],
                                     dC_ptr + part_base + _walk_time(s1 - 1, walk_len, r) * BLOCK_N, True,
                                     REDUCE_ASM, BLOCK_D, BLOCK_N)
                else:
                    _piece_sums(slots, dy_slots, dC_ptr + part_base, s0, s1, walk_len, r, 1, True, SUB_T, BLOCK_D,
                                BLOCK_N, SUM_T)
                    tl.debug_barrier()  # (the adjoint walk overwrites the slots)
                if PREFETCH:
                    nh, ndy, nu, ndt, nB, nC = _adjoint_loads(
                        walk_slots, dy_walk, offs_tile, u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n, s1 - 1,
                        s0, walk_len, su_t, sdt_t, sB_n, sB_t, sC_n, sC_t, mask_d, mask_n, r, EVEN_D, EVEN_N,
                        BC_ALIGN, BLOCK_D, BLOCK_N, SMEM_SCRATCH)
                for i in range(s1 - s0):
                    s = s1 - 1 - i
                    t = _walk_time(s, walk_len, r)
                    if PREFETCH:
                        h_prev, dy, u, dt_raw, Bt, Ct = nh, ndy, nu, ndt, nB, nC
                        nh, ndy, nu, ndt, nB, nC = _adjoint_loads(
                            walk_slots, dy_walk, offs_tile, u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n,
                            s - 1, s0, walk_len, su_t, sdt_t, sB_n, sB_t, sC_n, sC_t, mask_d, mask_n, r, EVEN_D,
                            EVEN_N, BC_ALIGN, BLOCK_D, BLOCK_N, SMEM_SCRATCH)
                    else:
                        h_prev, dy, u, dt_raw, Bt, Ct = _adjoint_loads(
                            walk_slots, dy_walk, offs_tile, u_base, dt_base, B_ptr, B_off, C_ptr, C_off, offs_n, s,
                            s0, walk_len, su_t, sdt_t, sB_n, sB_t, sC_n, sC_t, mask_d, mask_n, r, EVEN_D, EVEN_N,
                            BC_ALIGN, BLOCK_D, BLOCK_N, SMEM_SCRATCH)
                    if LANE_SUMS:  # dC of step s - 1: the state entering step s is the state after it
                        if PREFETCH:
                            dy_before = ndy
                        else:
                            dy_before = _dy_slot_load(dy_walk, tl.maximum(s - 1 - s0, 0), SMEM_SCRATCH, BLOCK_D)
                        _store_lane_sums(h_prev * dy_before[None, :],
                                         dC_ptr + part_base + _walk_time(s - 1, walk_len, r) * BLOCK_N, s > s0,
                                         REDUCE_ASM, BLOCK_D, BLOCK_N)
                    u = u.to(tl.float32)
                    dt_raw = dt_raw.to(tl.float32) + bias
                    dt = dt_raw
                    if SOFTPLUS:
                        dt = _softplus(dt_raw)
                    a = tl.exp2((dt * 1.4426950408889634)[None, :] * A)  # (no A * log2(e) tile: registers)
                    g += dy[None, :] * Ct.to(tl.float32)[:, None]
                    dBu = tl.sum(g * Bt.to(tl.float32)[:, None], axis=0)  # d (dt * u)
                    gah = g * a * h_prev
                    ddt = dBu * u + tl.sum(gah * A, axis=0)
                    dA_acc += gah * dt[None, :]
                    if LANE_SUMS:
                        _store_lane_sums(g * (dt * u)[None, :], dB_ptr + part_base + t * BLOCK_N, True, REDUCE_ASM,
                                         BLOCK_D, BLOCK_N)
                    else:  # (g * dt * u into the slot just read: _piece_sums makes dB of it)
                        tl.store(walk_slots + (s - s0) * BLOCK_D * BLOCK_N + offs_tile, g * (dt * u)[None, :],
                                 eviction_policy=SCRATCH_EVICT)
                    if SOFTPLUS:
                        ddt = ddt * tl.sigmoid(dt_raw)
                    dbias_acc += ddt
                    _channel_store(du_ptr + dud_base + t * sdu_t, dBu * dt + Dv * dy, mask_d, EVEN_D)
                    _channel_store(ddt_ptr + dud_base + t * sdu_t, ddt, mask_d, EVEN_D)
                    g = g * a
                if not LANE_SUMS:
                    tl.debug_barrier()
                    _piece_sums(slots, dy_slots, dB_ptr + part_base, s0, s1, walk_len, r, 0, False, SUB_T, BLOCK_D,
                                BLOCK_N, SUM_T)
        if HAS_LEN:  # past the sample's end: zero gradients (direction 1 leaves direction 0's dz there)
            zero_d = tl.zeros((BLOCK_D,), dtype=tl.float32)
            zero_n = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for t in range(walk_len, seqlen):
                tl.store(du_ptr + dud_base + t * sdu_t, zero_d.to(du_ptr.dtype.element_ty), mask=mask_d)
                tl.store(ddt_ptr + dud_base + t * sdu_t, zero_d.to(ddt_ptr.dtype.element_ty), mask=mask_d)
                if ZERO_BC_TAIL:  # (_sum_bc_partials_kernel reads no partial past the sample's end)
                    tl.store(dB_ptr + part_base + t * BLOCK_N + offs_n, zero_n)
                    tl.store(dC_ptr + part_base + t * BLOCK_N + offs_n, zero_n)
                if HAS_Z and r == 0:
                    tl.store(dz_base + t * sdz_t, zero_d.to(dz_ptr.dtype.element_ty), mask=mask_d)
        tl.store(dA_ptr + ((r * batch + pid_b) * dim + offs_d[None, :]) * d_state + offs_n[:, None], dA_acc,
                 mask=mask_nd)
        tl.store(dD_ptr + (r * batch + pid_b) * dim + offs_d, dD_acc, mask=mask_d)
        tl.store(dbias_ptr + (r * batch + pid_b) * dim + offs_d, dbias_acc, mask=mask_d)
        if HAS_GATE:
            tl.store(dgate_ptr + (pid_b * N_DIRS + r) * n_dblocks + pid_d, tl.sum(dgate_acc, axis=0) * scale)
        tl.debug_barrier()  # direction 1 accumulates into dz written by direction 0


def _block_d(dim: int, groups: tuple, preferred: int) -> int:
    """Channels per program: a power of two that keeps every block inside one group of B and of C."""
    block = min(preferred, next_pow2(dim))
    for g in groups:
        if g > 1:  # the block must divide the group size
            while (dim // g) % block:
                block //= 2
    return max(block, 1)


def _launch_options(num_warps: int, maxnreg: int) -> dict:
    """Triton's launch options: the warps, and a register cap only when one is set (0: none)."""
    return dict(num_warps=num_warps, maxnreg=maxnreg) if maxnreg else dict(num_warps=num_warps)


def _strides4(t: Tensor):
    return [t.stride(i) for i in range(t.dim())]


class _ForwardPlan(NamedTuple):
    """What a forward launch computes from shapes, strides and options alone (scan_forward keeps one per key)."""
    lanes_on_channels: bool
    split_out: Optional[tuple]  # the per-direction outputs' (shape, transposed), or None (no split)
    grid: tuple
    ints: tuple  # the kernel's integer arguments, after its tensors
    kwargs: dict  # constexprs and launch options
    sum_grid: tuple
    sum_ints: tuple


_forward_plans = {}  # eager inference is bound by the host: the same layer shapes come back on every forward


def _plan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, gate, scale, out, want_last, want_ckpt, has_len,
                  block_d, num_warps, unroll, lanes_on_channels, prefetch, split_dirs, maxnreg,
                  active_first) -> _ForwardPlan:
    R, batch, dim, seqlen = u.shape
    d_state, groups = A.shape[-1], (B.shape[2], C.shape[2])
    tuning = FWD_TUNING[_tuning_key(u)]
    block_d = _block_d(dim, groups, block_d or tuning["block_d"])
    num_warps = num_warps or tuning["num_warps"]
    unroll = unroll or tuning["unroll"]
    lanes_on_channels = tuning["lanes_on_channels"] if lanes_on_channels is None else lanes_on_channels
    prefetch = tuning["prefetch"] if prefetch is None else prefetch
    split_dirs = R == 2 and (tuning["split_dirs"] if split_dirs is None else split_dirs)
    ckpt_t = CKPT_CHUNK if want_ckpt else 0
    if maxnreg is None:
        maxnreg = tuning["ckpt_maxnreg"] if want_ckpt else 0
    launch_options = _launch_options(num_warps, maxnreg)
    if ckpt_t and ckpt_t % unroll:
        raise ValueError(f"the forward's unroll ({unroll}) must divide the checkpoint interval ({ckpt_t})")
    zs = _strides4(z) if z is not None else [0, 0, 0]
    gs = _strides4(gate) if gate is not None else [0, 0]
    time_contiguous = out.is_contiguous()
    # (the sum after the launch treats a sample's outputs as one dense block of d * L elements)
    split_dirs = split_dirs and (time_contiguous or out.transpose(1, 2).is_contiguous())
    split_out = None
    if split_dirs:  # one output per direction, in out's memory order
        split_out = ((R, *out.shape), False) if time_contiguous else ((R, batch, seqlen, dim), True)
        n = dim * seqlen
        out_strides = [n * batch, n, 1, dim] if split_out[1] else [n * batch, n, seqlen, 1]
    else:
        out_strides = [0] + _strides4(out)
    ints = (dim, seqlen, d_state, dim // groups[0], dim // groups[1], *_strides4(u), *_strides4(delta), *zs,
            *_strides4(B), *_strides4(C), *out_strides, *gs, float(scale))
    # the walks that run first (see _active_pair): where gates can skip walks and every walk is not run anyway
    # for the checkpoints
    active_first = (split_dirs and gate is not None and not want_ckpt and batch * R <= MAX_ACTIVE_PAIRS
                    and (active_first is None or active_first))
    kwargs = dict(N_DIRS=R, SPLIT_DIRS=split_dirs, HAS_D=D is not None, HAS_Z=z is not None,
                  HAS_BIAS=delta_bias is not None, SOFTPLUS=softplus, HAS_GATE=gate is not None,
                  STORE_LAST=want_last, BLOCK_D=block_d, BLOCK_N=next_pow2(d_state), UNROLL=unroll,
                  LANES_ON_CHANNELS=lanes_on_channels, CKPT_T=ckpt_t, PREFETCH=prefetch,
                  ACTIVE_SAMPLES=next_pow2(batch) if active_first else 0, HAS_LEN=has_len, **launch_options)
    grid = ((batch * R * cdiv(dim, block_d),) if active_first
            else (batch, cdiv(dim, block_d), R if split_dirs else 1))
    n, block = dim * seqlen, 1024
    return _ForwardPlan(lanes_on_channels, split_out, grid, ints, kwargs, (batch, cdiv(n, block)),
                        (n, seqlen, dim, n * batch, *gs))


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool, gate: Optional[Tensor],
                 scale: float, out: Tensor, want_last: bool = False, want_ckpt: bool = False,
                 block_d: Optional[int] = None, num_warps: Optional[int] = None, unroll: Optional[int] = None,
                 lanes_on_channels: Optional[bool] = None, prefetch: Optional[bool] = None,
                 split_dirs: Optional[bool] = None, maxnreg: Optional[int] = None,
                 active_first: Optional[bool] = None, lengths: Optional[Tensor] = None):
    """Launch the forward kernel over stacked directions.

    u, delta: (R, b, d, L) views; A: (R, d, N); B, C: (R, b, G, N, L) views; D, delta_bias: (R, d) or None;
    z: (b, d, L) or None, shared by the directions; gate: (b, R) or None; out: (b, d, L) view, written
    (sum over directions of gate * scale * y). Direction 1 runs in reverse time. Returns (last, ckpt):
    the last states (R, b, d, N) fp32 if want_last, and if want_ckpt the states entering every
    CKPT_CHUNK-th step (R, b, n_chunks, N, d) fp32 that scan_backward starts from (else None).
    split_dirs (two directions): one program per direction, each writing its own output, summed after.
    maxnreg: a register cap for this launch (0: none; default: FWD_TUNING's ckpt_maxnreg with want_ckpt).
    active_first (split directions with gates, no checkpoints, at most MAX_ACTIVE_PAIRS pairs; default on):
    dispatch the walks whose gate is on before the rest (_active_pair).
    lengths (b,) integers, or None: sample b's sequence is its first lengths[b] positions; the walks cover only
    those (direction 1 starts at lengths[b] - 1) and out is 0 after them. last is then the state at the end of
    the sample's sequence.
    Everything that follows from shapes, strides and options alone is planned once per key (_plan_forward).
    """
    options = (block_d, num_warps, unroll, lanes_on_channels, prefetch, split_dirs, maxnreg, active_first)
    key = (u.shape, u.stride(), u.dtype, delta.stride(), A.shape, B.shape, B.stride(), C.shape, C.stride(),
           out.shape, out.stride(), None if z is None else z.stride(), None if gate is None else gate.stride(),
           D is None, delta_bias is None, softplus, scale, want_last, want_ckpt and CKPT_CHUNK, lengths is None,
           options)
    plan = _forward_plans.get(key)
    if plan is None:
        plan = remember(_forward_plans, key, _plan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, gate,
                                                           scale, out, want_last, want_ckpt, lengths is not None,
                                                           *options))
    R, batch, dim, seqlen = u.shape
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    f32 = torch.float32
    last = torch.empty((R, batch, dim, A.shape[-1]), device=u.device, dtype=f32) if want_last else None
    ckpt = torch.empty((R, batch, cdiv(seqlen, CKPT_CHUNK), A.shape[-1], dim), device=u.device, dtype=f32) \
        if want_ckpt else None
    A = A_in_kernel_order(A, plan.lanes_on_channels)
    dummy, target = A, out
    if plan.split_out is not None:  # one output per direction (the kernels take its strides from the plan)
        out = out.new_empty(plan.split_out[0])
    launch(_scan_fwd_kernel, plan.grid,
        u, delta, z if z is not None else dummy, B, C, A, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, gate if gate is not None else dummy, out,
        last if last is not None else dummy, ckpt if ckpt is not None else dummy,
        lengths if lengths is not None else dummy, _longest_first(lengths) if lengths is not None else dummy,
        *plan.ints, **plan.kwargs)
    if plan.split_out is not None:
        launch(_sum_directions_kernel, plan.sum_grid, out, gate if gate is not None else dummy,
               lengths if lengths is not None else dummy, target, *plan.sum_ints, HAS_GATE=gate is not None,
               HAS_LEN=lengths is not None, CHANNELS_LAST=plan.split_out[1], BLOCK=1024, num_warps=4)
    return last, ckpt


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], softplus: bool, gate: Optional[Tensor],
                  scale: float, dout: Tensor, dlast: Optional[Tensor] = None, ckpt: Optional[Tensor] = None,
                  block_d: Optional[int] = None, num_warps: Optional[int] = None, prefetch: Optional[bool] = None,
                  sub_chunk: Optional[int] = None, scratch_evict: Optional[str] = None,
                  maxnreg: Optional[int] = None, dz_out: Optional[Tensor] = None, lengths: Optional[Tensor] = None,
                  sum_steps: Optional[int] = None, lane_sums: Optional[bool] = None,
                  smem_scratch: Optional[bool] = None, l2_prefetch: Optional[bool] = None,
                  l1_prefetch: Optional[bool] = None, bc_out: Optional[Tuple[Tensor, Tensor]] = None):
    """Gradients of `scan_forward` (same layouts). ckpt: the forward's checkpoints (want_ckpt); without
    them the forward runs again to make them. block_d .. maxnreg override BWD_TUNING (sub_chunk: the steps
    recomputed into the scratch at a time, a divisor of CKPT_CHUNK; scratch_evict: the L2 eviction policy of
    the scratch's stores, "" or "evict_last"; maxnreg: a register cap, 0 for none; lane_sums: the dB and dC sums
    over channels within the adjoint walk, across the warp's lanes (compiled kernels with 16 states and a warp of 32
    channels; else from the scratch after each walk, sum_steps steps at a time); smem_scratch: the walks' scratch in
    shared memory; l2_prefetch: each chunk's inputs asked into L2 a chunk ahead, l1_prefetch: and into L1 as the
    chunk starts (compiled kernels).
    dz_out: where dz goes (z's shape and dtype, any strides), else a new channel-contiguous tensor.
    bc_out: where dB and dC go (B's and C's shapes, each step's states contiguous, the same strides; any float
    dtype), else new fp32 tensors (eager training: the two column ranges of x_dbl's gradient, in its dtype).
    lengths: the forward's (see scan_forward); the gradients after each sample's end are zeros.
    Returns du, ddelta (R, b, d, L) and dz (b, d, L) or None in the dtypes of u, delta and z; fp32 dA (R, d, N);
    dB, dC (R, b, G, N, L); dD, ddelta_bias (R, d) or None; dgate (b, R) or None."""
    R, batch, dim, seqlen = u.shape
    if bc_out is not None and not (bc_out[0].shape == B.shape and bc_out[1].shape == C.shape
                                   and bc_out[0].stride() == bc_out[1].stride() and bc_out[0].stride(3) == 1):
        raise ValueError(f"scan backward: bc_out {[tuple(t.shape) for t in bc_out]} with strides "
                         f"{[t.stride() for t in bc_out]} does not fit B {tuple(B.shape)} and C {tuple(C.shape)}")
    if ckpt is None:
        _, ckpt = scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus, gate, scale, torch.empty_like(dout),
                               want_ckpt=True, lengths=lengths)
    if u.stride(-1) == 1:  # time-contiguous: channel-contiguous copies (the gradients come back in that layout)
        u, delta = [t.transpose(-1, -2).contiguous().transpose(-1, -2) for t in (u, delta)]
        z = z.transpose(-1, -2).contiguous().transpose(-1, -2) if z is not None else None
    if dout.stride(-1) == 1:
        dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
    d_state, groups = A.shape[-1], (B.shape[2], C.shape[2])
    A = A.transpose(-1, -2).contiguous()  # (R, N, d) in memory: see the kernel (no copy for the stacked weights)
    D = D.contiguous() if D is not None else None
    delta_bias = delta_bias.contiguous() if delta_bias is not None else None
    cfg = _backward_config(u, dim, groups, block_d, num_warps, prefetch, sub_chunk, scratch_evict, maxnreg,
                           sum_steps, lane_sums, smem_scratch, l2_prefetch, l1_prefetch)
    block_n, n_dblocks = next_pow2(d_state), cdiv(dim, cfg.block_d)
    # The sums over channels in the adjoint walk where the warp's reduce-scatter applies (and in the interpreter,
    # with Triton's sums over the lanes, so that the CPU tests cover this path's indexing)
    interpret = interpreted(_scan_bwd_kernel)
    lane_sums = cfg.lane_sums and (interpret or (block_n == 16 and cfg.block_d == 32 and cfg.num_warps == 1))
    # The walks' scratch in shared memory where the sums need no pass over it (which reads it in another layout)
    # and the device holds as many programs' scratch as its registers allow programs
    scratch_bytes = _scratch_elements(block_n, cfg) * 4
    smem_scratch = cfg.smem_scratch and lane_sums and not interpret and _shared_scratch_fits(u.device, scratch_bytes)
    out = _backward_outputs(u, delta, z, dz_out, gate is not None, n_dblocks, block_n, d_state, cfg, smem_scratch)
    # The chunks' inputs asked of L2 (and L1) ahead where the scratch is in shared memory: with it in global memory,
    # whose traffic keeps L2 busy, the L2 prefetch was measured mixed (-1.4% to +2.9%, scan_bwd_stalls_h200_2026-11-28)
    prefetch_ahead = cfg.l2_prefetch and smem_scratch
    du, ddelta, dz = out["du"], out["ddelta"], out["dz"]
    if dlast is not None:
        dlast = dlast.contiguous()
    dummy = du
    bc_align = _vector_alignment(B, C)
    zs = _strides4(z) if z is not None else [0, 0, 0]
    gs = _strides4(gate) if gate is not None else [0, 0]
    launch(_scan_bwd_kernel, (batch, n_dblocks),
        u, delta, z if z is not None else dummy, B, C, A, D if D is not None else dummy,
        delta_bias if delta_bias is not None else dummy, gate if gate is not None else dummy, dout,
        du, ddelta, dz if dz is not None else dummy, out["dB"], out["dC"], out["dA"], out["dD"], out["dbias"],
        out["dgate"] if out["dgate"] is not None else dummy, dlast if dlast is not None else dummy,
        ckpt, out["scratch"], lengths if lengths is not None else dummy,
        _longest_first(lengths) if lengths is not None else dummy,
        dim, seqlen, d_state, dim // groups[0], dim // groups[1], n_dblocks,
        *_strides4(u), *_strides4(delta), *zs, *_strides_in(B, bc_align), *_strides_in(C, bc_align),
        *_strides4(dout), *gs,
        *_strides4(du), *(_strides4(dz) if dz is not None else [0, 0, 0]), float(scale), 0,
        N_DIRS=R, HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
        SOFTPLUS=softplus, HAS_GATE=gate is not None, HAS_DLAST=dlast is not None,
        BLOCK_D=cfg.block_d, BLOCK_N=block_n, CHUNK_T=CKPT_CHUNK, SUB_T=cfg.sub_chunk, PREFETCH=cfg.prefetch,
        SCRATCH_EVICT=cfg.scratch_evict, HAS_LEN=lengths is not None, EVEN_D=dim % cfg.block_d == 0,
        EVEN_N=d_state == block_n, BC_ALIGN=bc_align, SUM_T=min(cfg.sum_steps, cfg.sub_chunk),
        LANE_SUMS=lane_sums, REDUCE_ASM=lane_sums and not interpret, SMEM_SCRATCH=smem_scratch,
        SCRATCH_DECL=_scratch_decl_asm(scratch_bytes) if smem_scratch else "",
        L2_PREFETCH=prefetch_ahead, L1_PREFETCH=prefetch_ahead and cfg.l1_prefetch,
        ZERO_BC_TAIL=lengths is not None and not _bc_sums_in_kernel(groups),
        **_launch_options(cfg.num_warps, cfg.maxnreg),
    )
    return _reduce_backward_partials(out, d_state, groups, D is not None, delta_bias is not None, lengths, bc_out)


def _longest_first(lengths: Tensor) -> Tensor:
    """The samples in descending order of length (int32), the scan kernels' program order (_longest_first_program):
    kept on the lengths tensor, which the layers of a DyVM stage share (their forward and backward calls sort once),
    while its values are unchanged."""
    kept = getattr(lengths, "_longest_first", None)
    if kept is not None and kept[0] == lengths._version:
        return kept[1]
    order = torch.argsort(lengths, descending=True, stable=True).to(torch.int32)
    lengths._longest_first = (lengths._version, order)
    return order


class _BackwardConfig(NamedTuple):
    block_d: int
    num_warps: int
    prefetch: bool
    sub_chunk: int
    scratch_evict: str
    maxnreg: int
    sum_steps: int
    lane_sums: bool
    smem_scratch: bool
    l2_prefetch: bool
    l1_prefetch: bool


def _backward_config(u, dim, groups, block_d, num_warps, prefetch, sub_chunk, scratch_evict, maxnreg, sum_steps,
                     lane_sums, smem_scratch, l2_prefetch, l1_prefetch):
    """scan_backward's launch parameters: its arguments where given, else BWD_TUNING's for u's element size."""
    tuning = BWD_TUNING[f"cl/{min(u.element_size(), 4)}"]
    cfg = _BackwardConfig(
        block_d=_block_d(dim, groups, block_d or tuning["block_d"]), num_warps=num_warps or tuning["num_warps"],
        prefetch=tuning["prefetch"] if prefetch is None else prefetch, sub_chunk=sub_chunk or tuning["sub_chunk"],
        scratch_evict=tuning["scratch_evict"] if scratch_evict is None else scratch_evict,
        maxnreg=tuning["maxnreg"] if maxnreg is None else maxnreg, sum_steps=sum_steps or tuning["sum_steps"],
        lane_sums=tuning["lane_sums"] if lane_sums is None else lane_sums,
        smem_scratch=tuning["smem_scratch"] if smem_scratch is None else smem_scratch,
        l2_prefetch=tuning["l2_prefetch"] if l2_prefetch is None else l2_prefetch,
        l1_prefetch=tuning["l1_prefetch"] if l1_prefetch is None else l1_prefetch)
    if CKPT_CHUNK % cfg.sub_chunk:
        raise ValueError(f"the backward's sub_chunk ({cfg.sub_chunk}) must divide the checkpoint interval "
                         f"({CKPT_CHUNK})")
    if cfg.sum_steps < 1 or cfg.sum_steps & (cfg.sum_steps - 1):
        raise ValueError(f"the backward's sum_steps ({cfg.sum_steps}) must be a power of two")
    return cfg


def _scratch_elements(block_n: int, cfg) -> int:
    """The fp32 elements of one program's scratch: sub_chunk + 1 state tiles (block_n, block_d), sub_chunk dy rows."""
    return ((cfg.sub_chunk + 1) * block_n + cfg.sub_chunk) * cfg.block_d


# The backward's programs an SM that its registers allow (over 168 registers a thread: two one-warp programs a
# scheduler), and what each takes of shared memory beside its scratch (the 1 KiB the driver reserves a block, and
# Triton's own 512 bytes at Vim-S, with a margin). Where fewer scratches fit (GPUs with about 100 KiB an SM) the
# scratch stays in global memory, whose programs are then not limited by shared memory (not measured there).
SMEM_SCRATCH_PROGRAMS = 8
SMEM_BLOCK_EXTRA_BYTES = 1536
STATIC_SHARED_LIMIT = 48 * 1024  # (a static shared array's limit per block)
_smem_fits: dict = {}


def shared_scratch_fits(shared_per_sm: int, n_bytes: int) -> bool:
    """Whether SMEM_SCRATCH_PROGRAMS programs' scratch of n_bytes fits an SM with shared_per_sm bytes."""
    return n_bytes <= STATIC_SHARED_LIMIT - SMEM_BLOCK_EXTRA_BYTES and \
        shared_per_sm >= SMEM_SCRATCH_PROGRAMS * (n_bytes + SMEM_BLOCK_EXTRA_BYTES)


def _shared_scratch_fits(device: torch.device, n_bytes: int) -> bool:
    """shared_scratch_fits for a CUDA device (cached); True elsewhere (benchmarks/kernel_sass.py compiles for
    Hopper from CPU tensors)."""
    if device.type != "cuda":
        return True
    key = (device.index, n_bytes)
    fits = _smem_fits.get(key)
    if fits is None:
        props = torch.cuda.get_device_properties(device)
        fits = remember(_smem_fits, key, shared_scratch_fits(getattr(props, "shared_memory_per_multiprocessor", 0),
                                                             n_bytes))
    return fits


def _scratch_decl_asm(n_bytes: int) -> str:
    """PTX declaring a program's scratch in shared memory (a static array, which ptxas adds to the kernel's shared
    memory) and returning its byte address."""
    return f"{{ .shared .align 16 .b8 scan_bwd_scratch[{n_bytes}]; mov.u32 $0, scan_bwd_scratch; }}"


def _backward_outputs(u, delta, z, dz_out, has_gate, n_dblocks, block_n, d_state, cfg, smem_scratch) -> dict:
    """What the backward kernel writes: du, ddelta (channel-contiguous, in the inputs' dtypes: the kernel accumulates
    in fp32 and rounds once on store), dz, the fp32 partial sums and the per-program scratch (none where the
    scratch is in shared memory)."""
    R, batch, dim, seqlen = u.shape
    dev, f32 = u.device, torch.float32
    if dz_out is not None and (z is None or dz_out.shape != z.shape or dz_out.dtype != z.dtype):
        raise ValueError(f"scan backward: dz_out {tuple(dz_out.shape)} {dz_out.dtype} does not fit z")
    dz = dz_out if dz_out is not None else \
        torch.empty((batch, seqlen, dim), device=dev, dtype=z.dtype).transpose(1, 2) if z is not None else None
    dD_dbias = torch.empty((2, R, batch, dim), device=dev, dtype=f32)  # (one sum over the samples for both)
    return dict(
        du=torch.empty((R, batch, seqlen, dim), device=dev, dtype=u.dtype).transpose(2, 3),
        ddelta=torch.empty((R, batch, seqlen, dim), device=dev, dtype=delta.dtype).transpose(2, 3), dz=dz,
        # (the states innermost: a step's 16 partial sums are one contiguous store, not 16 scattered ones)
        dB=torch.empty((R, n_dblocks, batch, seqlen, block_n), device=dev, dtype=f32),
        dC=torch.empty((R, n_dblocks, batch, seqlen, block_n), device=dev, dtype=f32),
        dA=torch.empty((R, batch, dim, d_state), device=dev, dtype=f32), dD_dbias=dD_dbias, dD=dD_dbias[0],
        dbias=dD_dbias[1],
        dgate=torch.empty((batch, R, n_dblocks), device=dev, dtype=f32) if has_gate else None,
        scratch=torch.empty((0 if smem_scratch else batch * n_dblocks * _scratch_elements(block_n, cfg),),
                            device=dev, dtype=f32))


def _strides_in(t: Tensor, unit: int) -> list:
    """B's or C's strides (r, b, g, n, t) for the backward kernel: all but the states' in units of `unit` elements."""
    return [st if i == 3 else st // unit for i, st in enumerate(t.stride())]


def _vector_alignment(B: Tensor, C: Tensor) -> int:
    """The elements that B's and C's per-step offsets are multiples of (16 bytes' worth, else 1), for vectorised
    loads of a step's states: both state-contiguous, 16-byte aligned, every other stride a multiple."""
    vec = 16 // B.element_size()
    for t in (B, C):
        if t.element_size() != B.element_size() or t.stride(3) != 1 or t.data_ptr() % 16 or \
                any(st % vec for i, st in enumerate(t.stride()) if i != 3):
            return 1
    return vec


@triton.jit
def _sum_bc_partials_kernel(dB_part, dC_part, dB_ptr, dC_ptr, len_ptr, seqlen, d_state, n_dblocks, batch,
                            so_r, so_b, so_t, HAS_LEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    """dB, dC = the backward kernel's partial sums (R, n_dblocks, b, L, BLOCK_N) summed over the channel blocks, in
    their order (deterministic), both in one pass, written in the outputs' dtype at element (r, b, t, n) of strides
    (so_r, so_b, so_t, 1), the same for both. HAS_LEN: positions at or after the sample's length read nothing (the
    backward kernel wrote no partials there) and come out 0."""
    pid_t = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)
    r = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = tl.arange(0, BLOCK_N)
    in_seq = offs_t < seqlen
    live = in_seq
    n_blocks = n_dblocks
    if HAS_LEN:
        length = tl.load(len_ptr + pid_b)
        live = in_seq & (offs_t < length)
        n_blocks = tl.where(pid_t * BLOCK_T < length, n_dblocks, 0)  # (a tile wholly past the end: zeros)
    load_mask = live[:, None] & (offs_n < BLOCK_N)[None, :]
    part = ((r * n_dblocks * batch + pid_b) * seqlen + offs_t[:, None]) * BLOCK_N + offs_n[None, :]
    block_stride = batch * seqlen * BLOCK_N
    acc_B = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    acc_C = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for k in range(n_blocks):
        acc_B += tl.load(dB_part + part, mask=load_mask, other=0.0)
        acc_C += tl.load(dC_part + part, mask=load_mask, other=0.0)
        part += block_stride
    out = r * so_r + pid_b * so_b + offs_t[:, None].to(tl.int64) * so_t + offs_n[None, :]
    store_mask = in_seq[:, None] & (offs_n < d_state)[None, :]
    tl.store(dB_ptr + out, acc_B.to(dB_ptr.dtype.element_ty), mask=store_mask)
    tl.store(dC_ptr + out, acc_C.to(dC_ptr.dtype.element_ty), mask=store_mask)


# _sum_bc_partials_kernel's tiles: positions per program (a tile wholly past a sample's end reads nothing).
BC_SUM_BLOCK_T = 32


def _bc_sums_in_kernel(groups: tuple) -> bool:
    """Whether _sum_bc_partials_kernel sums dB and dC: one group of B and of C (Vim, Mamba); torch sums the
    grouped case's blocks group by group."""
    return groups == (1, 1)


def _reduce_backward_partials(out, d_state, groups, has_D, has_bias, lengths=None, bc_out=None) -> dict:
    """The backward kernel's outputs with its partial sums reduced (deterministically): dB and dC in one kernel
    that skips each sample's positions past its length (_sum_bc_partials_kernel; at Vim-S training shapes on an
    H200 torch's five sums took 82 us a call, whatever the lengths), dA, dD and d delta_bias in one more
    (sum_middle). bc_out: see scan_backward."""
    R, n_dblocks, batch, seqlen, block_n = out["dB"].shape
    # The sums lie (R, G, b, L, N) in memory, as B and C lie in x_dbl, so their gradients go back into x_dbl's
    # without a transposing copy; returned as (R, b, G, N, L) views.
    if _bc_sums_in_kernel(groups):
        if bc_out is not None:  # (R, b, 1, N, L) views, each step's N states contiguous
            dB, dC = bc_out
        else:
            dB = torch.empty((R, 1, batch, seqlen, d_state), device=out["dB"].device,
                             dtype=torch.float32).permute(0, 2, 1, 4, 3)
            dC = torch.empty_like(dB)
        block_t = BC_SUM_BLOCK_T
        launch(_sum_bc_partials_kernel, (cdiv(seqlen, block_t), batch, R), out["dB"], out["dC"], dB, dC,
               lengths if lengths is not None else dB, seqlen, d_state, n_dblocks, batch, dB.stride(0), dB.stride(1),
               dB.stride(4), HAS_LEN=lengths is not None, BLOCK_T=block_t, BLOCK_N=block_n, num_warps=4)
    else:
        def reduce_bc(part, n_groups):  # (R, n_dblocks, b, L, Np) -> (R, b, G, N, L): the blocks of each group
            part = part[..., :d_state].reshape(R, n_groups, n_dblocks // n_groups, batch, seqlen, d_state).sum(2)
            return part.permute(0, 2, 1, 4, 3)

        dB, dC = reduce_bc(out["dB"], groups[0]), reduce_bc(out["dC"], groups[1])
        if bc_out is not None:
            dB, dC = bc_out[0].copy_(dB), bc_out[1].copy_(dC)
    # the per-sample rows of dA, dD and d delta_bias (and the channel blocks' of d gate) in one launch
    dA, dD_dbias, dgate = out["dA"], out["dD_dbias"] if has_D or has_bias else None, out["dgate"]
    sums = sum_middle(dA.view(R, batch, -1), None if dD_dbias is None else dD_dbias.view(2 * R, batch, -1),
                      None if dgate is None else dgate.view(batch * R, -1, 1))
    dA = sums[0].view(dA.shape[0], *dA.shape[2:])
    dD_dbias = sums[1].view(2, R, -1) if dD_dbias is not None else (None, None)
    return dict(
        du=out["du"], ddelta=out["ddelta"], dA=dA, dB=dB, dC=dC,
        dD=dD_dbias[0] if has_D else None, ddelta_bias=dD_dbias[1] if has_bias else None,
        dz=out["dz"], dgate=sums[2].view(batch, R) if dgate is not None else None,
    )
