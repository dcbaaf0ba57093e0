"""mamba_ssm.ops.triton.layernorm: fused add + RMSNorm / LayerNorm, the reference against the unfused maths and
the Triton kernel against the reference."""
import pytest
import torch
import torch.nn.functional as F

from mamba_ssm.ops.triton.layernorm import RMSNorm, layer_norm_fn, layer_norm_ref, rms_norm_fn
from mamba_ssm.ops.triton.layernorm import layer_norm_triton
from tests.ops.helpers import assert_close_all, grads


@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rmsnorm_matches_unfused(residual_in_fp32, dtype):
    x = torch.randn(3, 7, 16).to(dtype)
    residual = torch.randn(3, 7, 16)
    weight = torch.randn(16)
    out, res_out = rms_norm_fn(x, weight, None, residual=residual, prenorm=True, residual_in_fp32=residual_in_fp32,
                               eps=1e-5)
    s = x.float() + residual
    want = (s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * weight).to(dtype)
    assert res_out.dtype == (torch.float32 if residual_in_fp32 else dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(res_out.float(), s.to(res_out.dtype).float())
    torch.testing.assert_close(out, want)
    # Without prenorm only the normalised tensor comes back; LayerNorm flavour matches F.layer_norm.
    assert torch.equal(rms_norm_fn(x, weight, None, residual=residual, eps=1e-5), out)
    ln = layer_norm_fn(x.float(), weight, torch.zeros(16), eps=1e-5)
    torch.testing.assert_close(ln, F.layer_norm(x.float(), (16,), weight, torch.zeros(16), 1e-5))


def test_rmsnorm_module_first_layer_residual_is_the_input_in_fp32():
    norm = RMSNorm(8)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    out, residual = norm(x, prenorm=True, residual_in_fp32=True)
    assert residual.dtype == torch.float32 and torch.equal(residual, x.float())
    assert norm.bias is None


@pytest.mark.parametrize("is_rms,residual,prenorm,res_fp32,dtype", [
    (True, True, True, True, torch.float32),
    (True, True, True, True, torch.bfloat16),
    (True, False, False, False, torch.float32),
    (False, True, True, False, torch.float32),
    (False, False, True, True, torch.bfloat16),
])
def test_add_norm_matches_reference(is_rms, residual, prenorm, res_fp32, dtype):
    x = torch.randn(3, 5, 96, dtype=dtype)
    res = torch.randn(3, 5, 96, dtype=torch.float32) if residual else None
    w = torch.randn(96)
    b = None if is_rms else torch.randn(96)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, res, w, b)]
    args = (inputs[0], inputs[2], inputs[3], inputs[1], 1e-5, prenorm, res_fp32, is_rms)
    out, ref = layer_norm_triton(*args), layer_norm_ref(*args)
    out, ref = (out if prenorm else (out,)), (ref if prenorm else (ref,))
    for o, r in zip(out, ref):
        assert o.dtype == r.dtype and o.shape == r.shape
    gs = [torch.randn_like(o, dtype=torch.float32).to(o.dtype) for o in out]
    got, want = grads(out, inputs, gs), grads(ref, inputs, gs)
    assert_close_all([*out, *got], [*ref, *want], dtype, ["out", "residual_out", "x", "res", "w", "b"][:len(out)] +
                     [n for n, t in zip(["x", "res", "w", "b"], inputs) if t is not None])



@pytest.mark.parametrize("is_rms", [True, False])
def test_backward_writes_both_dtypes_of_the_input_gradient(is_rms):
    """bf16 x with an fp32 residual: the kernel writes x's gradient in bf16 and the residual's in fp32, the same
    values (to one bf16 step: the interpreter's casts truncate, the GPU's round to nearest), both close to the
    reference's, over several programs (65 rows: 5 blocks of 16, the last one partial)."""
    x = torch.randn(5, 13, 96, dtype=torch.bfloat16)
    res = torch.randn(5, 13, 96)
    w = torch.randn(96)
    b = None if is_rms else torch.randn(96)
    inputs = [t.requires_grad_() if t is not None else None for t in (x, res, w, b)]
    args = (inputs[0], inputs[2], inputs[3], inputs[1], 1e-5, True, True, is_rms)
    gs = [torch.randn(5, 13, 96).to(torch.bfloat16), torch.randn(5, 13, 96)]
    got = grads(layer_norm_triton(*args), inputs, gs)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    torch.testing.assert_close(got[0].float(), got[1], rtol=2 ** -7, atol=0)
    want = grads(layer_norm_ref(*args), inputs, gs)
    assert_close_all(got, want, torch.bfloat16, [n for n, t in zip(["x", "res", "w", "b"], inputs) if t is not None])


@pytest.mark.parametrize("is_rms", [True, False])
def test_inference_without_statistics_computes_the_same(is_rms):
    """No gradient wanted: the kernel stores no mean / rstd (nothing reads them) and allocates none; out and
    residual_out are the same as the training path's, bit for bit, and ask for no statistics buffers."""
    from mamba_ssm.ops.triton.layernorm_kernel import _norm_forward

    x = torch.randn(4, 9, 96, dtype=torch.bfloat16)
    res = torch.randn(4, 9, 96)
    w, b = torch.randn(96), None if is_rms else torch.randn(96)
    with torch.no_grad():
        inference = layer_norm_triton(x, w, b, res, 1e-5, True, True, is_rms)
    training = layer_norm_triton(x, w.requires_grad_(), b, res, 1e-5, True, True, is_rms)
    for got, want in zip(inference, training):
        assert torch.equal(got, want.detach())
    _, _, rstd, mean = _norm_forward(x, w.detach(), b, res, 1e-5, True, is_rms, store_stats=False)
    assert rstd is None and mean is None
