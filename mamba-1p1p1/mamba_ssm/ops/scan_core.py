"""The linear recurrence at the heart of the selective scan, vectorised for CPU (and any device).

h_t = a_t * h_{t-1} + b_t is evaluated time-major in two levels: the sequence is cut into ~sqrt(L) chunks,
all chunks are scanned at once from a zero state (one step per position inside a chunk), then the states
at the chunk ends are carried across chunks and folded back in with the chunks' cumulative decays.
That is ~2*sqrt(L) Python steps over whole-batch tensors instead of L small ones. Decays are products of
numbers in (0, 1], so nothing overflows. The selective scan's backward pass is the same recurrence in
reverse (SelectiveScanCore.backward).
"""
import math

import torch


def linear_scan(a, b):
    """Inclusive scan along dim 0: h_t = a_t * h_{t-1} + b_t, h_{-1} = 0. a, b: (L, ...), same shape."""
    length = a.shape[0]
    chunk = max(1, math.isqrt(length - 1) + 1) if length > 1 else 1
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length
    if pad:  # identity steps: a = 1, b = 0
        a = torch.cat([a, a.new_ones((pad,) + a.shape[1:])])
        b = torch.cat([b, b.new_zeros((pad,) + b.shape[1:])])
    a = a.reshape((n_chunks, chunk) + a.shape[1:])
    b = b.reshape((n_chunks, chunk) + b.shape[1:])
    # Step through the positions of all chunks at once; stack once at the end (no per-step strided writes).
    hs, decays = [b[:, 0]], [a[:, 0]]  # state, and cumulative decay since the chunk's start
    for i in range(1, chunk):
        hs.append(torch.addcmul(b[:, i], a[:, i], hs[-1]))
        decays.append(decays[-1] * a[:, i])
    h = torch.stack(hs, dim=1)
    if n_chunks > 1:
        carry = [hs[-1][0]]  # true state at each chunk's end
        for c in range(1, n_chunks):
            carry.append(torch.addcmul(hs[-1][c], decays[-1][c], carry[-1]))
        decay = torch.stack(decays[:-1] + [decays[-1]], dim=1)
        h[1:].addcmul_(decay[1:], torch.stack(carry[:-1]).unsqueeze(1))
    return h.reshape((n_chunks * chunk,) + h.shape[2:])[:length]


class SelectiveScanCore(torch.autograd.Function):
    """y_t = sum_n C_t[n] h_t[n],  h_t = exp(delta_t A) h_{t-1} + delta_t B_t u_t  (per channel).

    Time-major: u, delta: (L, b, G, dg); A: (G, dg, N); B, C: (L, b, G, 1, N), G groups of dg channels.
    Returns y (L, b, G, dg) and the last state (b, G, dg, N). Backward keeps the states and runs the
    adjoint recurrence g_t = C_t dy_t + a_{t+1} g_{t+1} through the same vectorised scan.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C):
        # The state math stays in the inputs' fp32/fp64 even under autocast (einsum would drop to bf16).
        with torch.autocast(u.device.type, enabled=False):
            return SelectiveScanCore._forward(ctx, u, delta, A, B, C)

    @staticmethod
    def _forward(ctx, u, delta, A, B, C):
        decay = torch.exp(delta.unsqueeze(-1) * A)  # (L, b, G, dg, N)
        h = linear_scan(decay, (delta * u).unsqueeze(-1) * B)
        y = torch.einsum("lbgdn,lbgxn->lbgd", h, C)
        ctx.save_for_backward(u, delta, A, B, C, h)
        return y, h[-1]

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u = ctx.saved_tensors[0]
        with torch.autocast(u.device.type, enabled=False):
            return SelectiveScanCore._backward(ctx, grad_y, grad_last)

    @staticmethod
    def _backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, h = ctx.saved_tensors
        grad_y = torch.zeros_like(u) if grad_y is None else grad_y.to(u.dtype)
        if grad_last is not None:
            grad_last = grad_last.to(u.dtype)
        decay = torch.exp(delta.unsqueeze(-1) * A)
        q = grad_y.unsqueeze(-1) * C  # direct dL/dh_t
        if grad_last is not None:
            q[-1] += grad_last
        # Reverse recurrence: flip time; the decay linking step t+1 back to t is a_{t+1}.
        decay_next = torch.cat([decay[1:], torch.zeros_like(decay[:1])])
        g = linear_scan(decay_next.flip(0), q.flip(0)).flip(0)
        h_prev = torch.cat([torch.zeros_like(h[:1]), h[:-1]])
        r = g * h_prev * decay  # dL/d(delta_t A)
        g_b = torch.einsum("lbgdn,lbgxn->lbgd", g, B)  # dL/d(delta_t u_t)
        grad_delta = torch.einsum("lbgdn,gdn->lbgd", r, A) + g_b * u
        grad_A = torch.einsum("lbgdn,lbgd->gdn", r, delta)
        grad_B = torch.einsum("lbgdn,lbgd->lbgn", g, delta * u).unsqueeze(3)
        grad_C = torch.einsum("lbgdn,lbgd->lbgn", h, grad_y).unsqueeze(3)
        return g_b * delta, grad_delta, grad_A, grad_B, grad_C
