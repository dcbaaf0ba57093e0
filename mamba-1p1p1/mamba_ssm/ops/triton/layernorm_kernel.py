"""Triton fused residual-add + RMSNorm / LayerNorm, forward and backward (semantics of layer_norm_ref).

Forward, per row: r = x + residual (fp32), residual_out = r (fp32 when residual_in_fp32), out = norm(r)
* weight (+ bias), in x's dtype. One program normalises BLOCK_M rows held whole in registers (Vim's
widths are 192 to 768). Backward recomputes x_hat from the saved residual_out and rstd; the weight and
bias gradients are per-program partial sums reduced with torch (deterministic). (Programs that took 2 or 4 blocks
of rows each, for fewer partial sums, were slower: 62 and 72 against 61 us at Vim-S training shapes, sum included.)
"""
import torch
import triton
import triton.language as tl

from causal_conv1d.triton_utils import launch, row_blocks


@triton.jit
def _norm_fwd_kernel(x_ptr, res_ptr, w_ptr, b_ptr, out_ptr, res_out_ptr, rstd_ptr, mean_ptr, n_rows, n_cols, eps,
                     HAS_RES: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STORE_STATS: tl.constexpr = True):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask = mask_r[:, None] & (cols < n_cols)[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    r = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r += tl.load(res_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_out_ptr + offs, r.to(res_out_ptr.dtype.element_ty), mask=mask)
    if IS_RMS:
        xc = r
    else:
        mean = tl.sum(r, axis=1) / n_cols
        if STORE_STATS:
            tl.store(mean_ptr + rows, mean, mask=mask_r)
        xc = tl.where(mask, r - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / n_cols + eps)
    if STORE_STATS:
        tl.store(rstd_ptr + rows, rstd, mask=mask_r)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * w[None, :]
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_bwd_kernel(res_out_ptr, w_ptr, dy_ptr, dres_ptr, rstd_ptr, mean_ptr, dx_ptr, dx2_ptr, dw_ptr, db_ptr,
                     n_rows, n_cols,
                     HAS_DRES: tl.constexpr, HAS_BIAS: tl.constexpr, IS_RMS: tl.constexpr, HAS_DX2: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dx of BLOCK_M rows, in dx_ptr's dtype (and in dx2_ptr's too with HAS_DX2), and their partial sums of dw
    (db): one row a program."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    mask_r = rows < n_rows
    mask_c = cols < n_cols
    mask = mask_r[:, None] & mask_c[None, :]
    offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
    r = tl.load(res_out_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=mask_r, other=0.0)
    if IS_RMS:
        xhat = r * rstd[:, None]
    else:
        mean = tl.load(mean_ptr + rows, mask=mask_r, other=0.0)
        xhat = tl.where(mask, (r - mean[:, None]) * rstd[:, None], 0.0)
    w = tl.load(w_ptr + cols, mask=mask_c, other=0.0).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dxhat = dy * w[None, :]
    c1 = tl.sum(dxhat * xhat, axis=1) / n_cols
    if IS_RMS:
        dx = (dxhat - xhat * c1[:, None]) * rstd[:, None]
    else:
        c2 = tl.sum(dxhat, axis=1) / n_cols
        dx = (dxhat - xhat * c1[:, None] - c2[:, None]) * rstd[:, None]
    if HAS_DRES:
        dx += tl.load(dres_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if HAS_DX2:
        tl.store(dx2_ptr + offs, dx.to(dx2_ptr.dtype.element_ty), mask=mask)
    tl.store(dw_ptr + pid * n_cols + cols, tl.sum(dy * xhat, axis=0), mask=mask_c)
    if HAS_BIAS:
        tl.store(db_ptr + pid * n_cols + cols, tl.sum(dy, axis=0), mask=mask_c)


def _norm_forward(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm, store_stats=True):
    """-> out, residual_out (both x's shape, contiguous), rstd, mean (rstd again for RMSNorm; both None without
    store_stats: inference, where no backward reads them). The kernel reads and writes rows of n_cols through
    plain pointers, so no 2-D views are made (each a dispatch)."""
    dtype = x.dtype
    x = x.contiguous()
    residual = residual.contiguous() if residual is not None else None
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    out = torch.empty_like(x)  # (x contiguous: so is out. empty_like: a quicker call than torch.empty)
    res_out = torch.empty_like(x, dtype=torch.float32) if residual_in_fp32 else torch.empty_like(x)
    rstd = mean = None
    if store_stats:
        rstd = torch.empty((n_rows,), device=x.device, dtype=torch.float32)
        mean = torch.empty_like(rstd) if not is_rms_norm else rstd
    block_m, block_n = row_blocks(n_cols)
    launch(_norm_fwd_kernel, (-(-n_rows // block_m),),
        x, residual if residual is not None else x, weight, bias if bias is not None else weight, out, res_out,
        rstd if store_stats else out, mean if store_stats else out, n_rows, n_cols, eps, HAS_RES=residual is not None,
        HAS_BIAS=bias is not None, IS_RMS=is_rms_norm, BLOCK_M=block_m, BLOCK_N=block_n, STORE_STATS=store_stats,
        num_warps=4)
    return out, res_out, rstd, mean


class LayerNormTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, eps, prenorm, residual_in_fp32, is_rms_norm):
        shape, dtype = x.shape, x.dtype
        out, res_out, rstd, mean = _norm_forward(x, weight, bias, residual, eps, residual_in_fp32, is_rms_norm)
        # backward recomputes x_hat from residual_out (rounded to x's dtype unless residual_in_fp32, as upstream)
        ctx.save_for_backward(res_out, weight, bias, rstd, mean)
        ctx.meta = (shape, dtype, residual is not None, residual.dtype if residual is not None else None,
                    is_rms_norm, prenorm)
        out = out.reshape(shape)
        if prenorm:
            return out, res_out.reshape(shape)
        return out

    @staticmethod
    def backward(ctx, dy, dres_out=None):
        res_out, weight, bias, rstd, mean = ctx.saved_tensors
        shape, dtype, has_res, res_dtype, is_rms_norm, prenorm = ctx.meta
        dx, dres, dw, db = _norm_backward(dy, dres_out if prenorm else None, res_out, weight, bias, rstd, mean,
                                          dtype, res_dtype if has_res else None, is_rms_norm)
        return dx.reshape(shape), dw, db, None if dres is None else dres.reshape(shape), None, None, None, None


def _norm_backward(dy, dres_out, res_out, weight, bias, rstd, mean, dtype, res_dtype, is_rms_norm):
    """-> the gradients of x (in `dtype`), of the residual (in res_dtype; None: there is none), of the weight and
    the bias, (rows, n_cols) and (n_cols,). x's and the residual's are the same values, written by the kernel in
    both dtypes where they differ: a cast afterwards read and wrote the whole gradient again, 83 against 60 us a
    call with the weight's sum at Vim-S bf16 training shapes on an H200 (train_small_ops_h200_2026-11-29.txt)."""
    n_cols = res_out.shape[-1]
    dy2 = dy.reshape(-1, n_cols).contiguous()
    dres2 = dres_out.reshape(-1, n_cols).contiguous() if dres_out is not None else None
    n_rows = dy2.shape[0]
    block_m, block_n = row_blocks(n_cols)
    n_prog = -(-n_rows // block_m)
    dx = torch.empty((n_rows, n_cols), device=dy.device, dtype=dtype)
    dres = None if res_dtype is None else dx if res_dtype == dtype else torch.empty_like(dx, dtype=res_dtype)
    dw = torch.empty((n_prog, n_cols), device=dy.device, dtype=torch.float32)
    db = torch.empty_like(dw) if bias is not None else None
    launch(_norm_bwd_kernel, (n_prog,),
        res_out, weight, dy2, dres2 if dres2 is not None else dy2, rstd, mean, dx, dres if dres is not None else dx,
        dw, db if db is not None else dw, n_rows, n_cols, HAS_DRES=dres2 is not None, HAS_BIAS=bias is not None,
        IS_RMS=is_rms_norm, HAS_DX2=dres is not None and dres is not dx, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4)
    return dx, dres, dw.sum(0).to(weight.dtype), None if bias is None else db.sum(0).to(bias.dtype)
