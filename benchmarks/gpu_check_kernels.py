"""The kernel-level sections of benchmarks/gpu_check.py (run through it: --sections launch replay order stage proj
linear tf32): each fast kernel or launch path against what it replaces, at full size on a GPU, before any timing.

launch direct Triton launches (causal_conv1d.triton_utils.launch) against Triton's own: eager inference, a
       training step and misaligned inputs, bit for bit; DyVM's gate-head kernel against the ops it replaces.
replay eager calls replayed from their recorded launches (causal_conv1d.launch_replay: mixers, norms, fp32 Linears)
       against the ordinary calls: plans kept, logits and gates bit for bit (Vim-S, DyVM-S; bf16 b128, fp32 b64).
order  the gated inference scan with the walks that run dispatched first against the plain grid (the op
       at Vim-S shapes, fp32 and bf16, and DyVM-S bf16 forwards), bit for bit.
stage  DyVM-S's inference pruning stages on their kernels (mamba_ssm.ops.triton.pruning_stage) against the
       plain ops, batch 128, fp32 and bf16, predictors with spread-out scores: per stage on the same inputs, the
       normalised tokens, the predictor's pooled input, the scores, the kept sets (and decisions, policy) and the
       gathers; then whole forwards; the top-k kernel on tied and NaN scores against sorted_topk and torch.topk.
proj   x_proj and dt_proj of gated inference (mamba_ssm.ops.triton.gated_proj) against the batched matmuls at
       Vim-S shapes, fp32 and bf16 (values of the pairs that are on; times with all and 0.74 of the pairs on),
       then DyVM-S forwards with and without it.
linear the mixers' fp32 Linear layers as three TF32 products (mamba_ssm.ops.linear_fp32) against cuBLAS fp32 and
       fp64 at Vim-S shapes (values, times), over DyVM's live rows only (bit for bit, times), and a DyVM-S fp32
       training step with each, and with the live rows and without.
tf32   one DyVM-S fp32 training step with matmuls in plain fp32 and on TF32 tensor cores (--tf32): the loss,
       logits and gradients compared.
"""
import contextlib
from unittest import mock

import torch


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _dyvm_step_both_ways(toggle, batch=16) -> dict:
    """One DyVM-S fp32 training step (student, frozen teacher, the full loss; same inputs and Gumbel noise) with an
    option off and on: {False: ..., True: ...} of (loss, logits, gradients by name, patch tokens kept per stage).
    toggle(on) sets the option; toggle(None) puts it back afterwards."""
    import train_step

    model, criterion = train_step.build("dyvm_vim_small", torch.device("cuda"), 224)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, generator=g).cuda()
    target = torch.softmax(torch.randn(batch, 1000, generator=g), -1).cuda()
    got = {}
    try:
        for on in (False, True):
            toggle(on)
            torch.manual_seed(1)  # the same Gumbel noise
            model.zero_grad(set_to_none=True)
            out = model.forward_aux(x)
            loss = criterion(x, out, target)[0]
            loss.backward()
            grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
            got[on] = (loss.detach(), out.logits.detach(), grads, [int(d.sum()) for d in out.decisions])
    finally:
        toggle(None)
    del model, criterion
    torch.cuda.empty_cache()
    return got


def tf32(summary, batch=16):
    """One DyVM-S training step (student, frozen teacher, the full loss; fp32, same inputs and seed) with fp32
    matmuls in plain fp32 and on TF32 tensor cores (main.py --tf32): how far the loss, logits and gradients move."""
    got = _dyvm_step_both_ways(lambda on: setattr(torch.backends.cuda.matmul, "allow_tf32", bool(on)), batch)
    (l0, o0, g0, _), (l1, o1, g1, _) = got[False], got[True]
    flat = lambda grads: torch.cat([v.flatten() for v in grads.values()])  # noqa: E731
    worst = max((rel(g1[n], g0[n]), n) for n in g0 if g0[n].norm() > 0)
    summary["tf32 train fp32: loss rel"] = abs((l1 - l0) / l0).item()
    summary["tf32 train fp32: logits rel"] = rel(o1, o0)
    summary["tf32 train fp32: all gradients rel"] = rel(flat(g1), flat(g0))
    summary["tf32 train fp32: worst grad rel"] = f"{worst[0]:.2e} ({worst[1]}, of {len(g0)})"


