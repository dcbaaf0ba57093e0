"""Eager inference's fast path computes exactly what the general path does, bit for bit.

Eager inference takes shortcuts for the host's sake (benchmarks/host_ops.py): each mixer's weights cached in the
form the ops take (Mamba.inference_weights), the scan's output written without the op's placeholder outputs,
the gates written into one tensor. The general path is the one torch.compile and FLOP counting see: under a
dispatch mode nothing is cached and every op goes through its torch.library custom op. A pass-through dispatch
mode therefore gives the reference here; both run the same implementations, so the outputs (and, in training,
the gradients) must be equal to the last bit: on the CPU implementations and on the Triton kernels (through
the interpreter, as a GPU runs them), for a dense Vim and a DyVM with gates that differ per image.
"""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from causal_conv1d.kernel_utils import triton_on_cpu
from dyvm.benchmark import calibrate_gates
from dyvm.models.registry import create_model

TINY = dict(img_size=12, patch_size=4, depth=3, embed_dim=16, d_state=4, num_classes=5)  # 9 patches


class _PassThrough(TorchDispatchMode):
    """Watches every op and changes nothing: the model takes its general (custom-op, uncached) path."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    dyvm = create_model("dyvm_vim_tiny", pruning_loc=(1, 2), token_keep_ratios=(0.75, 0.5), gumbel_noise=False,
                        **TINY)
    calibrate_gates(dyvm, 0.6, batch_size=8, img_size=12, in_chans=3, device="cpu", seed=3)
    return {"vim": create_model("vim_tiny", **TINY), "dyvm": dyvm}


def _outputs(model, x, watched: bool, kernels: bool, dtype=None):
    context = [_PassThrough() if watched else contextlib.nullcontext(),
               triton_on_cpu() if kernels else contextlib.nullcontext(),
               torch.autocast("cpu", dtype=dtype) if dtype is not None else contextlib.nullcontext()]
    with context[0], context[1], context[2]:
        out = model.forward_aux(x)
    return [out.logits, out.patch_tokens, out.final_policy, out.slot_to_patch, *out.decisions,
            *([] if out.gates is None else [out.gates])], out.seq_lens


def _assert_identical(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def _gated_projections_off():
    """Within the block, gated inference takes x_proj and dt_proj from the batched matmuls, as the general path
    does (the kernel that skips the pairs that are off sums in another order: see the test after the next)."""
    from unittest import mock

    return mock.patch("mamba_ssm.ops.bimamba_stacked._projections_kernel_takes", lambda t: False)


@pytest.mark.parametrize("kernels", [False, True], ids=["cpu", "triton"])
@pytest.mark.parametrize("name", ["vim", "dyvm"])
def test_eager_inference_is_bit_identical_to_the_general_path(models, name, kernels):
    with _gated_projections_off():
        _bit_identical_to_the_general_path(models, name, kernels)


def _bit_identical_to_the_general_path(models, name, kernels):
    model = models[name].eval()
    x = torch.randn(3, 3, 12, 12)
    dtypes = [None, torch.bfloat16] if not kernels else [None]  # (bf16 on the interpreter: slow, same code)
    with torch.no_grad():
        for dtype in dtypes:
            want, lens = _outputs(model, x, watched=True, kernels=kernels, dtype=dtype)
            for _ in range(2):  # the first call fills the weight cache, the second reads it
                got, got_lens = _outputs(model, x, watched=False, kernels=kernels, dtype=dtype)
                _assert_identical(got, want)
                assert got_lens == lens
    assert all("_inference_cache" in layer.mixer.__dict__ for layer in model.layers)  # the fast path ran
    if kernels:  # the fp32 scan reads A (R, d, N)-contiguous: kept with the cached weights, not copied per call
        for layer in model.layers:
            stacked = layer.mixer.__dict__["_inference_cache"][1].stacked
            kept = stacked.memo["A (R, d, N)"]
            assert kept.is_contiguous() and not stacked.A.is_contiguous() and torch.equal(kept, stacked.A)
    if name == "dyvm":  # the gates differ per image, so the skipped directions are exercised
        gates = got[-1]
        assert gates.shape == (3, 3, 2) and 0 < gates.mean() < 1


def test_gated_projections_skip_the_pairs_that_are_off(models, monkeypatch):
    """DyVM's eager inference on the kernels takes x_proj and dt_proj from mamba_ssm.ops.triton.gated_proj, which
    computes the gates itself (the head's code) and then only the (sample, direction) pairs whose gate is on: the
    same products, summed in another order (bf16: fp32 products in the interpreter; fp32: three TF32 products of
    the weights' TF32 parts, as the fp32 Linears take), so the outputs agree with the general path's batched
    matmuls to rounding and every decision is the same."""
    import mamba_ssm.ops.triton.gated_proj as proj

    calls = []
    kernel = proj.gated_projections

    def spy(*args, **kwargs):
        out = kernel(*args, **kwargs)
        calls.append((args[3].clone(), kwargs.get("head") is not None, kwargs.get("tf32_parts") is not None))
        return out
    monkeypatch.setattr(proj, "gated_projections", spy)
    model = models["dyvm"].eval()
    x = torch.randn(3, 3, 12, 12)
    for dtype, tol in ((torch.bfloat16, 2e-2), (None, 1e-5)):
        calls.clear()
        with torch.no_grad():
            want, _ = _outputs(model, x, watched=True, kernels=True, dtype=dtype)
            got, _ = _outputs(model, x, watched=False, kernels=True, dtype=dtype)
        assert len(calls) == len(model.layers) and any(0 < float(g.mean()) < 1 for g, _, _ in calls)  # mixed gates
        assert all(head for _, head, _ in calls)  # the gates computed inside the projections kernel
        assert all(split == (dtype is None) for _, _, split in calls)  # fp32: the three-product path
        torch.testing.assert_close(got[0], want[0], rtol=tol, atol=tol)  # logits
        _assert_identical(got[2:], want[2:])  # policy, slots, decisions, gates


def test_eval_with_gradients_enabled_matches_no_grad(models):
    """Eval mode under enable_grad (a saliency map, say): nothing is cached (the parameters need gradients),
    the gates are still written into one tensor, and the input gets its gradient."""
    model = models["dyvm"].eval()
    x = torch.randn(2, 3, 12, 12, requires_grad=True)
    with torch.no_grad():
        want = model.forward_aux(x).logits
    out = model.forward_aux(x)
    torch.testing.assert_close(out.logits, want, rtol=1e-5, atol=1e-6)
    out.logits.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", ["vim", "dyvm"])
def test_training_gradients_are_bit_identical_to_the_general_path(models, name, monkeypatch):
    """With x_proj's gradient added by autograd, as the custom ops do, bit for bit; with it added into the
    scan's du inside the matmul (the eager default: one rounding instead of two), to rounding."""
    import mamba_ssm.ops.bimamba_stacked as stacked

    model = models[name].train()
    x = torch.randn(2, 3, 12, 12)
    grads = []
    for watched, into_du in ((True, False), (False, False), (False, True)):
        monkeypatch.setattr(stacked, "EAGER_PROJ_BACKWARD", into_du)
        model.zero_grad(set_to_none=True)
        with _PassThrough() if watched else contextlib.nullcontext():
            out = model.forward_aux(x)
            out.logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and len(grads[0]) > 0
    for n in grads[0]:
        assert torch.equal(grads[0][n], grads[1][n]), n
        torch.testing.assert_close(grads[2][n], grads[0][n], rtol=1e-4, atol=1e-7, msg=n)


def test_weight_cache_sees_replaced_parameters_and_modules():
    """The cache reads the parameters through the modules' parameter dicts: a Parameter or a whole submodule
    replaced after the cache was filled, or a dtype change (.double(): same Parameter objects, new data), is
    seen at the next call."""
    torch.manual_seed(0)
    model = create_model("dyvm_vim_tiny", pruning_loc=(1, 2), token_keep_ratios=(0.75, 0.5), **TINY).eval()
    mixer = model.layers[1].mixer
    x = torch.randn(2, 3, 12, 12)

    def check(x):
        with torch.no_grad():
            want, _ = _outputs(model, x, watched=True, kernels=False)
            got, _ = _outputs(model, x, watched=False, kernels=False)
        _assert_identical(got, want)

    check(x)
    first = mixer.__dict__["_inference_cache"]
    mixer.x_proj_b.weight = torch.nn.Parameter(torch.randn_like(mixer.x_proj_b.weight) * 0.3)
    check(x)
    assert mixer.__dict__["_inference_cache"] is not first
    mixer.dt_proj = torch.nn.Linear(mixer.dt_proj.in_features, mixer.dt_proj.out_features)
    mixer.block_head = torch.nn.Linear(mixer.block_head.in_features, 2)
    check(x)
    model.double()
    check(x.double())
    assert mixer.__dict__["_inference_cache"][1].linears["in_proj"][0].dtype == torch.float64
    # a parameter written into its module's parameter dict directly, as torch.func.functional_call does
    mixer.x_proj.__dict__["_parameters"]["weight"] = torch.nn.Parameter(torch.randn_like(mixer.x_proj.weight) * 0.3)
    check(x.double())
    with torch.no_grad():
        got = torch.func.functional_call(model, {"layers.0.mixer.in_proj.weight":
                                                 torch.zeros_like(model.layers[0].mixer.in_proj.weight)}, (x.double(),))
        model(x.double())  # fills the caches with the model's own weights again
        again = torch.func.functional_call(model, {"layers.0.mixer.in_proj.weight":
                                                   torch.zeros_like(model.layers[0].mixer.in_proj.weight)}, (x.double(),))
    assert torch.equal(got, again) and not torch.equal(got, model(x.double()))


@pytest.mark.parametrize("name", ["vim", "dyvm"])
def test_one_cache_check_per_forward(models, name, monkeypatch):
    """A model validates its layers' cached weights with one key per forward (inference_weights_of): the
    layers' own checks run only when a parameter changed, and the outputs follow the change."""
    from mamba_ssm.modules.mamba_simple import Mamba

    model = models[name].eval()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        model.forward_aux(x)  # fills the caches
        calls = []
        per_layer = Mamba.inference_weights
        monkeypatch.setattr(Mamba, "inference_weights", lambda self, x: calls.append(self) or per_layer(self, x))
        first = model.forward_aux(x).logits
        assert calls == []
        head = model.layers[-1].mixer.out_proj.weight
        head.mul_(2.0)  # in place: the version counter moves
        try:
            second = model.forward_aux(x).logits
        finally:
            head.div_(2.0)
        assert len(calls) == len(model.layers) and not torch.equal(first, second)
        want, _ = _outputs(model, x, watched=True, kernels=False)
        assert torch.equal(model.forward_aux(x).logits, want[0]) and torch.equal(first, want[0])


def test_constant_weights_are_read_inside_graph_captures(monkeypatch):
    """A CUDA-graph capture (simulated: graph_capturing True) derives a model's inference weights in the graph,
    and caches nothing, unless the weights were declared constant (DyVMLoss's teacher): then it takes those an
    eager call derived before it, the same objects, and still derives nothing and caches nothing where none were
    derived, or where the parameters changed since; the fp32 kernel's weight split is not kept from a capture."""
    from causal_conv1d import kernel_utils
    from mamba_ssm.modules import mamba_simple
    from mamba_ssm.modules.mamba_simple import declare_constant_weights
    from mamba_ssm.ops import linear_fp32

    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    model = create_model("vim_tiny", **TINY).eval()
    hidden = model.embed(x)
    capturing = [False]
    monkeypatch.setattr(mamba_simple, "graph_capturing", lambda t: capturing[0])
    monkeypatch.setattr(kernel_utils, "graph_capturing", lambda t: capturing[0])  # (kept_in's check)

    def weights(capture: bool):
        capturing[0] = capture
        try:
            with torch.no_grad():
                return model.layer_inference_weights(hidden)
        finally:
            capturing[0] = False

    eager = weights(False)
    assert all(w is not None for w in eager)
    assert weights(True) == [None] * len(model.layers)  # parameters that may change: the graph reads them
    declare_constant_weights(model)
    assert all(a is b for a, b in zip(weights(True), eager))
    with torch.no_grad():  # a layer's own check too (a caller without the model's list)
        capturing[0] = True
        assert model.layers[0].mixer.inference_weights(hidden) is eager[0]
        capturing[0] = False
    model = declare_constant_weights(create_model("vim_tiny", **TINY).eval())  # (weights() reads the new one)
    hidden = model.embed(x)
    assert weights(True) == [None] * len(model.layers)  # nothing derived eagerly yet: none derived in a capture
    assert "_inference_cache" not in model.layers[0].mixer.__dict__
    first = weights(False)
    with torch.no_grad():
        model.layers[0].mixer.out_proj.weight.mul_(2.0)  # changed: the capture no longer matches, derives nothing
    assert weights(True) == [None] * len(model.layers) and weights(False)[0] is not first[0]
    memo = {}
    capturing[0] = True
    try:
        linear_fp32.weight_parts(torch.randn(8, 4), memo)
    finally:
        capturing[0] = False
    assert memo == {}
    linear_fp32.weight_parts(torch.randn(8, 4), memo)
    assert set(memo) == {"tf32"}


def test_predictor_keeps_its_autocast_weights_while_unchanged():
    """Under autocast, eager inference takes the token-score predictor's Linears from a cache in the autocast
    dtype (no casts per call): the output equals the modules' own, also after an in-place update."""
    from dyvm.models.predictor import TokenScorePredictor

    torch.manual_seed(0)
    predictor = TokenScorePredictor(16).eval()
    with torch.no_grad():
        for p in predictor.parameters():
            p.normal_(0, 0.5)  # (outputs that differ from token to token)
    x, policy = torch.randn(3, 9, 16), (torch.rand(3, 9, 1) > 0.3).float()

    def both():
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            cached = predictor(x, policy)
            with _PassThrough():  # watched: the modules' path
                modules = predictor(x, policy)
        return cached, modules

    for _ in range(2):
        cached, modules = both()
        assert cached.dtype == modules.dtype and torch.equal(cached, modules) and cached.std() > 0.1
    first = predictor.__dict__["_inference_cache"]
    with torch.no_grad():
        predictor.out_conv[2].weight.mul_(-1.5)
    cached, modules = both()
    assert torch.equal(cached, modules) and predictor.__dict__["_inference_cache"] is not first


def test_dyvm_inference_stages_take_the_pruning_kernels(models, monkeypatch):
    """With the kernels (the GPU's path), each inference pruning stage runs mamba_ssm.ops.triton.pruning_stage:
    the predictor's add + split + LayerNorm, its GELU + pooled half, the top-k with the decision mask, and the
    stage's gathers, one kernel each. The gathers and the top-k are exact, the LayerNorm and the pooled mean
    differ from torch's only in the order of their fp32 sums, so the kept tokens, and with them every output,
    equal the plain ops' (fp32 and bf16 autocast); the predictors' scores agree to rounding."""
    import mamba_ssm.ops.triton.pruning_stage as stage

    calls = []
    names = ("patch_layer_norm", "pool_concat", "select_top_k", "gather_stage")
    for name in names:
        kernel = getattr(stage, name)
        monkeypatch.setattr(stage, name, lambda *a, _k=kernel, _n=name, **kw: calls.append(_n) or _k(*a, **kw))
    model = models["dyvm"].eval()
    x = torch.randn(3, 3, 12, 12)
    with torch.no_grad(), _gated_projections_off():
        for dtype in (None, torch.bfloat16):
            calls.clear()
            want, _ = _outputs(model, x, watched=True, kernels=True, dtype=dtype)
            assert calls == []  # watched: the plain ops
            got, _ = _outputs(model, x, watched=False, kernels=True, dtype=dtype)
            assert calls == list(names) * 2
            _assert_identical(got, want)
    predictor, hidden, residual = model.score_predictors[0], torch.randn(3, 10, 16), torch.randn(3, 10, 16)
    policy = torch.ones(3, 9)
    with torch.no_grad(), triton_on_cpu():
        fused = predictor.score_stream(hidden, residual, 4, policy)
        with _PassThrough():
            plain = predictor.score_stream(hidden, residual, 4, policy)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    assert not torch.equal(fused[:, :, 0], fused[:, :1, 0].expand(-1, 9))  # scores that differ between tokens


def test_predictor_hooks_see_their_calls_with_the_stage_kernels_on():
    """A forward hook on a predictor (to record its scores, say) still runs: the fused stage steps aside."""
    from dyvm.models.predictor import TokenScorePredictor

    predictor = TokenScorePredictor(16).eval()
    hidden, residual, policy = torch.randn(2, 10, 16), torch.randn(2, 10, 16), torch.ones(2, 9)
    seen = []
    handle = predictor.register_forward_hook(lambda m, args, out: seen.append(out))
    try:
        with torch.no_grad(), triton_on_cpu():
            scores = predictor.score_stream(hidden, residual, 4, policy)
    finally:
        handle.remove()
    assert len(seen) == 1 and seen[0] is scores


@pytest.mark.parametrize("dtype, weight_dtype", [(torch.float32, torch.float32), (torch.float64, torch.float64),
                                                 (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_projection_weight_gradients_summed_over_blocks_of_samples(dtype, weight_dtype, monkeypatch):
    """x_proj's and dt_proj's weight gradients: into fp32 weights (from fp32 or, under autocast, bf16 activations)
    sums over blocks of whole samples (one batched matmul of the blocks, in fp32, then their sum), equal to the
    plain sum over all rows to fp32 rounding; other dtypes take the one matmul, bit for bit."""
    import mamba_ssm.ops.bimamba_stacked as stacked
    from causal_conv1d.partial_sums import sum_middle

    monkeypatch.setattr(stacked, "WGRAD_BLOCKS", 4)
    batch, seqlen = 6, 5  # gcd(6, 4) = 2 blocks of 3 samples
    d_out = torch.randn(2, batch * seqlen, 7, dtype=torch.float64).to(dtype)
    x = torch.randn(2, batch * seqlen, 9, dtype=torch.float64).to(dtype)[..., :8]  # strided rows, as dt's slice is
    exact = torch.bmm(d_out.double().transpose(1, 2), x.double())  # (of the inputs as given: no input rounding)
    got = stacked._weight_grad(d_out, x, batch, weight_dtype)
    assert got.shape == (2, 7, 8) and got.dtype == weight_dtype
    if weight_dtype == torch.float32:
        torch.testing.assert_close(got.double(), exact, rtol=1e-5, atol=1e-5)  # (a bf16 rounding is 4e-3)
        import causal_conv1d.partial_sums as partial_sums

        calls = []
        monkeypatch.setattr(partial_sums, "sum_middle", lambda *t: calls.append(len(t)) or sum_middle(*t))
        with triton_on_cpu():  # the blocks summed by the partial sums' kernel (on the kernels' devices)
            torch.testing.assert_close(stacked._weight_grad(d_out, x, batch, weight_dtype), got)
        assert calls == [1]
    else:
        want = torch.bmm(d_out.transpose(1, 2), x)
        assert torch.equal(got, want)
