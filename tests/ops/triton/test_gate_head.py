"""mamba_ssm.ops.triton.gated_proj.gate_head_decide: DyVM's inference gate head as one kernel (in Triton's interpreter) against the
ops it replaces: the class column of xz, F.linear (under autocast for bf16), then > 0."""
import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops.triton.gated_proj import gate_head_decide


def _reference(xz, column, weight, bias, dtype):
    cols = xz[:, :, column]
    if dtype == torch.float32:
        return (F.linear(cols, weight, bias) > 0).to(dtype)
    with torch.autocast("cpu", dtype=dtype):
        logits = F.linear(cols, weight, bias)
    return (logits > 0).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [True, False])
def test_gate_kernel_matches_the_head_and_comparison(dtype, channels_last):
    torch.manual_seed(0)
    batch, width, seqlen = 33, 48, 7
    xz = torch.randn(batch, seqlen, width).transpose(1, 2) if channels_last else torch.randn(batch, width, seqlen)
    xz = xz.to(dtype) if dtype != torch.float32 else xz
    weight, bias = torch.randn(2, width) * 0.3, torch.randn(2) * 0.5
    for column in (0, 3, seqlen - 1):
        rows = torch.full((4, batch, 2), 7.0, dtype=dtype)
        got = gate_head_decide(xz, column, weight, bias, rows[2])
        want = _reference(xz.float() if dtype == torch.float32 else xz, column, weight, bias, dtype)
        assert got.data_ptr() == rows[2].data_ptr() and torch.equal(got, want)
        assert 0 < want.mean() < 1  # both decisions occur
        assert (rows[[0, 1, 3]] == 7.0).all()  # the other rows untouched


def test_gate_kernel_rejects_shapes_that_do_not_fit():
    xz = torch.randn(2, 8, 5)
    with pytest.raises(ValueError, match="gate head"):
        gate_head_decide(xz, 0, torch.randn(2, 6), torch.randn(2), torch.empty(2, 2))