def linear_check(summary, batch=128):
    """The mixers' fp32 Linear layers as three TF32 products (mamba_ssm.ops.linear_fp32) against cuBLAS fp32, both
    against fp64: in_proj and out_proj at Vim-S training shapes (the dense length and DyVM's after each stage),
    forward and input gradient, values then times; the kernel over DyVM's live rows; then one DyVM-S fp32 training
    step (student, teacher, the full loss) with the kernel and with cuBLAS, and with the live rows and without
    (dyvm.models.dyvm.LINEAR_KEPT_ONLY): loss, logits and gradients."""
    from triton.testing import do_bench_cudagraph

    from mamba_ssm.ops import linear_fp32
    from mamba_ssm.ops.triton.linear_tf32x3 import linear_tf32x3, split_tf32

    for L in (197, 138, 98, 68):
        x = torch.randn(batch, L, 384, device="cuda")
        y = torch.randn(batch, L, 768, device="cuda")  # out_proj's input: the scan's channel-contiguous output
        w_in = torch.randn(1536, 384, device="cuda") / 384 ** 0.5
        w_out = torch.randn(384, 768, device="cuda") / 768 ** 0.5
        cases = [("in_proj fwd", x, w_in), ("in_proj dgrad", torch.randn(batch, L, 1536, device="cuda"), w_in.t()),
                 ("out_proj fwd", y, w_out), ("out_proj dgrad", torch.randn(batch, L, 384, device="cuda"), w_out.t())]
        for name, a, w in cases:
            exact = torch.nn.functional.linear(a.double(), w.double())
            got, ref = linear_tf32x3(a, *split_tf32(w)), torch.nn.functional.linear(a, w)
            # (timed with the weight's split, as training runs it: once per call)
            t_kernel = do_bench_cudagraph(lambda: linear_tf32x3(a, *split_tf32(w))) * 1e3
            t_cublas = do_bench_cudagraph(lambda: torch.nn.functional.linear(a, w)) * 1e3
            summary[f"linear {name} L{L}: rel to fp64 kernel / cuBLAS fp32; us kernel / cuBLAS"] = (
                f"{rel(got, exact):.1e} / {rel(ref, exact):.1e}; {t_kernel:.0f} / {t_cublas:.0f}")
    _x_proj_check(summary, batch)
    _live_rows_check(summary, batch)
    saved = linear_fp32.ENABLED
    got = _dyvm_step_both_ways(lambda on: setattr(linear_fp32, "ENABLED", saved if on is None else on))
    _step_compared(summary, "linear train fp32 kernel vs cuBLAS", got)
    import dyvm.models.dyvm as dyvm_module

    saved = dyvm_module.LINEAR_KEPT_ONLY
    got = _dyvm_step_both_ways(lambda on: setattr(dyvm_module, "LINEAR_KEPT_ONLY", saved if on is None else on))
    _step_compared(summary, "linear train fp32 live rows vs every row", got)


def _step_compared(summary, name, got):
    (l0, o0, g0, k0), (l1, o1, g1, k1) = got[False], got[True]
    worst = max((rel(g1[n], g0[n]), n) for n in g0 if g0[n].norm() > 0)
    equal = torch.equal(l1, l0) and torch.equal(o1, o0) and all(torch.equal(g1[n], g0[n]) for n in g0)
    summary[f"{name}: loss rel"] = abs((l1 - l0) / l0).item()
    summary[f"{name}: logits rel"] = rel(o1, o0)
    summary[f"{name}: kept tokens"] = f"{k1} / {k0}"
    summary[f"{name}: worst grad rel"] = f"{worst[0]:.2e} ({worst[1]}, of {len(g0)}); bit for bit: {equal}"


