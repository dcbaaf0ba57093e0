"""mamba_ssm.ops.triton.pruning_stage: DyVM's inference pruning stage in two kernels (in Triton's interpreter)
against the ops they replace: split_cls of hidden + residual then F.layer_norm (under autocast for bf16), and
gather_index with two batch_gathers and the slot_to_patch gather."""
import pytest
import torch
import torch.nn.functional as F

from dyvm.pruning import batch_gather, gather_index, split_cls
from mamba_ssm.ops.triton.pruning_stage import gather_stage, patch_layer_norm

BATCH, LENGTH, WIDTH = 3, 10, 24  # a width that is not a power of two: the masked columns


def _streams(hidden_dtype):
    hidden = torch.randn(BATCH, LENGTH, WIDTH).to(hidden_dtype)
    residual = torch.randn(BATCH, LENGTH, WIDTH) * 3 + 1  # fp32, as the model carries it
    return hidden, residual


@pytest.mark.parametrize("cls_position", [0, 4, LENGTH - 1])
@pytest.mark.parametrize("hidden_dtype, out_dtype", [(torch.float32, torch.float32),
                                                     (torch.bfloat16, torch.bfloat16),
                                                     (torch.bfloat16, torch.float32)])
def test_patch_layer_norm_is_the_layer_norm_of_the_patch_tokens(cls_position, hidden_dtype, out_dtype):
    hidden, residual = _streams(hidden_dtype)
    weight, bias = torch.randn(WIDTH), torch.randn(WIDTH)
    got = patch_layer_norm(hidden, residual, cls_position, weight, bias, 1e-5, out_dtype)
    patches = split_cls(hidden + residual, cls_position)[1]
    want = F.layer_norm(patches, (WIDTH,), weight, bias, 1e-5)  # in fp32, as autocast runs it
    assert got.shape == (BATCH, LENGTH - 1, WIDTH) and got.dtype == out_dtype
    if out_dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # the same fp32 values rounded once: one bf16 step apart at most (Triton's interpreter truncates to bf16
        # where a GPU rounds to nearest; the GPU check is benchmarks/gpu_check.py --sections stage)
        assert (got.float() - want.to(out_dtype).float()).abs().max() <= 2 ** -7 * want.abs().max()
    alone = patch_layer_norm(hidden, None, cls_position, weight, bias, 1e-5, out_dtype)
    want_alone = F.layer_norm(split_cls(hidden.float(), cls_position)[1], (WIDTH,), weight, bias, 1e-5)
    torch.testing.assert_close(alone.float(), want_alone, rtol=1e-2 if out_dtype != torch.float32 else 1e-5,
                               atol=1e-2 if out_dtype != torch.float32 else 1e-5)


@pytest.mark.parametrize("cls_position, new_cls_position", [(4, 3), (0, 0), (LENGTH - 1, 2)])
def test_gather_stage_equals_the_gathers_bit_for_bit(cls_position, new_cls_position):
    hidden, residual = _streams(torch.bfloat16)
    slot_to_patch = torch.stack([torch.randperm(40)[:LENGTH - 1] for _ in range(BATCH)])
    keep = 6
    index = torch.stack([torch.randperm(LENGTH - 1)[:keep].sort().values for _ in range(BATCH)])
    got = gather_stage(hidden, residual, slot_to_patch, index, cls_position, new_cls_position)
    source = gather_index(index, cls_position, new_cls_position)
    want = batch_gather(hidden, source), batch_gather(residual, source), slot_to_patch.gather(1, index)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape and torch.equal(g, w)


def test_pruning_stage_kernels_refuse_inputs_that_do_not_fit():
    hidden, residual = _streams(torch.float32)
    with pytest.raises(ValueError, match="pruning stage"):
        patch_layer_norm(hidden, residual, LENGTH, torch.ones(WIDTH), torch.zeros(WIDTH), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="pruning stage"):
        patch_layer_norm(hidden, residual[:, :4], 0, torch.ones(WIDTH), torch.zeros(WIDTH), 1e-5, torch.float32)
    index = torch.zeros(BATCH, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="pruning stage"):
        gather_stage(hidden, residual, torch.zeros(BATCH, LENGTH - 1, dtype=torch.int64), index, 0, 0)
