"""mamba_ssm.ops.triton.linear_tf32x3 and its op layer mamba_ssm.ops.linear_fp32: the mixers' fp32 Linear layers as
three TF32 products, in Triton's interpreter (whose products are plain fp32), against F.linear in fp64."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from causal_conv1d.kernel_utils import triton_on_cpu
from mamba_ssm.ops import linear_fp32
from mamba_ssm.ops.triton import linear_tf32x3 as kernel


def _x(layout, batch=3, seqlen=77, width=40):
    """(batch, L, K) fp32 in the layouts the mixers hand over: contiguous, a transposed view (out_proj reads
    the scan's channel-contiguous output that way), and a view into wider rows."""
    if layout == "contiguous":
        return torch.randn(batch, seqlen, width)
    if layout == "transposed":
        return torch.randn(batch, width, seqlen).transpose(1, 2)
    return torch.randn(batch, seqlen, 2 * width)[..., width:]


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "sliced"])
@pytest.mark.parametrize("out_features, with_bias", [(70, True), (300, False)])  # one tile of columns, several
def test_kernel_equals_the_fp64_product(layout, out_features, with_bias):
    x = _x(layout)
    w = torch.randn(out_features, x.shape[-1]) / x.shape[-1] ** 0.5
    bias = torch.randn(out_features) if with_bias else None
    got = kernel.linear_tf32x3(x, *kernel.split_tf32(w), bias)
    want = F.linear(x.double(), w.double(), None if bias is None else bias.double())
    assert got.shape == want.shape and got.is_contiguous() and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def _low_bits(t):
    return t.view(torch.int32) & 0x1FFF


@pytest.mark.parametrize("transposed", [False, True])
def test_split_gives_two_tf32_parts_that_sum_to_the_weight(transposed):
    """hi: the weight rounded to the nearest TF32 value; lo: the rest, rounded to TF32 too (exact TF32 values, so the
    tensor cores' products of them are exact); the weight's transposed view is read in place."""
    w = torch.randn(33, 50) * torch.logspace(-3, 3, 50)
    if transposed:
        w = torch.randn(50, 33).t()
    hi, lo = kernel.split_tf32(w)
    assert hi.shape == lo.shape == w.shape and hi.is_contiguous() and lo.is_contiguous()
    assert not _low_bits(hi).any() and not _low_bits(lo).any()
    wd = w.double()
    assert ((wd - hi.double()).abs() <= wd.abs() * 2.0 ** -11).all()  # half a TF32 step: to nearest
    assert ((wd - hi.double() - lo.double()).abs() <= wd.abs() * 2.0 ** -21).all()
    assert not (lo == 0).all()
    with pytest.raises(ValueError, match="split_tf32"):
        kernel.split_tf32(w.bfloat16())


def test_kernel_refuses_what_does_not_fit():
    x, w = torch.randn(2, 5, 8), torch.randn(6, 8)
    hi, lo = kernel.split_tf32(w)
    with pytest.raises(ValueError, match="linear_tf32x3"):
        kernel.linear_tf32x3(x, hi.t().contiguous().t(), lo)  # not split_tf32's layout
    with pytest.raises(ValueError, match="linear_tf32x3"):
        kernel.linear_tf32x3(x.bfloat16(), hi, lo)
    with pytest.raises(ValueError, match="linear_tf32x3"):
        kernel.linear_tf32x3(x, hi, lo[:5])
    with pytest.raises(ValueError, match="linear_tf32x3"):
        kernel.linear_tf32x3(x, hi, lo, torch.randn(5))


@pytest.fixture
def small_rows(monkeypatch):
    """The op layer takes the kernel on the interpreter's small test shapes."""
    monkeypatch.setattr(linear_fp32, "MIN_ROWS", 8)
    monkeypatch.setattr(linear_fp32, "ENABLED", True)