def _x_proj_check(summary, batch):
    """x_proj's forward (both directions, one launch) on the kernel against cuBLAS's fp32 batched matmul, both
    against fp64, at the dense length and DyVM-S's after each stage."""
    from triton.testing import do_bench_cudagraph

    from mamba_ssm.ops.bimamba_stacked import _rows, _x_proj_matmul

    for L in (197, 138, 98, 68):
        xc = torch.randn(2, batch, L, 768, device="cuda").transpose(2, 3)  # the conv's channel-contiguous output
        w = torch.randn(2, 56, 768, device="cuda") / 768 ** 0.5
        exact = torch.bmm(_rows(xc).double(), w.double().transpose(1, 2))
        got, ref = _x_proj_matmul(xc, w), torch.bmm(_rows(xc), w.transpose(1, 2))
        t_kernel = do_bench_cudagraph(lambda: _x_proj_matmul(xc, w)) * 1e3
        t_cublas = do_bench_cudagraph(lambda: torch.bmm(_rows(xc), w.transpose(1, 2))) * 1e3
        summary[f"linear x_proj fwd L{L}: rel to fp64 kernel / cuBLAS fp32; us kernel / cuBLAS"] = (
            f"{rel(got, exact):.1e} / {rel(ref, exact):.1e}; {t_kernel:.0f} / {t_cublas:.0f}")


def _live_rows_check(summary, batch):
    """The kernel with DyVM-S's live rows (mamba_ssm.ops.linear_fp32.LiveRows) at Vim-S training shapes: the live
    rows equal the kernel's over every row bit for bit, the others are zeros; times with and without the map, at
    the kept counts of each stage (token keep 0.7, plus the class token; lengths spread +-10 around them)."""
    from triton.testing import do_bench_cudagraph

    from mamba_ssm.ops.linear_fp32 import live_row_map
    from mamba_ssm.ops.triton.linear_tf32x3 import linear_tf32x3, split_tf32

    g = torch.Generator(device="cuda").manual_seed(0)
    for kept in (138, 97, 68):
        lengths = (kept + torch.randint(-10, 11, (batch,), device="cuda", generator=g)).int()
        row_map = live_row_map(lengths, 197, 3)
        is_live = torch.arange(197, device="cuda")[None, :] < (lengths[:, None] + 3)
        for name, K, N in (("in_proj fwd", 384, 1536), ("out_proj dgrad", 384, 768)):
            a = torch.randn(batch, 197, K, device="cuda", generator=g)
            w = split_tf32(torch.randn(N, K, device="cuda", generator=g) / K ** 0.5)
            full, got = linear_tf32x3(a, *w), linear_tf32x3(a, *w, live_rows=row_map)
            ok = torch.equal(got[is_live], full[is_live]) and not got[~is_live].any()
            t_full = do_bench_cudagraph(lambda: linear_tf32x3(a, *w)) * 1e3
            t_live = do_bench_cudagraph(lambda: linear_tf32x3(a, *w, live_rows=row_map)) * 1e3
            summary[f"linear live rows {name} kept {kept}: live rows equal, dead zero; us live / every row"] = (
                f"{ok}; {t_live:.0f} / {t_full:.0f} (live {row_map[1].item() / (batch * 197):.2f})")


def gate_kernel_off():
    """Within the block, DyVM gate heads run as their ops (DynamicMamba.gate_head_for declines)."""
    from dyvm.models.mixer import DynamicMamba

    return mock.patch.object(DynamicMamba, "gate_head_for", lambda *args, **kwargs: None)


def _gate_decisions_compared(model, x, autocast):
    """Every layer's gate decisions from the kernel and from the ops, on the same inputs (the ops path's xz),
    and for the decisions that differ, the exact (fp64) logit of the same rounded inputs: which side is right."""
    from dyvm.models.mixer import DynamicMamba
    from mamba_ssm.ops.triton.gated_proj import gate_head_decide

    seen, gate_logits = [], DynamicMamba.gate_logits

    def spy(self, xz, cls_positions, weights=None):
        logits, xz_out = gate_logits(self, xz, cls_positions, weights)
        seen.append((self, xz, cls_positions, weights, logits))
        return logits, xz_out
    with torch.no_grad(), torch.autocast(**autocast), gate_kernel_off(), \
            mock.patch.object(DynamicMamba, "gate_logits", spy):
        model.forward_aux(x)
    differ, kernel_right, worst = 0, 0, 0.0
    with torch.no_grad():
        for mixer, xz, pos, weights, logits in seen:
            ops_gates = (logits > 0).to(logits.dtype)
            got = gate_head_decide(xz, *mixer.gate_head_for(xz, pos, weights), torch.empty_like(ops_gates))
            w, b = weights.linears["block_head"][:2] if weights is not None else (mixer.block_head.weight,
                                                                              mixer.block_head.bias)
            col = xz[:, :, pos if isinstance(pos, int) else pos[0]]
            exact = col.double() @ w.to(xz.dtype).double().t() + b.to(xz.dtype).double()
            bad = got != ops_gates
            differ += int(bad.sum())
            kernel_right += int((got[bad] == (exact[bad] > 0).to(got.dtype)).sum())
            if bad.any():
                worst = max(worst, float((exact[bad].abs() / (col.double().abs() @ w.double().abs().t())[bad]).max()))
    return (f"{differ} of {sum(s[4].numel() for s in seen)} differ; kernel matches the exact sign in {kernel_right}; "
            f"largest differing |logit| / sum|terms| {worst:.1e}")


