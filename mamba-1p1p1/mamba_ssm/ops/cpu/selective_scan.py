"""The selective scan's CPU implementation: forward and analytic backward of the stacked-directions op.

Same contract as the Triton kernels (mamba_ssm/ops/triton/selective_scan.py, scan_forward / scan_backward),
so the custom ops mamba_ssm::scan_fwd / scan_bwd run it for the tensors the kernels do not take (CPU):

    u, delta: (R, b, d, L) views; A: (R, d, N); B, C: (R, b, G, N, L) views; D, delta_bias: (R, d) or None;
    z: (b, d, L) or None (shared by the directions); gate: (b, R) or None
    out = scale * sum_r gate[:, r] * (y_r + D_r u_r) * silu(z),   direction 1 runs in reverse time,
    y_r[t] = sum_n C_t[n] h_t[n],  h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,  dt = softplus(delta + bias).
    lengths (b,) or None: sample b's sequence is its first lengths[b] positions; here by masking (u zeroed after
    each sample's end, the output and du too) over the prefix up to the longest sample, where the walks stop.

Plain PyTorch (any device runs it), written for a CPU, where the cost is memory traffic and the number of
ops rather than arithmetic:
- "Scan order": the per-token inputs are copied once into a time-major layout (L, R, b, ...) in which
  direction 1 is already reversed, so one step of the walk is one contiguous slice holding both directions:
  nothing of state size is flipped, and both directions advance in the same op.
- The state is laid out (N, d), channels innermost, so every elementwise op vectorises over channels.
- Time is walked in chunks of CHUNK steps whose buffers (CHUNK x R x b x N x d) stay in the caches: a chunk's
  decays exp(dt A) and inputs dt u B are one op each, the walk is one fused multiply-add per step, and the
  outputs are one batched product. Nothing of size (L, b, d, N) is kept: the forward saves the state
  entering each chunk, the outputs y and the step sizes dt (the checkpoint), and the backward recomputes one
  chunk at a time from it, walks it in reverse with the adjoint state g_t = C_t dy_t + a_{t+1} g_{t+1}, and
  reduces the chunk's gradients in whole-chunk ops. (Doing the per-token work chunk by chunk as well, on
  cache-sized slices, measured 10% slower at the demo's shapes: more ops, each too small.)
- Few and reused temporaries: every chunk-sized product and sum writes into buffers allocated once per call
  (a fresh multi-megabyte tensor costs its page faults again each time on a glibc system).
- exp is computed as exp2, and softplus with fp64's log1p: torch's fp32 exp, log1p and softplus are 7x to
  100x slower than exp2 on some CPUs (for 131k floats on the demo's 2-core AMD EPYC: exp 141 us, exp2 20
  us, fp32 log1p 2.5 ms, fp64 log1p 0.2 ms).
Math in fp32 (fp64 for fp64 inputs) whatever the input dtype; du, ddelta, dz in the inputs' dtypes.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# Steps per chunk. The chunk's buffers should stay in the caches: at the demo's shapes (R=2, b=64, d=128,
# N=8: 0.5 MB per step) 4 steps measured best on the 2-core EPYC (forward + backward of one layer, 1 thread:
# 31 / 30 / 31 / 39 / 47 ms at 2 / 4 / 8 / 16 / 25 steps).
CHUNK = 4
LOG2E = 1.4426950408889634


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def softplus(x: Tensor) -> Tensor:
    """log(1 + exp(x)) = max(x, 0) + log1p(exp(-|x|)), exact to rounding (log1p in fp64, see above)."""
    e = x.abs().mul_(-LOG2E).exp2_()  # exp(-|x|), in (0, 1]
    l1p = e.log1p_() if x.dtype == torch.float64 else e.double().log1p_().to(x.dtype)
    return l1p.add_(x.clamp(min=0))


def checkpoint_numel(R: int, batch: int, dim: int, seqlen: int, d_state: int) -> int:
    """Size of the flat checkpoint: the state entering every chunk, then the outputs y and the step sizes dt
    (both in scan order)."""
    return R * batch * (-(-seqlen // CHUNK) * d_state * dim + 2 * seqlen * dim)


def _split_checkpoint(ckpt: Tensor, R: int, batch: int, dim: int, seqlen: int, d_state: int):
    """-> states entering the chunks (n_chunks, R, b, N, d), y and dt (L, R, b, d), views of the checkpoint."""
    n_states = -(-seqlen // CHUNK) * R * batch * d_state * dim
    n_tok = seqlen * R * batch * dim
    tokens = (seqlen, R, batch, dim)
    return (ckpt[:n_states].view(-1, R, batch, d_state, dim), ckpt[n_states:n_states + n_tok].view(tokens),
            ckpt[n_states + n_tok:].view(tokens))


def _reversed(src: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """src (L, ...) in reverse order along dim 0, written into `out` when given: one gathering copy
    (flip() then copy_() costs a temporary and a second pass: 4x slower here)."""
    rev = torch.arange(src.shape[0] - 1, -1, -1, device=src.device)
    if out is None:
        return src.index_select(0, rev)
    if out.dtype != src.dtype:
        return out.copy_(src.index_select(0, rev))
    return torch.index_select(src, 0, rev, out=out)


def _scan_order(t: Tensor, dtype: torch.dtype) -> Tensor:
    """(R, ..., L) -> contiguous (L, R, ...) in `dtype`, direction 1's time reversed (its walk order)."""
    out = torch.empty((t.shape[-1], *t.shape[:-1]), dtype=dtype, device=t.device)
    for r in range(t.shape[0]):
        src = t[r].movedim(-1, 0)
        _reversed(src, out[:, r]) if r == 1 else out[:, r].copy_(src)
    return out