@pytest.mark.parametrize("with_bias", [True, False])
def test_op_values_and_gradients_match_f_linear(small_rows, with_bias):
    x = _x("transposed").requires_grad_()
    w = (torch.randn(50, x.shape[-1]) / 7).requires_grad_()
    bias = torch.randn(50, requires_grad=True) if with_bias else None
    dout = torch.randn(x.shape[0], x.shape[1], 50).transpose(0, 1).contiguous().transpose(0, 1)  # strided
    with triton_on_cpu():
        assert linear_fp32.tf32x3_applies(x, w)
        out = linear_fp32.linear(x, w, bias)
    got = torch.autograd.grad(out, [x, w] + ([bias] if with_bias else []), dout)
    ref_inputs = [t.detach().double().requires_grad_() for t in [x, w] + ([bias] if with_bias else [])]
    ref = F.linear(ref_inputs[0], ref_inputs[1], ref_inputs[2] if with_bias else None)
    want = torch.autograd.grad(ref, ref_inputs, dout.double())
    torch.testing.assert_close(out.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)


def test_op_takes_f_linear_where_the_kernel_does_not_apply(small_rows, tf32_switch, monkeypatch):
    x, w = torch.randn(2, 9, 16), torch.randn(8, 16)
    with triton_on_cpu():
        assert linear_fp32.tf32x3_applies(x, w)
        assert not linear_fp32.tf32x3_applies(x[0], w)  # 2-D
        assert not linear_fp32.tf32x3_applies(x[:, :3], w)  # fewer than MIN_ROWS tokens
        assert not linear_fp32.tf32x3_applies(x.bfloat16(), w.bfloat16())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not linear_fp32.tf32x3_applies(x, w)
        with FlopCounterMode(display=False):  # something watches the ops: they must see F.linear
            assert not linear_fp32.tf32x3_applies(x, w)
        torch.backends.cuda.matmul.allow_tf32 = True  # --tf32: cuBLAS's TF32
        assert not linear_fp32.tf32x3_applies(x, w)
        torch.backends.cuda.matmul.allow_tf32 = False
        monkeypatch.setattr(linear_fp32, "ENABLED", False)
        assert not linear_fp32.tf32x3_applies(x, w)
    assert not linear_fp32.tf32x3_applies(x, w)  # CPU tensors outside triton_on_cpu: PyTorch's ops


def test_mixer_linears_take_the_kernel_unless_hooked(small_rows, monkeypatch):
    from mamba_ssm.modules.mamba_simple import Mamba

    mixer = Mamba(d_model=16, d_state=4, bimamba_type="v2")
    calls = []
    real = kernel.linear_tf32x3
    monkeypatch.setattr(kernel, "linear_tf32x3", lambda *a, **k: calls.append(a[1].shape) or real(*a, **k))
    x = torch.randn(2, 9, 16, requires_grad=True)
    with triton_on_cpu():
        out = mixer(x)
        out.sum().backward()
    in_w, out_w = tuple(mixer.in_proj.weight.shape), tuple(mixer.out_proj.weight.shape)
    x_proj_w = (2, *mixer.x_proj.weight.shape)  # (both directions' weights, one launch)
    # forward: in_proj, x_proj, out_proj; backward: in_proj's and out_proj's input gradients (the weights transposed)
    assert [tuple(s) for s in calls] == [in_w, x_proj_w, out_w, out_w[::-1], in_w[::-1]]
    calls.clear()
    seen = []
    handle = mixer.in_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    with triton_on_cpu():
        mixer(x)
    handle.remove()
    assert seen and [tuple(s) for s in calls] == [x_proj_w, out_w]  # the hooked in_proj ran as its module
    calls.clear()
    seen.clear()
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__) if isinstance(m, nn.Linear) else None)
    try:
        with triton_on_cpu():
            mixer(x)
    finally:
        handle.remove()
    # global hooks (FLOP counters' module tracking) see in_proj and out_proj as modules (x_proj is no module call)
    assert seen == ["Linear", "Linear"] and [tuple(s) for s in calls] == [x_proj_w]