def launch_check(summary):
    """Direct launches (causal_conv1d.triton_utils.launch) against Triton's own launch path, same inputs:
    eager inference (bf16, batch 128) and a DyVM-S fp32 training step must agree bit for bit, and a call with
    a pointer off 16-byte alignment, after aligned calls, must take its own specialisation. Also: how many of the
    remembered specialisations call Triton's C launch directly (triton_utils.direct_launch)."""
    import train_step
    from causal_conv1d import triton_utils
    from causal_conv1d.causal_conv1d_interface import causal_conv1d_fn
    from dyvm.benchmark import build_model
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn

    x = torch.randn(128, 3, 224, 224, device="cuda")
    for name in ("vim_small", "dyvm_vim_small"):
        _, model, _ = build_model(name, "cuda", 224, 0.7, 0.735 if name.startswith("dyvm") else None)
        outs = {}
        for fast in (False, True, True):  # the second fast call launches directly throughout
            with triton_utils.fast_launches(fast), torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                outs[fast] = model.forward_aux(x)
        summary[f"launch {name} bf16 b128: logits equal"] = bool(torch.equal(outs[True].logits, outs[False].logits))
        if outs[True].gates is not None:
            summary[f"launch {name} bf16 b128: gates equal"] = bool(torch.equal(outs[True].gates, outs[False].gates))
            # the gate-head kernel against the ops it replaces (the column read, the Linear, the comparison)
            for dtype in (torch.bfloat16, torch.float32):
                ac = dict(device_type="cuda", dtype=dtype, enabled=dtype == torch.bfloat16)
                with torch.no_grad(), torch.autocast(**ac):
                    fused = model.forward_aux(x)
                    with gate_kernel_off():
                        ops = model.forward_aux(x)
                summary[f"gate kernel {name} {dtype} b128: gates, logits equal to the ops'"] = (
                    f"{torch.equal(fused.gates, ops.gates)}, {torch.equal(fused.logits, ops.logits)} "
                    f"({fused.gates.numel()} decisions, mean {fused.gates.float().mean():.3f})")
                summary[f"gate kernel {name} {dtype} b128: per layer, same inputs"] = _gate_decisions_compared(
                    model, x, ac)
        del model
    model, criterion = train_step.build("dyvm_vim_small", torch.device("cuda"), 224)
    g = torch.Generator().manual_seed(0)
    xb = torch.randn(16, 3, 224, 224, generator=g).cuda()
    target = torch.softmax(torch.randn(16, 1000, generator=g), -1).cuda()
    got = {}
    for fast in (False, True, True):
        with triton_utils.fast_launches(fast):
            torch.manual_seed(1)
            model.zero_grad(set_to_none=True)
            out = model.forward_aux(xb)
            loss = criterion(xb, out, target)[0]
            loss.backward()
            got[fast] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    (l0, g0), (l1, g1) = got[False], got[True]
    summary["launch dyvm_vim_small train fp32 b16: loss equal"] = bool(torch.equal(l0, l1))
    summary["launch dyvm_vim_small train fp32 b16: gradients equal"] = (
        f"{sum(torch.equal(g0[n], g1[n]) for n in g0)} of {len(g0)}")
    del model
    # misaligned pointers after aligned calls: a time-contiguous conv and scan on views starting one element in
    d, L = 768, 197
    big = torch.randn(2, d, L + 1, device="cuda")
    w, b = torch.randn(d, 4, device="cuda"), torch.randn(d, device="cuda")
    A = -torch.rand(d, 16, device="cuda") - 0.5
    Bm, Cm = torch.randn(2, 16, L, device="cuda"), torch.randn(2, 16, L, device="cuda")
    delta = torch.rand(2, d, L, device="cuda") * 0.1
    for label, view in (("aligned", big[..., :L].contiguous()), ("misaligned", big[..., 1:])):
        res = {}
        for fast in (False, True, True):
            with triton_utils.fast_launches(fast):
                res[fast] = (causal_conv1d_fn(view, w, b, activation="silu"),
                             selective_scan_fn(view, delta, A, Bm, Cm, delta_softplus=True))
        summary[f"launch conv and scan, {label} input: equal"] = all(
            torch.equal(a, c) for a, c in zip(res[True], res[False]))
    entries = [e for _, f in triton_utils._launchers.values() if f for e in f.compiled.values()]
    summary["launch: remembered specialisations calling the C launch directly (Triton's known launcher)"] = (
        f"{sum(e.direct for e in entries)} of {len(entries)}")


