"""The DyVM patch: both scans of a bidirectional (Vim "v2") layer in one call, with per-sample direction
gates and training-time token masks.

    out = scale * (g_f * Y(x, z) + g_b * flip(Y(flip(x), flip(z))))     scale = 1/2 if divide_out else 1
    Y(x, z) = selective_scan(conv_silu(x * m) * m, dt, A, B, C, D, z)  with dt, B, C from x_proj/dt_proj

xz: (batch, 2*d_inner, L) = in_proj output (x then z); gate: (batch, 2) per-sample gates [forward,
backward], None = both on; mask: (batch, L) token mask of the rearranged training sequence (1 keep,
0 pruned; the backward scan sees it flipped), None = all kept; lengths: (batch,) int32 with the mask, whose
zeros must be exactly sample i's positions from lengths[i] on (DyVM's kept-first training sequence): the scans
skip those positions (as if u were 0 there: direction 1 enters the sequence with the zero state), the output
there is 0, and the conv kernels skip what is zero there. None = L.
Returns (batch, d_inner, L), before out_proj.

Where the mask's zeros are exactly the positions from lengths on (a DyVM training sequence: kept tokens first),
lengths changes only the work: a masked position feeds u = 0, hence B = C = 0 (x_proj has no bias), so it adds
nothing to the state and its output is 0 with or without lengths. The gradients are the same too where none
arrives at the output there (DyVM: no loss term reads a pruned token; one arriving would reach C through the
state and u through D).

Gates multiply their direction's output, so gradients reach them. A (sample, direction) whose gate is
exactly 0 contributes zeros whatever its input; with no gradient needed (inference) the kernels do not
compute it at all.

`bimamba_v2_inner_fn` runs both directions at once on the stacked conv and scan ops (bimamba_stacked.py;
Triton kernels for CUDA tensors, the PyTorch implementations otherwise); `bimamba_v2_inner_ref` is the
formula above computed one direction at a time on flipped copies (MAMBA_FORCE_REFERENCE=1 selects it).
"""
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from causal_conv1d.causal_conv1d_interface import causal_conv1d_ref
from causal_conv1d.launch_replay import eager_replays_apply, family_failed, replayed
from mamba_ssm.ops.bimamba_stacked import bimamba_v2_inner_stacked
from causal_conv1d.kernel_utils import tf32_matmuls_allowed
from mamba_ssm.ops.dispatch import FORCE_REFERENCE_ENV, needs_grad, reference_forced
from mamba_ssm.ops.selective_scan_interface import selective_scan_ref


class ScanWeights(NamedTuple):
    """One direction's parameters. conv_weight (d_inner, width) or (d_inner, 1, width); A = -exp(A_log), fp32."""
    conv_weight: Tensor
    conv_bias: Optional[Tensor]
    x_proj_weight: Tensor  # (dt_rank + 2 * d_state, d_inner)
    dt_proj_weight: Tensor  # (d_inner, dt_rank)
    dt_proj_bias: Optional[Tensor]  # (d_inner,)
    A: Tensor  # (d_inner, d_state)
    D: Optional[Tensor]  # (d_inner,)