def test_score_predictor_linears_take_the_kernel(small_rows, monkeypatch):
    """DyVM's token-score predictors run their fp32 Linears (all but the 2-column last) on the kernel: the modules'
    values and gradients (fp64 reference); eager inference splits each weight once (kept with the cached weights),
    graph capture's path (no cache) per call; a hook on any of the predictor's modules runs them all as modules."""
    from dyvm.models.predictor import TokenScorePredictor

    predictor = TokenScorePredictor(32)
    for m in predictor.modules():
        if isinstance(m, nn.Linear):  # (a useful scale: the init's 0.02 makes every score alike)
            nn.init.normal_(m.weight, std=m.in_features ** -0.5)
    reference = TokenScorePredictor(32).double()
    reference.load_state_dict(predictor.state_dict())
    calls, splits, real, real_split = [], [], kernel.linear_tf32x3, kernel.split_tf32
    monkeypatch.setattr(kernel, "linear_tf32x3", lambda *a, **k: calls.append(tuple(a[1].shape)) or real(*a, **k))
    monkeypatch.setattr(kernel, "split_tf32", lambda w: splits.append(tuple(w.shape)) or real_split(w))
    x, policy = torch.randn(2, 9, 32, requires_grad=True), (torch.rand(2, 9, 1) > 0.3).float()
    weights = [(32, 32), (16, 32), (8, 16)]
    with triton_on_cpu():  # training
        out = predictor(x, policy)
        assert calls == weights
        dout = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *predictor.parameters()], dout)
    assert calls == weights + [w[::-1] for w in reversed(weights)]  # the input gradients, last layer first
    x64 = x.detach().double().requires_grad_()
    want = reference(x64, policy.double())
    want_grads = torch.autograd.grad(want, [x64, *reference.parameters()], dout.double())
    torch.testing.assert_close(out.double(), want.detach(), rtol=1e-5, atol=1e-5)
    for g, r in zip(got, want_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-5, atol=1e-5)
    want = want.detach()
    calls.clear()
    splits.clear()
    with torch.no_grad(), triton_on_cpu():  # eager inference
        first = predictor(x, policy)
        torch.testing.assert_close(predictor(x, policy), first, rtol=0, atol=0)
    torch.testing.assert_close(first.double(), want, rtol=1e-5, atol=1e-5)
    assert calls == weights * 2 and splits == weights  # split once, then from the cached weights' memo
    calls.clear()
    splits.clear()
    monkeypatch.setattr("dyvm.models.predictor.inference_cache_usable", lambda x, owner=None: False)  # (as under capture)
    with torch.no_grad(), triton_on_cpu():
        torch.testing.assert_close(predictor(x, policy).double(), want, rtol=1e-5, atol=1e-5)
    assert calls == weights and splits == weights
    calls.clear()
    handle = predictor.out_conv[1].register_forward_hook(lambda *args: None)
    with torch.no_grad(), triton_on_cpu():
        torch.testing.assert_close(predictor(x, policy).double(), want, rtol=1e-5, atol=1e-5)
    handle.remove()
    assert calls == []  # (a hooked GELU: the predictor's modules ran themselves)