def replay_check(summary):
    """Eager calls made by replaying their launches (causal_conv1d.launch_replay: the mixers, the norms, fp32's
    Linear layers on the tf32x3 kernel) against the ordinary calls on the same fresh inputs: how many mixer layers
    and norms keep a plan after the first forwards, and the replayed forwards' logits and gates equal the ordinary
    path's bit for bit (Vim-S and DyVM-S, bf16 batch 128 and fp32 batch 64)."""
    from unittest import mock

    from causal_conv1d import launch_replay
    from dyvm.benchmark import build_model
    from mamba_ssm.ops.triton import layernorm

    def plans(memo):
        return sum(isinstance(v, launch_replay.Plan) for v in memo.values())

    for name in ("vim_small", "dyvm_vim_small"):
        _, model, _ = build_model(name, "cuda", 224, 0.7, 0.735 if name.startswith("dyvm") else None)
        for dtype, batch in ((torch.bfloat16, 128), (None, 64)):
            label = f"replay {name} {'bf16' if dtype else 'fp32'} b{batch}"
            ac = dict(device_type="cuda", dtype=dtype or torch.float32, enabled=dtype is not None)
            layernorm._replays.clear()
            with torch.no_grad(), torch.autocast(**ac):
                for _ in range(5):  # compile, record, record and check, the check's verdict read
                    model.forward_aux(torch.randn(batch, 3, 224, 224, device="cuda"))
                    torch.cuda.synchronize()
                x = torch.randn(batch, 3, 224, 224, device="cuda")
                replayed = model.forward_aux(x)
                with mock.patch.object(launch_replay, "replays_enabled", lambda: False):
                    ordinary = model.forward_aux(x)
                weights = model.layer_inference_weights(x)
            mixers = sum(plans(w.stacked.memo) > 0 for w in weights)
            linears = sum(plans(memo) for w in weights for _, _, memo in w.linears.values())
            summary[f"{label}: plans kept: mixers, norms, fp32 Linears"] = (
                f"{mixers} of {len(weights)}, {plans(layernorm._replays)}, {linears}")
            summary[f"{label}: logits equal"] = bool(torch.equal(replayed.logits, ordinary.logits))
            if replayed.gates is not None:
                summary[f"{label}: gates equal"] = bool(torch.equal(replayed.gates, ordinary.gates))
        del model


def order_check(summary):
    """The gated inference scan with the walks that run dispatched first (selective_scan._active_pair) against
    the plain grid, at Vim-S shapes: the op with gates about 0.74 on (a few samples all off), and DyVM-S
    forwards; every program computes what it computed before, so the results must be equal bit for bit."""
    from dyvm.benchmark import build_model
    from mamba_ssm.ops.triton import selective_scan as ss

    from scan_gate_order import scan_inputs

    R, b, d, L = 2, 128, 768, 197
    for dtype in (torch.bfloat16, torch.float32):
        u, delta, A, B, C, D, z, bias = scan_inputs(R, b, d, L, dtype, "cuda")
        gate = (torch.rand(b, R, device="cuda") < 0.74).float()
        gate[:5] = 0
        outs = [torch.empty(b, L, d, device="cuda", dtype=dtype).transpose(1, 2) for _ in range(2)]
        for out, first in zip(outs, (False, True)):
            ss.scan_forward(u, delta, A, B, C, D, z, bias, True, gate, 0.5, out, active_first=first)
        summary[f"order scan {dtype} b128: active first equal to the plain grid"] = bool(torch.equal(*outs))
    _, model, _ = build_model("dyvm_vim_small", "cuda", 224, 0.7, 0.735)
    x = torch.randn(128, 3, 224, 224, device="cuda")
    got, limit = [], ss.MAX_ACTIVE_PAIRS
    try:
        for pairs in (0, limit):  # (plans are kept per shape: clear them to take the other grid)
            ss.MAX_ACTIVE_PAIRS = pairs
            ss._forward_plans.clear()
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                got.append(model.forward_aux(x))
    finally:
        ss.MAX_ACTIVE_PAIRS = limit
        ss._forward_plans.clear()
    summary["order dyvm_vim_small bf16 b128: logits, gates equal"] = (
        f"{torch.equal(got[0].logits, got[1].logits)}, {torch.equal(got[0].gates, got[1].gates)}")


