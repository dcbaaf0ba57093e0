"""mamba_ssm.ops.triton.pruning_stage: DyVM's inference pruning stage in four kernels (in Triton's interpreter)
against the ops they replace: split_cls of hidden + residual then F.layer_norm (under autocast for bf16); the
predictor's GELU and pooled half; top-k with its sort, the decision mask and the next policy; gather_index with
two batch_gathers and the slot_to_patch gather."""
import pytest
import torch
import torch.nn.functional as F

from dyvm.models.predictor import TokenScorePredictor
from dyvm.pruning import batch_gather, gather_index, indices_to_mask, sorted_topk, split_cls
from mamba_ssm.ops.triton.pruning_stage import gather_stage, patch_layer_norm, pool_concat, select_top_k

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("policy_kind", ["ones", "some pruned"])
def test_pool_concat_is_the_predictors_gelu_and_pooled_half(dtype, policy_kind):
    """40 slots (two row blocks of 32) and 144 channels (a half of 72: two column blocks, the second masked)."""
    x = (torch.randn(BATCH, 40, 144) * 2).to(dtype)
    policy = torch.ones(BATCH, 40) if policy_kind == "ones" else (torch.rand(BATCH, 40) > 0.4).float()
    got = pool_concat(x, policy)
    want = TokenScorePredictor._pool(F.gelu(x), policy.unsqueeze(-1)).to(dtype)  # (autocast's cast: once)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:  # the interpreter's erf and the mean's order of sums: a few ulps
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:  # rounded to nearest as the GPU does (not the interpreter's truncation): one bf16 step apart, rarely
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=1e-6)
        assert (got != want).float().mean() < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_top_k_keeps_the_same_slots_as_the_ops(dtype):
    """150 slots (three blocks of 64 each way), scores with many ties (a few distinct values), read through
    log-probabilities' strides; 300 patches (two blocks of the decision's row). Ties at the k-th place go to the
    lower slots, as sorted_topk's stable sort (and torch.topk on CUDA) resolve them."""
    n_slots, n_patches, k = 150, 300, 97
    log_probs = torch.randint(-6, 0, (BATCH, n_slots, 2)).to(dtype) / 4
    log_probs[0, 5, 0] = float("nan")  # NaN ranks above everything (torch's sort and topk both)
    slot_to_patch = torch.stack([torch.randperm(n_patches)[:n_slots] for _ in range(BATCH)])
    index, decision, policy = select_top_k(log_probs[..., 0], slot_to_patch, k, n_patches)
    want = sorted_topk(log_probs[..., 0], k)
    assert index.dtype == torch.int64 and torch.equal(index, want)
    assert 5 in index[0]
    assert torch.equal(decision, indices_to_mask(slot_to_patch.gather(1, want), n_patches))
    assert torch.equal(policy, torch.ones(BATCH, k))


def test_sorted_topk_gives_ties_to_the_lower_slots():
    score = torch.tensor([[1.0, 2.0, 1.0, 2.0, 1.0, 0.0]])
    assert sorted_topk(score, 3).tolist() == [[0, 1, 3]]
    assert sorted_topk(score, 4).tolist() == [[0, 1, 2, 3]]


def test_pruning_stage_kernels_refuse_inputs_that_do_not_fit():
    hidden, residual = _streams(torch.float32)
    with pytest.raises(ValueError, match="pruning stage"):
        patch_layer_norm(hidden, residual, LENGTH, torch.ones(WIDTH), torch.zeros(WIDTH), 1e-5, torch.float32)
    with pytest.raises(ValueError, match="pruning stage"):
        patch_layer_norm(hidden, residual[:, :4], 0, torch.ones(WIDTH), torch.zeros(WIDTH), 1e-5, torch.float32)
    index = torch.zeros(BATCH, 2, dtype=torch.int32)
    with pytest.raises(ValueError, match="pruning stage"):
        gather_stage(hidden, residual, torch.zeros(BATCH, LENGTH - 1, dtype=torch.int64), index, 0, 0)
    with pytest.raises(ValueError, match="pruning stage"):
        pool_concat(torch.randn(BATCH, 9, 23), torch.ones(BATCH, 9))  # an odd width
    with pytest.raises(ValueError, match="pruning stage"):
        pool_concat(torch.randn(BATCH, 9, 24), torch.ones(BATCH, 9, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="pruning stage"):
        select_top_k(torch.randn(BATCH, 9), torch.zeros(BATCH, 9, dtype=torch.int64), 10, 20)  # more than there are