def test_kernel_retries_with_fewer_pipeline_stages_where_shared_memory_is_short(monkeypatch):
    """The tiles were chosen on an H200; a GPU with less shared memory per block refuses them at the first launch
    (OutOfResources): the launch is retried with one pipeline stage fewer at a time, and the plan keeps what
    fitted."""
    from triton.runtime.errors import OutOfResources

    stages_tried, real = [], kernel.launch

    def short_on_shared_memory(fn, grid, *args, **kwargs):
        if fn is not kernel._linear_kernel:  # (the weight's split)
            return real(fn, grid, *args, **kwargs)
        stages_tried.append(kwargs["num_stages"])
        if kwargs["num_stages"] > 2:
            raise OutOfResources(131072, 101376, "shared memory")
        return real(fn, grid, *args, **kwargs)

    monkeypatch.setattr(kernel, "launch", short_on_shared_memory)
    monkeypatch.setattr(kernel, "_plans", {})
    monkeypatch.setattr(kernel, "NARROW_TILES", (128, 64, 32, 4, 4))  # (40 columns)
    x, w = torch.randn(2, 33, 24), torch.randn(40, 24)
    parts = kernel.split_tf32(w)
    got = kernel.linear_tf32x3(x, *parts)
    torch.testing.assert_close(got, F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert stages_tried == [4, 3, 2]  # the tiles' 4 stages, then 3, then 2 fitted
    stages_tried.clear()
    kernel.linear_tf32x3(x, *parts)
    assert stages_tried == [2]


def test_op_falls_back_to_f_linear_where_the_kernel_cannot_run(small_rows, monkeypatch):
    from triton.runtime.errors import OutOfResources

    def no_room(*args, **kwargs):
        raise OutOfResources(131072, 101376, "shared memory")

    monkeypatch.setattr(kernel, "linear_tf32x3", no_room)
    monkeypatch.setattr(linear_fp32, "_NO_ROOM", set())
    x, w = torch.randn(2, 9, 16), torch.randn(8, 16)
    with triton_on_cpu(), pytest.warns(UserWarning, match="stay on cuBLAS"):
        got = linear_fp32.linear(x, w)
    torch.testing.assert_close(got, F.linear(x, w))
    monkeypatch.setattr(linear_fp32, "_NO_ROOM", set())
    xs, ws = torch.randn(2, 3, 9, 16), torch.randn(2, 8, 16)  # x_proj's stack of both directions
    with triton_on_cpu(), pytest.warns(UserWarning, match="stay on cuBLAS"):
        got = linear_fp32.linear_on_kernel(xs, ws)
    torch.testing.assert_close(got, torch.stack([F.linear(xs[r], ws[r]) for r in range(2)]))


def test_live_row_map_lists_each_images_first_rows_first():
    rows, live = linear_fp32.live_row_map(torch.tensor([3, 0, 5], dtype=torch.int32), seqlen=5, margin=1)
    # image 0: rows 0..3 (3 + the margin), image 1: row 5 (0 + 1), image 2: rows 10..14 (clipped to L)
    assert live.tolist() == [10] and rows.dtype == live.dtype == torch.int32
    assert rows[:10].tolist() == [0, 1, 2, 3, 5, 10, 11, 12, 13, 14]
    assert rows[10:].tolist() == [4, 6, 7, 8, 9] and sorted(rows.tolist()) == list(range(15))


@pytest.mark.parametrize("out_features", [70, 300])  # one tile of columns, several
def test_kernel_computes_only_the_live_rows(out_features):
    """With a row map the live rows come out as without one (bit for bit on a GPU, where each row's products
    are its own: gpu_check.py --sections linear; the interpreter's numpy matmul rounds by tile) and the others
    as zeros, whether their tile is past the live count (nothing computed) or across it (the count is read on
    the device)."""
    x = _x("transposed", batch=4, seqlen=77)
    w = torch.randn(out_features, x.shape[-1])
    bias = torch.randn(out_features)
    lengths = torch.tensor([77, 20, 0, 50], dtype=torch.int32)
    rows, live = linear_fp32.live_row_map(lengths, 77, margin=3)
    parts = kernel.split_tf32(w)
    full = kernel.linear_tf32x3(x, *parts, bias)
    got = kernel.linear_tf32x3(x, *parts, bias, live_rows=(rows, live))
    is_live = torch.arange(77)[None, :] < (lengths[:, None] + 3)
    torch.testing.assert_close(got[is_live], full[is_live], rtol=1e-5, atol=1e-5)
    assert (got[~is_live] == 0).all()
    assert kernel.ROW_MAP_TILES[0] == 128 and 128 < live.item() < 256 < 4 * 77
    with pytest.raises(ValueError, match="live rows"):
        kernel.linear_tf32x3(x, *parts, bias, live_rows=(rows.long(), live))


def test_op_with_live_rows_gives_the_live_rows_and_every_gradient_of_f_linear(small_rows):
    """The op layer's live rows: forward and input gradient at the live rows as without them (zeros elsewhere),
    the weight's and bias's gradients over every row. In a DyVM the dead rows add nothing to those: out_proj's
    input is zero there, in_proj's output gradient too; here both are."""
    lengths = torch.tensor([9, 4, 0], dtype=torch.int32)
    live_rows = linear_fp32.LiveRows(lengths)
    is_live = (torch.arange(12)[None, :] < lengths[:, None] + 2).unsqueeze(-1)
    x = (torch.randn(3, 12, 16) * is_live).requires_grad_()  # (dead inputs 0, as out_proj's are)
    w, bias = torch.randn(8, 16, requires_grad=True), torch.randn(8, requires_grad=True)
    dout = torch.randn(3, 12, 8) * is_live
    with triton_on_cpu():
        assert linear_fp32.tf32x3_applies(x, w)
        out = linear_fp32.linear_on_kernel(x, w, bias, live_rows.row_map(12, 2))
        assert live_rows.row_map(12, 2) is live_rows.row_map(12, 2)  # built once per stage
    got = torch.autograd.grad(out, [x, w, bias], dout)
    ref = F.linear(x, w, bias)
    want = torch.autograd.grad(ref, [x, w, bias], dout)
    torch.testing.assert_close(out, ref * is_live, rtol=1e-5, atol=1e-5)  # (the bias left out at dead rows)
    assert (out[~is_live.expand_as(out)] == 0).all()
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_inference_keeps_the_weight_split_with_the_cached_weights(small_rows, monkeypatch):
    """Eager inference splits each Linear's weight once and keeps the parts with the layer's cached weights; a changed
    weight (an in-place update bumps its version) is split again; a step that wants gradients splits per call."""
    from mamba_ssm.modules.mamba_simple import Mamba

    mixer = Mamba(d_model=16, d_state=4, bimamba_type="v2")
    splits, real = [], kernel.split_tf32
    monkeypatch.setattr(kernel, "split_tf32", lambda w: splits.append(tuple(w.shape)) or real(w))
    x = torch.randn(2, 9, 16)
    with triton_on_cpu(), torch.no_grad():
        first = mixer(x)
        assert len(splits) == 3  # in_proj, x_proj (both directions), out_proj
        torch.testing.assert_close(mixer(x), first, rtol=0, atol=0)
        assert len(splits) == 3
        mixer.out_proj.weight.mul_(2)
        second = mixer(x)
        assert len(splits) == 6  # the whole layer's cache is derived again
    mixer.requires_grad_(False)
    with triton_on_cpu():  # a frozen layer with gradients on: the cached weights (and their memo), no autograd
        torch.testing.assert_close(mixer(x), second, rtol=0, atol=0)
        mixer.requires_grad_(True)
        mixer(x.requires_grad_()).sum().backward()
    assert len(splits) == 6 + 5  # the three forwards, in_proj's and out_proj's input gradients


def test_a_stack_of_weights_multiplies_each_slice_by_its_own():
    """x (R, batch, L, K) with weights (R, N, K) and a bias (R, N): slice r by weight r, as R separate calls would
    (x_proj's two directions in one launch); a row map applies to every slice."""
    x = torch.randn(2, 3, 40, 77).transpose(2, 3)  # (2, 3, 77, 40), the conv output's channel-contiguous layout
    w, bias = torch.randn(2, 56, 40), torch.randn(2, 56)
    got = kernel.linear_tf32x3(x, *kernel.split_tf32(w), bias)
    assert got.shape == (2, 3, 77, 56) and got.is_contiguous()
    for r in range(2):
        want = F.linear(x[r].double(), w[r].double(), bias[r].double())
        torch.testing.assert_close(got[r].double(), want, rtol=1e-5, atol=1e-5)
    lengths = torch.tensor([77, 10, 0], dtype=torch.int32)
    rows, live = linear_fp32.live_row_map(lengths, 77, margin=0)
    masked = kernel.linear_tf32x3(x, *kernel.split_tf32(w), bias, live_rows=(rows, live))
    is_live = torch.arange(77)[None, :] < lengths[:, None]
    torch.testing.assert_close(masked[:, is_live], got[:, is_live], rtol=1e-5, atol=1e-5)
    assert (masked[:, ~is_live] == 0).all()
    with pytest.raises(ValueError, match="linear_tf32x3"):
        kernel.linear_tf32x3(x, *kernel.split_tf32(w[0]))  # a stack of x needs a stack of weights
    with pytest.raises(ValueError, match="split_tf32"):
        kernel.split_tf32(w.transpose(1, 2))  # a stack must be contiguous


def test_x_proj_in_fp32_takes_the_kernel_and_gives_the_matmuls_values(small_rows, monkeypatch):
    """bimamba_stacked's x_proj (both directions, one launch) in fp32: the kernel where it applies, in inference and
    in eager training (_XProj's forward; its backward stays on the matmuls), the batched matmul's values."""
    from mamba_ssm.ops import bimamba_stacked

    calls, real = [], kernel.linear_tf32x3
    monkeypatch.setattr(kernel, "linear_tf32x3", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    xc = torch.randn(2, 3, 11, 16).transpose(2, 3)  # (2, b, d, L) channels-last, as the conv writes it
    w = torch.randn(2, 10, 16)
    want = torch.bmm(bimamba_stacked._rows(xc).double(), w.double().transpose(1, 2))
    memo = {}
    with triton_on_cpu():
        got = bimamba_stacked._x_proj(xc, w, None, memo)
        assert "tf32" in memo and len(calls) == 1  # (the split kept for the next call)
        xg, wg = xc.detach().requires_grad_(), w.detach().requires_grad_()
        grads = bimamba_stacked.MixerGrads((3, 32, 11), True, torch.float32, xc.device)
        trained = bimamba_stacked._x_proj(xg, wg, grads, None)
    assert len(calls) == 2 and got.shape == want.shape == trained.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(trained.detach().double(), want, rtol=1e-5, atol=1e-5)
    d_out = torch.randn_like(trained)
    gx, gw = torch.autograd.grad(trained, [xg, wg], d_out)
    rx, rw = torch.autograd.grad(torch.bmm(bimamba_stacked._rows(xg), wg.transpose(1, 2)), [xg, wg], d_out)
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_autocast_training_linear_is_autocasts_with_fp32_weight_gradients(x_dtype, with_bias):
    """Under autocast a Linear's training call (linear_module) gives F.linear's output and input gradient bit for
    bit, and the weight's and bias's gradients in fp32 without autocast's bf16 rounding: closer to the exact sums of
    the same bf16 products. Without a gradient, or watched by a dispatch mode, it is F.linear itself."""
    torch.manual_seed(0)
    module = nn.Linear(24, 40, bias=with_bias)
    x = torch.randn(3, 50, 24).to(x_dtype).requires_grad_()
    dout = torch.randn(3, 50, 40).to(torch.bfloat16)
    results = []
    for call in (lambda: module(x), lambda: linear_fp32.linear_module(module, x)):
        module.zero_grad(set_to_none=True)
        x.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = call()
        out.backward(dout)
        results.append((out, x.grad, module.weight.grad, module.bias.grad if with_bias else None, out.grad_fn))
    (want, dx_want, dw_want, db_want, fn_want), (got, dx, dw, db, fn) = results
    assert "AutocastLinear" in type(fn).__name__ and "AutocastLinear" not in type(fn_want).__name__
    assert got.dtype == want.dtype == torch.bfloat16 and torch.equal(got, want)
    assert dx.dtype == x_dtype and torch.equal(dx, dx_want)
    x16 = x.detach().to(torch.bfloat16).double().reshape(-1, 24)
    exact = dout.double().reshape(-1, 40).t() @ x16
    assert dw.dtype == torch.float32
    err, err_autocast = [((w.double() - exact).norm() / exact.norm()).item() for w in (dw, dw_want)]
    assert err < 1e-6 < err_autocast
    if with_bias:
        torch.testing.assert_close(db.double(), dout.double().sum((0, 1)), rtol=1e-6, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert "Autocast" not in repr(linear_fp32.linear_module(module, x).grad_fn)
        with FlopCounterMode(display=False):
            assert "AutocastLinear" not in type(linear_fp32.linear_module(module, x).grad_fn).__name__