@contextlib.contextmanager
def stage_kernels_off():
    """Within the block, DyVM's pruning stages run their plain ops (dyvm.pruning.stage_kernels_apply declines)."""
    off = lambda *args, **kwargs: False  # noqa: E731
    with mock.patch("dyvm.pruning.stage_kernels_apply", off), mock.patch("dyvm.models.predictor.stage_kernels_apply",
                                                                         off):
        yield


def stage_check(summary, device="cuda", batch=128):
    """The pruning-stage kernels against the ops they replace at DyVM-S size (see the module docstring): whole
    forwards with and without them, then each stage's kernels on the inputs the plain forward gave that stage,
    then the top-k kernel on tied scores."""
    from dyvm.benchmark import build_model
    from dyvm.models.predictor import TokenScorePredictor

    _, model, _ = build_model("dyvm_vim_small", device, 224, 0.7, 0.735)
    with torch.no_grad():  # scores that differ between tokens (fresh predictors rate them all about alike)
        for p in model.score_predictors.parameters():
            p.normal_(0, 0.5 / p.shape[-1] ** 0.5 if p.dim() > 1 else 0.1)
    x = torch.randn(batch, 3, 224, 224, device=device)
    score_stream = TokenScorePredictor.score_stream
    for dtype in (torch.float32, torch.bfloat16):
        ac = dict(device_type=device, dtype=dtype, enabled=dtype == torch.bfloat16)
        seen = []

        def spy(self, hidden, residual, cls_positions, policy):
            seen.append((self, hidden, residual, cls_positions, policy))
            return score_stream(self, hidden, residual, cls_positions, policy)
        with stage_kernels_off(), mock.patch.object(TokenScorePredictor, "score_stream", spy), torch.no_grad(), \
                torch.autocast(**ac):
            plain = model.forward_aux(x)
        with torch.no_grad(), torch.autocast(**ac):
            fused = model.forward_aux(x)
        name = "fp32" if dtype == torch.float32 else "bf16"
        summary[f"stage dyvm_vim_small {name} b{batch}: logits rel, decisions equal, gates equal"] = (
            f"{rel(fused.logits, plain.logits):.1e}, "
            f"{all(torch.equal(a, b) for a, b in zip(fused.decisions, plain.decisions))}, "
            f"{torch.equal(fused.gates, plain.gates)}")
        for stage, inputs in enumerate(seen):
            _stage_compared(summary, model, stage, inputs, ac, name)
    _stage_ties(summary, device, batch)