def _check(xz, fwd, gate, mask, lengths=None):
    if xz.dim() != 3 or xz.shape[1] != 2 * fwd.A.shape[0]:
        raise ValueError(f"xz must be (batch, 2*d_inner={2 * fwd.A.shape[0]}, L), got {tuple(xz.shape)}")
    if gate is not None and gate.shape != (xz.shape[0], 2):
        raise ValueError(f"gate must be (batch, 2) = [forward, backward], got {tuple(gate.shape)}")
    if mask is not None and mask.shape != (xz.shape[0], xz.shape[2]):
        raise ValueError(f"mask must be (batch, L) = {(xz.shape[0], xz.shape[2])}, got {tuple(mask.shape)}")
    if lengths is not None and (lengths.shape != (xz.shape[0],) or lengths.dtype != torch.int32):
        raise ValueError(f"lengths must be int32 of shape (batch,) = ({xz.shape[0]},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    if lengths is not None and mask is None:
        raise ValueError("lengths ends the sequence where its mask does: give the mask too")


def scan_direction_ref(x, z, w: ScanWeights, mask=None, inside=None):
    """One direction: (batch, d_inner, L) x and z -> z-gated scan output (batch, d_inner, L). inside (batch, L)
    bool: where the scan's input is kept (lengths; see the module docstring)."""
    if mask is not None:
        x = x * mask.unsqueeze(1).to(x.dtype)
    x = causal_conv1d_ref(x, w.conv_weight.reshape(w.conv_weight.shape[0], -1), w.conv_bias, activation="silu")
    if mask is not None:  # also zeroes the conv bias at pruned slots, so they feed nothing into the state
        x = x * mask.unsqueeze(1).to(x.dtype)
    if inside is not None:
        x = x * inside.unsqueeze(1)
    dt_rank, d_state = w.dt_proj_weight.shape[1], w.A.shape[1]
    x_dbl = F.linear(x.transpose(1, 2), w.x_proj_weight)  # (batch, L, dt_rank + 2*d_state)
    dt = (x_dbl[..., :dt_rank] @ w.dt_proj_weight.t()).transpose(1, 2)
    B = x_dbl[..., dt_rank:dt_rank + d_state].transpose(1, 2)
    C = x_dbl[..., dt_rank + d_state:].transpose(1, 2)
    return selective_scan_ref(x, dt, w.A, B, C, w.D, z=z, delta_bias=w.dt_proj_bias, delta_softplus=True)


def bimamba_v2_inner_ref(xz, fwd: ScanWeights, bwd: ScanWeights, gate=None, mask=None, divide_out=True,
                         lengths=None):
    """Reference for `bimamba_v2_inner_fn` (see the module docstring): lengths by masking, each sample's scan
    input zeroed after its end, and its output too."""
    _check(xz, fwd, gate, mask, lengths)
    x, z = xz.chunk(2, dim=1)
    inside = None if lengths is None else torch.arange(x.shape[2], device=x.device) < lengths[:, None]
    skip_off = gate is not None and not needs_grad(xz, gate, *fwd, *bwd)
    out = torch.zeros_like(x)
    for direction, w in enumerate((fwd, bwd)):
        flip = (lambda t: t.flip(-1)) if direction else (lambda t: t)  # noqa: E731
        m = None if mask is None else flip(mask)
        ins = None if inside is None else flip(inside)
        if gate is None:
            out = out + flip(scan_direction_ref(flip(x), flip(z), w, m, ins))
            continue
        g = gate[:, direction].to(x.dtype)
        if skip_off:  # run only the samples whose gate is on (the reference's way; the kernel skips in place)
            on = (g != 0).nonzero().squeeze(1)
            if on.numel():
                y = scan_direction_ref(flip(x[on]), flip(z[on]), w, None if m is None else m[on],
                                       None if ins is None else ins[on])
                out = out.index_add(0, on, flip(y) * g[on, None, None])
        else:
            out = out + flip(scan_direction_ref(flip(x), flip(z), w, m, ins)) * g[:, None, None]
    if lengths is not None:
        out = out * inside[:, None, :]
    return out / 2 if divide_out else out


def bimamba_v2_inner_fn(xz, fwd: ScanWeights, bwd: ScanWeights, gate=None, mask=None, divide_out=True,
                        stacked=None, lengths=None, gate_head=None):
    """Both directions of a Vim v2 layer in one call (see the module docstring). stacked: optionally
    mamba_ssm.ops.bimamba_stacked.stack_directions(fwd, bwd), cached by the caller (the ops' form).
    gate_head (column, weight, bias): the gates are still to be computed into `gate`, from xz's column `column`
    by DyVM's gate head (inference on the kernels: dyvm.models.mixer.DynamicMamba.gate_head_for)."""
    _check(xz, fwd, gate, mask, lengths)
    if gate_head is not None and gate is None:
        raise ValueError("gate_head needs the gate tensor it is to write")
    if reference_forced():
        if gate_head is not None:
            raise ValueError(f"gate_head runs on the kernels only, and {FORCE_REFERENCE_ENV} is set")
        return bimamba_v2_inner_ref(xz, fwd, bwd, gate, mask, divide_out, lengths)
    if launch_replay_applies(xz, gate, mask, stacked, lengths):
        head = None if gate_head is None else (gate_head[0], id(gate_head[1]), id(gate_head[2]))
        # (layers that fail alike: dense 16-bit ones take cuBLAS's projections, which no replay makes)
        family = ("launch replay", xz.dtype, gate is None, head is None)
        if not family_failed(stacked.memo, family):
            key = ("launch replay", xz.shape, xz.stride(), xz.dtype, xz.device, xz.data_ptr() & 15, head, divide_out,
                   None if gate is None else (gate.stride(), gate.dtype, gate.data_ptr() & 15), id(fwd), id(bwd),
                   tf32_matmuls_allowed())
            call = lambda: bimamba_v2_inner_stacked(xz, fwd, bwd, gate, None, divide_out, stacked,  # noqa: E731
                                                    None, gate_head)
            return replayed(stacked.memo, key, call, (xz, gate), (fwd, bwd, stacked, gate_head), family)
    return bimamba_v2_inner_stacked(xz, fwd, bwd, gate, mask, divide_out, stacked, lengths, gate_head)


def launch_replay_applies(xz, gate, mask, stacked, lengths) -> bool:
    """Whether this call is made by replaying its kernel launches (causal_conv1d.launch_replay): eager inference on
    the GPU's kernels with a layer's cached inference weights (their memo keeps the plans, which go with them when
    the weights change), no mask or lengths (training's), and launch_replay.eager_replays_apply. Everything the path's choices depend on is in the key above: shapes,
    strides, dtypes, the inputs' alignment, the gate head, divide_out, the weights and TF32's switch."""
    return (mask is None and lengths is None and stacked is not None and isinstance(stacked.memo, dict)
            and not needs_grad(xz, gate, *stacked.tensors()) and eager_replays_apply(xz))
