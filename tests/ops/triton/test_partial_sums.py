"""causal_conv1d.partial_sums: per-sample rows of gradients added up in one launch, against torch's sums."""
import pytest
import torch

from causal_conv1d.partial_sums import BLOCK_N, BLOCK_Q, sum_middle


def test_sums_up_to_three_buffers_in_one_launch_against_torch():
    """Shapes around the kernel's tiles (rows not a multiple of BLOCK_N, columns of BLOCK_Q, a column of one, more
    rows than columns), fp32 and bf16 inputs: each the sum over its middle axis, in fp32; None passes through."""
    torch.manual_seed(0)
    parts = [torch.randn(2, BLOCK_N + 5, BLOCK_Q + 3), torch.randn(5, 2 * BLOCK_N, 7).to(torch.bfloat16),
             torch.randn(6, 3, 1)]
    sums = sum_middle(*parts)
    for got, t in zip(sums, parts):
        assert got.dtype == torch.float32 and got.shape == (t.shape[0], t.shape[2])
        torch.testing.assert_close(got, t.float().sum(1), rtol=1e-5, atol=1e-5)
    first, none, second = sum_middle(parts[0], None, parts[2])
    assert none is None and torch.equal(first, sums[0]) and torch.equal(second, sums[2])


def test_rejects_what_it_cannot_sum():
    with pytest.raises(ValueError, match="contiguous"):
        sum_middle(torch.randn(3, 4, 5).transpose(0, 2))
    with pytest.raises(ValueError, match="up to three"):
        sum_middle(*[torch.randn(1, 2, 3)] * 4)