def _stage_compared(summary, model, stage, inputs, ac, name):
    """One stage's kernels against the plain ops on the same inputs: the LayerNorm, the scores, the kept sets, the
    gathers, the predictor's pooled input, and the top-k kernel's kept slots, decisions and policy."""
    import torch.nn.functional as F

    from dyvm.pruning import (batch_gather, gather_index, indices_to_mask, keep_count, single_static_position,
                              sorted_topk, split_cls)
    from mamba_ssm.ops.triton.pruning_stage import gather_stage, patch_layer_norm, pool_concat, select_top_k

    predictor, hidden, residual, cls_positions, policy = inputs
    norm, cls = predictor.in_conv[0], single_static_position(cls_positions)
    out_dtype = ac["dtype"] if ac["enabled"] else torch.float32
    with torch.no_grad(), torch.autocast(**ac):
        normed = patch_layer_norm(hidden, residual, cls, norm.weight, norm.bias, norm.eps, out_dtype)
        want = F.layer_norm(split_cls(hidden + residual, cls_positions)[1], norm.normalized_shape, norm.weight,
                            norm.bias, norm.eps).to(out_dtype)
        scores = predictor.score_stream(hidden, residual, cls_positions, policy)
        with stage_kernels_off():
            plain_scores = predictor.score_stream(hidden, residual, cls_positions, policy)
        pre = F.linear(want, predictor.in_conv[1].weight, predictor.in_conv[1].bias)  # the GELU and pooled half
        pooled = pool_concat(pre, policy.float())
        plain_pooled = predictor._pool(F.gelu(pre), policy.float().unsqueeze(-1)).to(pre.dtype)
    k = keep_count(model.dyvm_cfg.token_keep_ratios[stage], model.cfg.num_patches)
    kept, plain_kept = sorted_topk(scores[..., 0], k), sorted_topk(plain_scores[..., 0], k)
    new_cls = model.layout.positions(k)
    slot_to_patch = torch.arange(policy.shape[1], device=hidden.device).expand(policy.shape[0], -1) * 3
    got = gather_stage(hidden, residual, slot_to_patch, kept, cls, new_cls[0])
    source = gather_index(kept, cls_positions, new_cls)
    ref = batch_gather(hidden, source), batch_gather(residual, source), slot_to_patch.gather(1, kept)
    summary[f"stage {stage} {name}: normed rel, elements differing, scores rel, kept sets equal, gathers equal"] = (
        f"{rel(normed, want):.1e}, {int((normed != want).sum())} of {normed.numel()}, "
        f"{rel(scores, plain_scores):.1e}, {int((kept == plain_kept).all(1).sum())} of {kept.shape[0]}, "
        f"{all(torch.equal(a, b) for a, b in zip(got, ref))}")
    index, decision, next_policy = select_top_k(scores[..., 0], slot_to_patch, k, 3 * policy.shape[1])
    summary[f"stage {stage} {name}: pooled input rel, elements differing; top-k kernel: kept, decisions, "
            f"policy equal"] = (
        f"{rel(pooled, plain_pooled):.1e}, {int((pooled != plain_pooled).sum())} of {pooled.numel()}; "
        f"{torch.equal(index, kept)}, "
        f"{torch.equal(decision, indices_to_mask(slot_to_patch.gather(1, kept), 3 * policy.shape[1]))}, "
        f"{torch.equal(next_policy, torch.ones_like(next_policy))}")


def _stage_ties(summary, device, batch):
    """The top-k kernel on bf16 scores of a few values (a predictor's bf16 log-probabilities tie often) and a NaN,
    against sorted_topk's stable sort and torch.topk (whose CUDA kernel gives ties to the lower slot)."""
    from dyvm.pruning import sorted_topk
    from mamba_ssm.ops.triton.pruning_stage import select_top_k

    ties = (torch.randint(-8, 0, (batch, 196), device=device) / 8).to(torch.bfloat16)
    ties[0, 7] = float("nan")
    slot_to_patch = torch.arange(196, device=device).expand(batch, -1)
    for k in (137, 96, 67):
        index = select_top_k(ties, slot_to_patch, k, 196)[0]
        by_topk = ties.topk(k, dim=1, sorted=False).indices.sort(dim=1).values
        summary[f"stage ties k={k}: rows equal to sorted_topk, to torch.topk (CUDA)"] = (
            f"{int((index == sorted_topk(ties, k)).all(1).sum())} of {batch}, "
            f"{int((index == by_topk).all(1).sum())} of {batch}")


