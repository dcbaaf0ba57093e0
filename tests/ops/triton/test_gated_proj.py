"""mamba_ssm.ops.triton.gated_proj: x_proj and dt_proj of DyVM's gated inference for the (sample, direction) pairs
that are on, in Triton's interpreter, against the batched matmuls they replace."""
import pytest
import torch

from mamba_ssm.ops.triton.gated_proj import gate_head_decide, gated_projections


def _inputs(dtype, batch=3, dim=40, seqlen=70, dt_rank=5, d_state=4):
    xc = torch.randn(2, batch, seqlen, dim).to(dtype).transpose(2, 3)  # channel-contiguous, as the conv writes it
    x_proj = (torch.randn(2, dt_rank + 2 * d_state, dim) / dim ** 0.5).to(dtype)
    dt_proj = (torch.randn(2, dim, dt_rank) / dt_rank ** 0.5).to(dtype)
    gate = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])[:batch]
    return xc, x_proj, dt_proj, gate, dt_rank


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_projections_equal_the_matmuls_where_the_gate_is_on(dtype):
    xc, x_proj, dt_proj, gate, dt_rank = _inputs(dtype)
    batch, dim, seqlen = xc.shape[1:]
    x_dbl, delta = gated_projections(xc, x_proj, dt_proj, gate)
    rows = xc.transpose(2, 3).reshape(2, batch * seqlen, dim)
    want_dbl = torch.bmm(rows.float(), x_proj.float().transpose(1, 2))
    want_delta = torch.bmm(want_dbl[..., :dt_rank].to(dtype).float(), dt_proj.float().transpose(1, 2))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for b in range(batch):
        for r in range(2):
            sl = slice(b * seqlen, (b + 1) * seqlen)
            if gate[b, r] != 0:  # off pairs: rows left unwritten (the scan skips them)
                torch.testing.assert_close(x_dbl[r, sl].float(), want_dbl[r, sl], **tol)
                torch.testing.assert_close(delta[r, sl].float(), want_delta[r, sl], **tol)
    assert x_dbl.dtype == delta.dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_projections_compute_the_gates_with_the_head_kernels_code(dtype):
    """With a head (xz, column, weight, bias) the kernel writes the gates itself: the same gates as the head's own
    kernel, and the same outputs as the kernel given those gates (bit for bit), the rows of the off pairs left
    alone. Logits of both signs: the head is chosen so that some pairs are off."""
    torch.manual_seed(1)
    xc, x_proj, dt_proj, _, _ = _inputs(dtype, batch=6)
    batch, dim, seqlen = xc.shape[1:]
    xz = torch.randn(batch, seqlen, 2 * dim).to(dtype).transpose(1, 2)  # in_proj's channels-last output
    weight, bias = torch.randn(2, 2 * dim) * 0.2, torch.randn(2) * 0.3
    want_gate = gate_head_decide(xz, 3, weight, bias, torch.empty(batch, 2, dtype=dtype))
    assert 0 < want_gate.float().mean() < 1
    want = gated_projections(xc, x_proj, dt_proj, want_gate)
    gate = torch.full((batch, 2), 7.0, dtype=dtype)
    got = gated_projections(xc, x_proj, dt_proj, gate, head=(xz, 3, weight, bias))
    assert torch.equal(gate, want_gate)
    for b in range(batch):
        for r in range(2):
            if want_gate[b, r] != 0:
                sl = slice(b * seqlen, (b + 1) * seqlen)
                assert torch.equal(got[0][r, sl], want[0][r, sl]) and torch.equal(got[1][r, sl], want[1][r, sl])


def test_gated_projections_in_three_tf32_products_are_as_close_to_fp64_as_fp32():
    """fp32 with the weights' TF32 parts (tf32_parts, as the fp32 Linears take them): the products come out within
    fp32 rounding of the fp64 matmuls (dt_proj from the fp32 dt it wrote), where one TF32 product would be about
    1e-3 off; the off pairs' rows are left alone."""
    from mamba_ssm.ops.triton.linear_tf32x3 import split_tf32

    torch.manual_seed(2)
    xc, x_proj, dt_proj, gate, dt_rank = _inputs(torch.float32, dim=72, dt_rank=6)
    batch, dim, seqlen = xc.shape[1:]
    with pytest.raises(ValueError, match="TF32 parts"):  # (checked with the launch's plan: before the first call)
        gated_projections(xc, x_proj, dt_proj, gate, tf32_parts=(split_tf32(x_proj), split_tf32(x_proj)))
    x_dbl, delta = gated_projections(xc, x_proj, dt_proj, gate, tf32_parts=(split_tf32(x_proj), split_tf32(dt_proj)))
    rows = xc.transpose(2, 3).reshape(2, batch * seqlen, dim).double()
    want_dbl = torch.bmm(rows, x_proj.double().transpose(1, 2))
    want_delta = torch.bmm(x_dbl[..., :dt_rank].double(), dt_proj.double().transpose(1, 2))
    on = gate.t().repeat_interleave(seqlen, dim=1).bool()  # (2, b*L) rows of the pairs that are on
    for got, want in ((x_dbl, want_dbl), (delta, want_delta)):
        err = (got[on].double() - want[on]).abs().max() / want[on].abs().max()
        assert err < 1e-6, err


def test_gated_projections_refuse_what_does_not_fit():
    xc, x_proj, dt_proj, gate, _ = _inputs(torch.float32)
    with pytest.raises(ValueError, match="gated projections"):
        gated_projections(xc.contiguous(), x_proj, dt_proj, gate)  # time-contiguous
    with pytest.raises(ValueError, match="gated projections"):
        gated_projections(xc, x_proj, dt_proj, gate[:2])