def _time_major(t: Tensor, r: int) -> Tensor:
    """Direction r of a scan-order (L, R, ...) tensor in time order: a view (direction 0), a copy (1)."""
    return _reversed(t[:, r]) if r == 1 else t[:, r]


def _channels_last(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Scan-order (L, R, b, d) -> (R, b, d, L) in time order and `dtype`, channel-contiguous (the layout of
    the Triton kernels' du / ddelta)."""
    seqlen, R, batch, dim = t.shape
    out = torch.empty((R, batch, seqlen, dim), dtype=dtype, device=t.device)
    for r in range(R):
        dest = out[r].transpose(0, 1)  # (L, b, d) view
        _reversed(t[:, r], dest) if r == 1 else dest.copy_(t[:, r])
    return out.transpose(2, 3)


def _from_scan_order(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Scan-order (L, R, ...) -> (R, ..., L) in time order and `dtype`, contiguous."""
    return torch.stack([_time_major(t, r).movedim(0, -1) for r in range(t.shape[1])]).to(dtype)


class _Grouped:
    """Products of state-shaped tensors (..., N, d) with per-channel (..., d) and per-group (..., G, N) ones:
    B or C comes in G groups of d / G channels (G = 1 in Vim; G = d for a fixed (d, N) B or C). `tmp`: a
    state-shaped buffer at least as large as the operands, for the products that are summed."""

    def __init__(self, dim: int, groups: int, d_state: int):
        self.dim, self.groups, self.d_state = dim, groups, d_state
        self.per_group = dim // groups

    def outer(self, M: Tensor, v: Tensor, out: Tensor) -> Tensor:
        """M (..., G, N), v (..., d) -> out (..., N, d) = M[g(c), n] * v[c]."""
        lead, G, N = v.shape[:-1], self.groups, self.d_state
        torch.mul(M.transpose(-1, -2).reshape(*lead, N, G, 1), v.reshape(*lead, 1, G, self.per_group),
                  out=out.view(*lead, N, G, self.per_group))
        return out

    def sum_n(self, H: Tensor, M: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
        """H (..., N, d), M (..., G, N) -> out (..., d) = sum_n M[g(c), n] H[n, c]."""
        lead, G, N = H.shape[:-2], self.groups, self.d_state
        if G == 1:
            torch.bmm(M.reshape(-1, 1, N), H.reshape(-1, N, self.dim), out=out.view(-1, 1, self.dim))
            return out
        prod = torch.mul(H.view(*lead, N, G, self.per_group), M.transpose(-1, -2).reshape(*lead, N, G, 1),
                         out=tmp.view(-1)[:H.numel()].view(*lead, N, G, self.per_group))
        torch.sum(prod, -3, out=out.view(*lead, G, self.per_group))
        return out

    def sum_d(self, H: Tensor, v: Tensor, out: Tensor, tmp: Tensor) -> Tensor:
        """H (..., N, d), v (..., d) -> out (..., G, N) = sum over each group's channels of H[n, c] v[c]."""
        lead, G, N = H.shape[:-2], self.groups, self.d_state
        prod = torch.mul(H.view(*lead, N, G, self.per_group), v.view(*lead, 1, G, self.per_group),
                         out=tmp.view(-1)[:H.numel()].view(*lead, N, G, self.per_group))
        torch.sum(prod, -1, out=out.transpose(-1, -2))
        return out


class _Inputs:
    """The scan-order inputs: u, dt, dt * u (L, R, b, d); A as (R, N, d), also scaled by log2(e) for exp2;
    B and C (L, R, b, G, N). dt = softplus(delta + bias) is computed, or taken from `dt` (the checkpoint)."""

    def __init__(self, u, delta, A, B, C, delta_bias, softplus_dt: bool, dt: Optional[Tensor] = None):
        cdt = compute_dtype(u.dtype)
        self.U = _scan_order(u, cdt)
        if dt is None:
            dt = pre_activation(delta, delta_bias, cdt)
            dt = softplus(dt) if softplus_dt else dt
        self.DT = dt
        self.DU = dt * self.U
        self.At = A.to(cdt).transpose(-1, -2).contiguous()
        self.At2 = self.At * LOG2E
        self.Bs, self.Cs = _scan_order(B, cdt), _scan_order(C, cdt)
        self.gB = _Grouped(u.shape[2], B.shape[2], A.shape[-1])
        self.gC = _Grouped(u.shape[2], C.shape[2], A.shape[-1])

    def chunk_states(self, t0: int, t1: int, h0: Optional[Tensor], decay: Tensor, states: Tensor) -> None:
        """Steps t0..t1-1 from the state h0 (None: zero): decays exp(dt A) into `decay`, states into `states`
        (_Buffers of at least t1 - t0 steps)."""
        n = t1 - t0
        torch.mul(self.DT[t0:t1].unsqueeze(-2), self.At2[:, None], out=decay.all[:n]).exp2_()
        self.gB.outer(self.Bs[t0:t1], self.DU[t0:t1], out=states.all[:n])
        prev = h0
        for a, h in zip(decay.steps[:n], states.steps[:n]):
            if prev is not None:
                h.addcmul_(a, prev)
            prev = h


class _Buffer:
    """A chunk-sized state buffer (CHUNK, R, b, N, d), reused across chunks, with its per-step views made once
    (indexing a step per op would cost a dispatch each)."""

    def __init__(self, n: int, like: Tensor, d_state: int):
        _, R, batch, dim = like.shape
        self.all = torch.empty((n, R, batch, d_state, dim), dtype=like.dtype, device=like.device)
        self.steps = self.all.unbind(0)


def pre_activation(delta: Tensor, delta_bias: Optional[Tensor], dtype: torch.dtype) -> Tensor:
    """delta + bias in scan order (L, R, b, d)."""
    pre = _scan_order(delta, dtype)
    if delta_bias is not None:
        pre += delta_bias.to(dtype)[None, :, None, :]
    return pre


def _chunks(seqlen: int):
    return [(t0, min(t0 + CHUNK, seqlen)) for t0 in range(0, seqlen, CHUNK)]


def _gate_weights(gate: Optional[Tensor], R: int, scale: float, dtype: torch.dtype):
    """Per direction, the (b, 1) factor scale * gate[:, r] (a float without gates)."""
    if gate is None:
        return [scale] * R
    return [(gate[:, r, None] * scale).to(dtype) for r in range(R)]


def _direction_sum(Yfull: Tensor, gate: Optional[Tensor], scale: float) -> Tensor:
    """scale * sum_r gate[:, r] * y_r over a scan-order (L, R, b, d) tensor -> (L, b, d) in time order. A
    gate of exactly 0 gives 0 even where y is not finite (the kernels never read a gated-off sample)."""
    acc = None
    for r, w in enumerate(_gate_weights(gate, Yfull.shape[1], scale, Yfull.dtype)):
        term = _time_major(Yfull, r) * w
        if gate is not None:
            off = (w[:, 0] == 0).nonzero()[:, 0]  # (the few samples gated off: cheaper than a where over all)
            if off.numel():
                term.index_fill_(1, off, 0.0)
        acc = term if acc is None else acc.add_(term)
    return acc


def _with_skip(Y: Tensor, U: Tensor, D: Optional[Tensor]) -> Tensor:
    """y + D u on scan-order (L, R, b, d) tensors (a new tensor)."""
    return Y.clone() if D is None else torch.addcmul(Y, U, D.to(Y.dtype)[None, :, None, :])


def _inside(lengths: Optional[Tensor], seqlen: int, want_last: bool = False) -> Optional[Tensor]:
    """(b, L) bool, True at the positions inside each sample's sequence (its first lengths[b]); None without
    lengths. Here a sample's sequence ends by masking: u is zeroed after the end, so direction 1 enters the
    sequence with the zero state, and the outputs and du after it are zeroed (the kernels skip those steps)."""
    if lengths is None:
        return None
    if want_last:
        raise ValueError("selective scan: lengths and the last state (or its gradient) cannot be combined")
    return torch.arange(seqlen, device=lengths.device) < lengths[:, None]


def _walk_end(lengths: Optional[Tensor], seqlen: int) -> int:
    """Where the walks may stop: after the longest sample (every position after it is outside every sample's
    sequence), at least one step; L without lengths."""
    return seqlen if lengths is None else max(1, min(seqlen, int(lengths.max())))


def _prefix(t: Optional[Tensor], end: int) -> Optional[Tensor]:
    return None if t is None else t[..., :end]


def _zero_padded(t: Tensor, seqlen: int) -> Tensor:
    """t (..., end) -> (..., seqlen) with zeros after end, in t's memory order (channel-contiguous stays so)."""
    order = sorted(range(t.dim()), key=lambda i: -t.stride(i))  # the axes from outermost to innermost in memory
    shape = [seqlen if i == t.dim() - 1 else t.shape[i] for i in order]
    full = t.new_zeros(shape).permute(*[order.index(i) for i in range(t.dim())])
    full[..., :t.shape[-1]].copy_(t)
    return full


def scan_forward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                 z: Optional[Tensor], delta_bias: Optional[Tensor], softplus_dt: bool, gate: Optional[Tensor],
                 scale: float, out: Tensor, want_last: bool = False, want_ckpt: bool = False,
                 lengths: Optional[Tensor] = None):
    """Forward over stacked directions (see the module docstring); writes `out` (b, d, L). Returns
    (last, ckpt): the last states (R, b, d, N) if want_last, and if want_ckpt a flat tensor (see
    checkpoint_numel) that scan_backward starts from; the compute dtype (fp32, fp64 for fp64 inputs).
    lengths (b,): sample b's sequence is its first lengths[b] positions (see _inside); the walks stop after
    the longest one (_walk_end), and out is 0 from there."""
    R, batch, dim, seqlen = u.shape
    end = _walk_end(lengths, seqlen)
    if end == seqlen:
        return _forward(u, delta, A, B, C, D, z, delta_bias, softplus_dt, gate, scale, out, want_last, want_ckpt,
                        lengths)
    ckpt = torch.empty(checkpoint_numel(R, batch, dim, seqlen, A.shape[-1]), dtype=compute_dtype(u.dtype),
                       device=u.device) if want_ckpt else None  # (the full length's size: what the op declares)
    last, _ = _forward(*[_prefix(t, end) for t in (u, delta)], A, *[_prefix(t, end) for t in (B, C)], D,
                       _prefix(z, end), delta_bias, softplus_dt, gate, scale, out[..., :end], want_last, want_ckpt,
                       lengths, ckpt)
    out[..., end:].zero_()
    return last, ckpt


def _forward(u, delta, A, B, C, D, z, delta_bias, softplus_dt, gate, scale, out, want_last, want_ckpt, lengths,
             ckpt_memory: Optional[Tensor] = None):
    """scan_forward over the whole of its inputs; ckpt_memory: a flat tensor whose start holds the checkpoint."""
    inside = _inside(lengths, u.shape[-1], want_last)
    if inside is not None:
        u = u * inside[None, :, None, :]
    R, batch, dim, seqlen = u.shape
    d_state = A.shape[-1]
    cdt = compute_dtype(u.dtype)
    ckpt = starts = None
    if want_ckpt:
        numel = checkpoint_numel(R, batch, dim, seqlen, d_state)
        ckpt = ckpt_memory[:numel] if ckpt_memory is not None else torch.empty(numel, dtype=cdt, device=u.device)
        starts, Y, dt = _split_checkpoint(ckpt, R, batch, dim, seqlen, d_state)
        dt.copy_(pre_activation(delta, delta_bias, cdt))
        if softplus_dt:
            dt.copy_(softplus(dt))
        x = _Inputs(u, delta, A, B, C, delta_bias, softplus_dt, dt)
    else:
        x = _Inputs(u, delta, A, B, C, delta_bias, softplus_dt)
        Y = torch.empty((seqlen, R, batch, dim), dtype=cdt, device=u.device)
    n_max, chunks = min(CHUNK, seqlen), _chunks(seqlen)
    decay, states = _Buffer(n_max, x.U, d_state), _Buffer(n_max, x.U, d_state)
    # the state entering each chunk: the next chunk overwrites the buffers before it reads it, so it is copied
    # out (into the checkpoint, which keeps them for the backward)
    h, h_next = None, (starts.unbind(0) if starts is not None else [torch.empty_like(states.steps[0])] * len(chunks))
    if starts is not None:
        starts[0].zero_()
    for c, (t0, t1) in enumerate(chunks):
        x.chunk_states(t0, t1, h, decay, states)
        h = states.steps[t1 - t0 - 1]
        if c + 1 < len(chunks):
            h = h_next[c + 1].copy_(h)
        x.gC.sum_n(states.all[:t1 - t0], x.Cs[t0:t1], Y[t0:t1], decay.all)
    last = h.transpose(-1, -2).contiguous() if want_last else None  # (R, b, d, N)
    acc = _direction_sum(_with_skip(Y, x.U, D), gate, scale)  # (L, b, d)
    if z is not None:
        acc.mul_(F.silu(z.to(cdt)).permute(2, 0, 1))
    out.permute(2, 0, 1).copy_(acc)
    if inside is not None:
        out.mul_(inside[:, None, :])
    return last, ckpt


def _output_gradients(dout: Tensor, z: Optional[Tensor], gate: Optional[Tensor], scale: float, R: int,
                      dtype: torch.dtype):
    """The gradient reaching y_r + D u_r: S = dout * scale * silu(z) in walk order (L, R, b, d), dY = S times
    each direction's gate; also dout * scale (L, b, d) time-major for z's and the gate's gradients."""
    dsz = dout.to(dtype).permute(2, 0, 1) * scale
    S = torch.empty((dsz.shape[0], R, *dsz.shape[1:]), dtype=dtype, device=dout.device)
    torch.mul(dsz, F.silu(z.to(dtype)).permute(2, 0, 1), out=S[:, 0]) if z is not None else S[:, 0].copy_(dsz)
    if R == 2:
        _reversed(S[:, 0], S[:, 1])
    dY = S if gate is None else S * torch.stack(_gate_weights(gate, R, 1.0, dtype))[None]
    return S, dY, dsz


def _adjoint_walk(x: _Inputs, starts: Tensor, dY: Tensor, dlast: Optional[Tensor]):
    """Chunk by chunk from the end: recompute the states from the checkpoint, walk the adjoint state
    g_t = C_t dy_t + a_{t+1} g_{t+1} backwards, and reduce the chunk's gradients. Returns dB, dC (L, R, b, G, N)
    in walk order, gB = sum_n g_t B_t (the gradient of dt u) and sQA = sum_n q_t A (of dt through the decay,
    q_t = a_t g_t h_{t-1}) as (L, R, b, d), and dA (R, N, d)."""
    seqlen, R, batch, dim = x.U.shape
    d_state, cdt, dev = x.At.shape[1], x.U.dtype, x.U.device
    dB = torch.empty((seqlen, R, batch, x.gB.groups, d_state), dtype=cdt, device=dev)
    dC = torch.empty((seqlen, R, batch, x.gC.groups, d_state), dtype=cdt, device=dev)
    gB, sQA = torch.empty_like(x.U), torch.empty_like(x.U)
    dA = torch.zeros((R, batch, d_state, dim), dtype=cdt, device=dev)  # summed over samples at the end
    dA_chunk = torch.empty_like(dA)
    n_max = min(CHUNK, seqlen)
    decay, states, adj, tmp = (_Buffer(n_max, x.U, d_state) for _ in range(4))
    # a_{t+1} g_{t+1} entering each chunk from the one after it (dlast at the end)
    carry = None if dlast is None else dlast.to(cdt).transpose(-1, -2).contiguous()
    carry_buf = torch.empty_like(states.steps[0])
    chunks = _chunks(seqlen)
    for c in reversed(range(len(chunks))):
        t0, t1 = chunks[c]
        n = t1 - t0
        dec, st, g, tm = decay.all[:n], states.all[:n], adj.all[:n], tmp.all[:n]
        h0 = starts[c] if c else None
        x.chunk_states(t0, t1, h0, decay, states)
        x.gC.outer(x.Cs[t0:t1], dY[t0:t1], out=g)  # C_t dy_t, then the adjoint walk
        if carry is not None:
            adj.steps[n - 1].add_(carry)
        for i in range(n - 2, -1, -1):
            adj.steps[i].addcmul_(decay.steps[i + 1], adj.steps[i + 1])
        q = dec.mul_(g)  # a_t g_t (the decays are not needed any more)
        carry = carry_buf.copy_(q[0])
        x.gC.sum_d(st, dY[t0:t1], dC[t0:t1], tm)
        x.gB.sum_d(g, x.DU[t0:t1], dB[t0:t1], tm)
        x.gB.sum_n(g, x.Bs[t0:t1], gB[t0:t1], tm)
        if n > 1:  # q_t = a_t g_t h_{t-1} (h_{-1} = 0)
            q[1:].mul_(st[:-1])
        if h0 is None:
            q[0].zero_()
        else:
            q[0].mul_(h0)
        torch.sum(torch.mul(q, x.At[:, None], out=tm), -2, out=sQA[t0:t1])
        torch.sum(torch.mul(q, x.DT[t0:t1].unsqueeze(-2), out=tm), 0, out=dA_chunk)
        dA += dA_chunk
    return dB, dC, gB, sQA, dA.sum(1)


def scan_backward(u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Optional[Tensor],
                  z: Optional[Tensor], delta_bias: Optional[Tensor], softplus_dt: bool, gate: Optional[Tensor],
                  scale: float, dout: Tensor, dlast: Optional[Tensor] = None, ckpt: Optional[Tensor] = None,
                  lengths: Optional[Tensor] = None):
    """Gradients of scan_forward, as the Triton scan_backward returns them: a dict of du, ddelta (R, b, d, L)
    and dz (b, d, L) in the dtypes of u, delta and z, channel-contiguous; dA (R, d, N), dB, dC (R, b, G, N, L),
    dD, ddelta_bias (R, d), dgate (b, R) in the compute dtype; None for absent inputs. ckpt: the forward's
    checkpoint (want_ckpt); without it the forward runs again to make it. lengths: the forward's."""
    R, batch, dim, seqlen = u.shape
    if ckpt is None:
        _, ckpt = scan_forward(u, delta, A, B, C, D, z, delta_bias, softplus_dt, gate, scale,
                               torch.empty_like(dout), want_ckpt=True, lengths=lengths)
    end = _walk_end(lengths, seqlen)
    if end == seqlen:
        return _backward(u, delta, A, B, C, D, z, delta_bias, softplus_dt, gate, scale, dout, dlast, ckpt, lengths)
    g = _backward(*[_prefix(t, end) for t in (u, delta)], A, *[_prefix(t, end) for t in (B, C)], D, _prefix(z, end),
                  delta_bias, softplus_dt, gate, scale, dout[..., :end], dlast,
                  ckpt[:checkpoint_numel(R, batch, dim, end, A.shape[-1])], lengths)
    for name in ("du", "ddelta", "dB", "dC", "dz"):  # per-position gradients: zeros after the walks' end
        if g[name] is not None:
            g[name] = _zero_padded(g[name], seqlen)
    return g


def _backward(u, delta, A, B, C, D, z, delta_bias, softplus_dt, gate, scale, dout, dlast, ckpt, lengths):
    """scan_backward over the whole of its inputs, from the forward's checkpoint."""
    R, batch, dim, seqlen = u.shape
    inside = _inside(lengths, seqlen, dlast is not None)
    if inside is not None:  # (the forward's masked u; nothing after the end reaches the outputs)
        u, dout = u * inside[None, :, None, :], dout * inside[:, None, :]
    starts, Y, dt = _split_checkpoint(ckpt, R, batch, dim, seqlen, A.shape[-1])
    x = _Inputs(u, delta, A, B, C, delta_bias, softplus_dt, dt)
    cdt = x.U.dtype
    S, dY, dsz = _output_gradients(dout, z, gate, scale, R, cdt)
    dB, dC, gB, sQA, dA = _adjoint_walk(x, starts, dY, dlast)
    # per-token gradients: u, dt (then delta through softplus), D, the bias, the gates, z
    dU = gB * x.DT
    dpre = gB.mul_(x.U).add_(sQA)  # d dt
    dD = None
    if D is not None:
        dU.addcmul_(dY, D.to(cdt)[None, :, None, :])
        dD = torch.mul(dY, x.U, out=sQA).sum(2).sum(0)
    if softplus_dt:
        dpre.mul_(pre_activation(delta, delta_bias, cdt).sigmoid_())
    dbias = dpre.sum(2).sum(0) if delta_bias is not None else None
    dgate = dz = None
    if gate is not None or z is not None:
        Yfull = _with_skip(Y, x.U, D)
        if gate is not None:  # sum over time and channels of S * (y_r + D u_r), time order irrelevant
            dgate = torch.mul(S, Yfull, out=sQA).sum(3).sum(0).transpose(0, 1)
        if z is not None:
            zf = z.to(cdt).permute(2, 0, 1)
            sig = torch.sigmoid(zf)
            dsilu = (1 - sig).mul_(zf).add_(1).mul_(sig)  # silu'(z) = sig (1 + z (1 - sig)); zf may be z itself
            dz = torch.empty((batch, seqlen, dim), dtype=z.dtype, device=z.device).transpose(1, 2)
            dz.permute(2, 0, 1).copy_(_direction_sum(Yfull, gate, 1.0).mul_(dsz).mul_(dsilu))
    du = _channels_last(dU, u.dtype)
    if inside is not None:  # (direction 1's u past the end sees the adjoint; the kernels write zeros there)
        du.mul_(inside[None, :, None, :])
    return dict(du=du, ddelta=_channels_last(dpre, delta.dtype),
                dA=dA.transpose(-1, -2).contiguous(), dB=_from_scan_order(dB, cdt),
                dC=_from_scan_order(dC, cdt), dD=dD, ddelta_bias=dbias, dz=dz, dgate=dgate)