def proj_check(summary):
    """The gated projections against the batched matmuls they replace (see the module docstring), and a sweep of
    their launch parameters (tokens per program, channels per delta slab, warps) at the sequence lengths of
    DyVM-S's stages. fp32 (TF32 off) takes three TF32 products of the weights' parts; what it replaces is x_proj on
    the tf32x3 Linear kernel and dt_proj on cuBLAS (fp32 inference without it), and its error is against fp64."""
    import triton
    from triton.runtime.errors import OutOfResources

    from dyvm.benchmark import build_model
    from mamba_ssm.ops.bimamba_stacked import _rows, _x_proj_matmul
    from mamba_ssm.ops.triton.gated_proj import gated_projections
    from mamba_ssm.ops.triton.linear_tf32x3 import split_tf32

    b, d, R, N = 128, 768, 24, 16
    configs = [(64, 64, 4), (32, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (32, 128, 4), (64, 64, 8)]
    fp32_configs = [(64, 64, 4), (128, 64, 4), (64, 32, 4), (32, 64, 4), (64, 64, 2), (128, 64, 8), (64, 128, 8),
                     (128, 32, 4), (32, 32, 2)]
    for dtype, L, tf32 in ((torch.float32, 197, False), (torch.float32, 138, False), (torch.float32, 97, False),
                           (torch.float32, 68, False), (torch.float32, 197, True), (torch.float32, 68, True),
                           (torch.bfloat16, 197, False), (torch.bfloat16, 68, False)):
        name = f"{'fp32' if dtype == torch.float32 else 'bf16'}{' tf32' if tf32 else ''} L{L}"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        split = dtype == torch.float32 and not tf32
        xc = torch.randn(2, b, L, d, device="cuda", dtype=dtype).transpose(2, 3)
        wx = (torch.randn(2, R + 2 * N, d, device="cuda") / d ** 0.5).to(dtype)
        wdt = (torch.randn(2, d, R, device="cuda") / R ** 0.5).to(dtype)
        parts = (split_tf32(wx), split_tf32(wdt)) if split else None

        def matmuls():
            x_dbl = _x_proj_matmul(xc, wx) if split else torch.bmm(_rows(xc), wx.transpose(1, 2))
            return x_dbl, torch.bmm(x_dbl[..., :R], wdt.transpose(1, 2))
        want = matmuls()
        gate = (torch.rand(b, 2, device="cuda") < 0.74).float()
        ones = torch.ones_like(gate)
        on = gate.t().repeat_interleave(L, dim=1).bool()  # (2, b*L) rows of the pairs that are on
        got = gated_projections(xc, wx, wdt, gate, tf32_parts=parts)
        summary[f"proj {name} b128: x_dbl rel, delta rel (pairs on)"] = (
            f"{rel(got[0][on], want[0][on]):.1e}, {rel(got[1][on], want[1][on]):.1e}")
        if split:  # against fp64 (delta from the kernel's own dt), and what the matmuls are off by
            x64 = torch.bmm(_rows(xc).double(), wx.double().transpose(1, 2))
            for label, pair in (("kernel", got), ("matmuls", want)):
                d64 = torch.bmm(pair[0][..., :R].double(), wdt.double().transpose(1, 2))
                summary[f"proj {name} b128 {label}: x_dbl, delta rel to fp64"] = (
                    f"{rel(pair[0][on].double(), x64[on]):.1e}, {rel(pair[1][on].double(), d64[on]):.1e}")
        base = triton.testing.do_bench_cudagraph(matmuls) * 1e3
        for cfg in (fp32_configs if dtype == torch.float32 else configs):
            kw = dict(block_t=cfg[0], block_d=cfg[1], num_warps=cfg[2], tf32_parts=parts)
            try:
                times = [triton.testing.do_bench_cudagraph(lambda: gated_projections(xc, wx, wdt, g, **kw)) * 1e3
                         for g in (ones, gate)]
            except OutOfResources:
                summary[f"proj {name} b128 {cfg}"] = "does not fit in shared memory"
                continue
            summary[f"proj {name} b128 {cfg} us: matmuls, kernel all on, {float(gate.mean()):.2f} on"] = (
                f"{base:.0f}, {times[0]:.0f}, {times[1]:.0f}")
    torch.backends.cuda.matmul.allow_tf32 = False
    _, model, _ = build_model("dyvm_vim_small", "cuda", 224, 0.7, 0.735)
    x = torch.randn(128, 3, 224, 224, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        ac = dict(device_type="cuda", dtype=dtype, enabled=dtype == torch.bfloat16)
        with torch.no_grad(), torch.autocast(**ac):
            fused = model.forward_aux(x)
            with mock.patch("mamba_ssm.ops.bimamba_stacked._projections_kernel_takes", lambda t: False):
                plain = model.forward_aux(x)
        summary[f"proj dyvm_vim_small {dtype} b128: logits rel, gates equal, decisions equal"] = (
            f"{rel(fused.logits, plain.logits):.1e}, {torch.equal(fused.gates, plain.gates)}, "
            f"{all(torch.equal(a, c) for a, c in zip(fused.decisions, plain.decisions))}")


# section name -> function(summary), for gpu_check.py --sections
KERNEL_SECTIONS = {"launch": launch_check, "replay": replay_check, "order": order_check, "stage": stage_check,
                   "proj": proj_check, "linear": linear_check, "tf32": tf32}
