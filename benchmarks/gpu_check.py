"""One GPU call: full-size checks of the inference and training fast paths, then end-to-end timings.

    python3 benchmarks/gpu_check.py [--sections check infer train] [--out DIR]

check  (before any timing) at Vim-S size:
       - eager inference with the cached inference weights (autocast dtype) equals the uncached computation;
       - dyvm.serving's CUDA-graph replays equal eager calls (dense and DyVM, fp32 and bf16), see parameters
         updated in place, and stay correct across a cache eviction;
       - DyVM training on the kernels against the PyTorch references (MAMBA_FORCE_REFERENCE): logits, every
         loss term and the gradients, fp32, batch 8;
       - the DyVM loss with the teacher replayed from a CUDA graph equals the eager teacher's; with the teacher
         started ahead on a side stream (DyVMLoss.teacher_ahead), the same loss and gradients bit for bit.
infer  images/s of vim_small and dyvm_vim_small (token keep 0.7, gates calibrated to a block keep ratio of
       0.735), eager (and its host time), CUDA graph and torch.compile, bf16 batch 128 and fp32 batch 64 / 128.
train  benchmarks/train_step.py's measurement for vim_small and dyvm_vim_small, fp32 and bf16, batch 128,
       with a profile of the bf16 steps (train_graph: the same through --cuda-graph-train).
launch direct Triton launches (causal_conv1d.triton_utils.launch) against Triton's own: eager inference, a
       training step and misaligned inputs, bit for bit; DyVM's gate-head kernel against the ops it replaces.
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
       fp64 at Vim-S shapes (values, times), and a DyVM-S fp32 training step with each.
tf32   one DyVM-S fp32 training step with matmuls in plain fp32 and on TF32 tensor cores (--tf32): the loss,
       logits and gradients compared.
Prints a table of everything at the end; JSON under --out.
"""
import argparse
import json
import os
import statistics
import sys
import time
from unittest import mock

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check(summary):
    import dyvm  # noqa: F401
    from dyvm.benchmark import build_model
    from dyvm.serving import graphed

    dev = "cuda"
    x = torch.randn(32, 3, 224, 224, device=dev)
    for name in ("vim_small", "dyvm_vim_small"):
        _, model, _ = build_model(name, dev, 224, 0.7, 0.735 if name.startswith("dyvm") else None)
        for dtype in (None, torch.bfloat16):
            ac = dict(device_type="cuda", dtype=dtype or torch.float32, enabled=dtype is not None)
            # (the gate heads as ops on both sides: the gate kernel's own check is in the launch section)
            with torch.no_grad(), torch.autocast(**ac), _gate_kernel_off():
                cached = model.forward_aux(x)
            with torch.enable_grad(), torch.autocast(**ac):  # a gradient would be needed: nothing cached
                uncached = model.forward_aux(x)
            summary[f"check cache {name} {dtype}: logits rel"] = rel(cached.logits, uncached.logits.detach())
            if cached.gates is not None:
                summary[f"check cache {name} {dtype}: gates equal"] = bool(torch.equal(cached.gates,
                                                                                 uncached.gates.detach()))
            fast = graphed(model, dtype=dtype, method="forward_aux", max_graphs=1)
            out = fast(x)
            with torch.no_grad(), torch.autocast(**ac):  # eager as the graph runs it (gate kernel included)
                eager = model.forward_aux(x)
            summary[f"check graph {name} {dtype}: logits rel"] = rel(out.logits, eager.logits)
            out2 = fast(x[:7])  # evicts the batch-32 graph (max_graphs=1)
            with torch.no_grad(), torch.autocast(**ac):
                ref = model.forward_aux(x[:7])
            summary[f"check graph {name} {dtype}: after eviction rel"] = rel(out2.logits, ref.logits)
            with torch.no_grad():
                model.head.weight.mul_(0.5)
                out3 = fast(x[:7]).logits.clone()
                with torch.autocast(**ac):
                    ref3 = model(x[:7])
                model.head.weight.mul_(2.0)
            summary[f"check graph {name} {dtype}: in-place update seen rel"] = rel(out3, ref3)
            summary[f"check graph {name} {dtype}: captures"] = fast.captures
        del model
    torch.cuda.empty_cache()
    check_training(summary)
    check_graph_training(summary)


def check_training(summary, dense_name="vim_small", tag="train fp32"):
    from timm.loss import SoftTargetCrossEntropy

    from dyvm.checkpoint import load_checkpoint
    from dyvm.losses import DyVMLoss, build_teacher
    from dyvm.models.registry import create_model

    torch.manual_seed(0)
    dense = create_model(dense_name)
    student = create_model("dyvm_" + dense_name, gumbel_noise=False)
    load_checkpoint(student, dense.state_dict())
    with torch.no_grad():  # gates that differ per image: a trained model's situation
        for layer in student.layers:
            layer.mixer.block_head.weight.normal_(0, 0.02)
            layer.mixer.block_head.bias.normal_(0.5, 1.0)
    teacher = build_teacher(student.cfg, {k: v + 0.01 * torch.randn_like(v) for k, v in dense.state_dict().items()})
    student.cuda().train()
    teacher.cuda()
    criterion = DyVMLoss.from_model(student, SoftTargetCrossEntropy(), teacher, token_weight=10.0,
                                    block_weight=10.0, distill_weight=0.5)
    x = torch.randn(8, 3, 224, 224, device="cuda")
    target = torch.softmax(torch.randn(8, 1000, device="cuda"), -1)
    import dyvm.models.dyvm as dyvm_module

    runs, kept_only = {}, getattr(dyvm_module, "SCAN_KEPT_ONLY", None)  # (None: a revision from before it)
    for mode in ("kernels", "reference", "whole sequence"):
        if mode == "whole sequence" and kept_only is None:
            continue
        os.environ["MAMBA_FORCE_REFERENCE"] = "1" if mode == "reference" else "0"
        if kept_only is not None:  # the kernels' scans over every position, pruned ones too
            dyvm_module.SCAN_KEPT_ONLY = mode != "whole sequence"
        student.zero_grad(set_to_none=True)
        out = student.forward_aux(x)
        loss, parts = criterion(x, out, target)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
        runs[mode] = (out.logits.detach(), parts, grads, out.gates.detach())
        summary[f"check {tag}: patch tokens kept per stage ({mode})"] = [int(d.sum()) for d in out.decisions]
    os.environ["MAMBA_FORCE_REFERENCE"] = "0"
    if kept_only is not None:
        dyvm_module.SCAN_KEPT_ONLY = kept_only
        (lk, _, gk, gatek), (lw, _, gw, gatew) = runs["kernels"], runs["whole sequence"]
        summary[f"check {tag}: kept-only scans vs whole sequence: logits rel"] = rel(lk, lw)
        summary[f"check {tag}: kept-only scans vs whole sequence: gates equal"] = bool(torch.equal(gatek, gatew))
        worst = max(((rel(gk[n], gw[n]), n) for n in gw if gw[n].norm() > 0))
        summary[f"check {tag}: kept-only scans vs whole sequence: worst grad rel"] = f"{worst[0]:.2e} ({worst[1]})"
    (lk, pk, gk, gatek), (lr, pr, gr, gater) = runs["kernels"], runs["reference"]
    summary[f"check {tag}: logits rel"] = rel(lk, lr)
    summary[f"check {tag}: gates equal"] = bool(torch.equal(gatek, gater))
    summary[f"check {tag}: loss parts max rel"] = max(rel(pk[k].reshape(1), pr[k].reshape(1)) for k in pk
                                                      if float(pr[k]) != 0)
    worst = max(((rel(gk[n], gr[n]), n) for n in gr if gr[n].norm() > 0))
    summary[f"check {tag}: worst grad rel"] = f"{worst[0]:.2e} ({worst[1]})"
    summary[f"check {tag}: grads compared"] = len(gr)
    if dense_name != "vim_small":
        return
    # the teacher through its CUDA graph against the plain teacher
    with torch.no_grad():
        eager = teacher.forward_with_tokens(x)
    graph = criterion._teacher_fast(x)
    summary["check teacher graph: logits rel"] = rel(graph[0], eager[0])
    summary["check teacher graph: tokens rel"] = rel(graph[1], eager[1])
    # the teacher started ahead on a side stream, as the training steps do, against the teacher inside the loss
    for _ in range(2):  # (the second call replays the teacher's graph on the side stream)
        student.zero_grad(set_to_none=True)
        criterion.teacher_ahead(x)
        out = student.forward_aux(x)
        loss, parts = criterion(x, out, target)
        loss.backward()
    _, pk, gk, _ = runs["kernels"]
    summary["check teacher ahead: loss parts equal"] = all(torch.equal(parts[k], pk[k]) for k in pk)
    summary["check teacher ahead: grads equal"] = all(torch.equal(p.grad, gk[n]) for n, p in
                                                      student.named_parameters() if n in gk)
    del student, teacher, criterion
    torch.cuda.empty_cache()


def check_graph_training(summary):
    """dyvm.train_graph against eager steps: the same 6 training steps of DyVM-S (batch 16, no Gumbel noise,
    fused AdamW in both, a learning-rate change after step 3) from the same weights; then a non-finite batch."""
    import copy

    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    from dyvm.checkpoint import load_checkpoint
    from dyvm.engine import AuxForward, NonFiniteLossError, train_one_epoch
    from dyvm.losses import DyVMLoss, build_teacher
    from dyvm.models.registry import create_model
    from dyvm.train_graph import GraphedTrainStep

    torch.manual_seed(0)
    dense = create_model("vim_small")
    student = create_model("dyvm_vim_small", gumbel_noise=False)
    load_checkpoint(student, dense.state_dict())
    teacher = build_teacher(student.cfg, dense.state_dict()).cuda()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 224, 224, generator=g).cuda(),
                torch.softmax(torch.randn(16, 1000, generator=g), -1).cuda()) for _ in range(6)]
    start = torch.cat([p.detach().flatten() for p in student.parameters()]).cuda()
    for dtype in (None, torch.bfloat16):
        finals = {}
        for mode in ("eager", "graph"):
            model = copy.deepcopy(student).cuda()
            opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, fused=True, capturable=True)
            crit = DyVMLoss.from_model(model, SoftTargetCrossEntropy(), teacher, token_weight=10.0, block_weight=10.0)
            step = GraphedTrainStep(AuxForward(model), crit, opt, dtype) if mode == "graph" else None
            losses = []
            for epoch, part in enumerate((batches[:3], batches[3:])):
                stats = train_one_epoch(AuxForward(model), crit, part, opt, torch.device("cuda"), epoch,
                                        amp_dtype=dtype, graph_step=step)
                losses.append(stats["loss"])
                for group in opt.param_groups:
                    group["lr"] = group["lr"] * 0.5
            finals[mode] = (torch.cat([p.detach().flatten() for p in model.parameters()]), losses, step, model, opt,
                            crit)
        (pe, le, _, _, _, _), (pg, lg, step, model, opt, crit) = finals["eager"], finals["graph"]
        summary[f"check graph train {dtype}: params after 6 steps rel"] = rel(pg, pe)
        summary[f"check graph train {dtype}: |graph - eager| / |eager - start|"] = \
            ((pg - pe).double().norm() / (pe - start).double().norm()).item()
        summary[f"check graph train {dtype}: epoch losses eager | graph"] = f"{le} | {lg}"
        summary[f"check graph train {dtype}: captured"] = step.graph is not None
        bad = [(torch.full_like(batches[0][0], float("nan")), batches[0][1])]
        params_before = torch.cat([p.detach().flatten() for p in model.parameters()])
        try:
            train_one_epoch(AuxForward(model), crit, bad, opt, torch.device("cuda"), 2, amp_dtype=dtype,
                            graph_step=step)
            summary[f"check graph train {dtype}: non-finite"] = "NOT raised"
        except NonFiniteLossError as e:
            unchanged = torch.equal(params_before, torch.cat([p.detach().flatten() for p in model.parameters()]))
            summary[f"check graph train {dtype}: non-finite"] = f"raised ({str(e)[:50]}); weights kept: {unchanged}"
    torch.cuda.empty_cache()


def host_and_total(model, x, dtype, iters=20):
    """Median host time (until model(x) returns) and total time (until the GPU is done), ms."""
    host, total = [], []
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        for i in range(5 + iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            model(x)
            t1 = time.perf_counter()
            torch.cuda.synchronize()
            if i >= 5:
                host.append(t1 - t0)
                total.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(host), 1e3 * statistics.median(total)


def timed_images_per_s(run, batch, warmup, iters=30):
    times = []
    for i in range(warmup + iters):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        run()
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return batch / statistics.median(times)


def capture(model, x, dtype):
    """A CUDA graph of model(x) (no dyvm.serving: this also runs against older revisions as their baseline)."""
    ac = lambda: torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None,  # noqa: E731
                                cache_enabled=False)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad(), ac():
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad(), ac():
        model(x)
    return graph.replay


def infer(summary, rows, configs, modes):
    from dyvm.benchmark import build_model

    models = {}
    for name in ("vim_small", "dyvm_vim_small"):
        models[name] = build_model(name, "cuda", 224, 0.7, 0.735 if name.startswith("dyvm") else None)
    for dtype, batch in configs:
        for name, (_, model, realised) in models.items():
            model.eval()
            x = torch.randn(batch, 3, 224, 224, device="cuda")
            host, total = host_and_total(model, x, dtype)
            for mode in modes:
                if mode == "compile" and (dtype is None or batch != 128):
                    continue  # one compiled configuration (bf16, batch 128): each compile takes a minute or more
                try:
                    if mode == "cuda_graph":
                        run, warmup = capture(model, x, dtype), 10
                    else:
                        fn = torch.compile(model) if mode == "compile" else model

                        def run(fn=fn):
                            with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                                 enabled=dtype is not None):
                                fn(x)
                        warmup = 3 if mode == "compile" else 10
                    ips = timed_images_per_s(run, batch, warmup)
                except Exception as e:  # noqa: BLE001  (a compile failure must not lose the other numbers)
                    ips = float("nan")
                    print(f"{name} {mode} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
                row = {"model": name, "dtype": str(dtype), "batch": batch, "mode": mode, "gate_keep": realised,
                       "images_per_s": ips}
                if mode == "eager":
                    row.update(host_ms=host, total_ms=total)
                rows.append(row)
                print(f"{name:15s} {str(dtype):15s} b{batch:4d} {mode:10s} {ips:9.1f} img/s"
                      + (f"  host {host:6.2f} ms total {total:6.2f} ms" if mode == "eager" else ""), flush=True)
    for dtype, batch in configs:
        for mode in modes:
            got = {r["model"]: r["images_per_s"] for r in rows
                   if r["dtype"] == str(dtype) and r["batch"] == batch and r["mode"] == mode}
            if len(got) == 2:
                summary[f"infer {dtype} b{batch} {mode}: dense / dyvm img/s, ratio"] = (
                    f"{got['vim_small']:.0f} / {got['dyvm_vim_small']:.0f}, "
                    f"{got['dyvm_vim_small'] / got['vim_small']:.2f}x")
            hosts = {r["model"]: (r["host_ms"], r["total_ms"]) for r in rows
                     if r["dtype"] == str(dtype) and r["batch"] == batch and r["mode"] == "eager"}
            if mode == "eager" and len(hosts) == 2:
                summary[f"infer {dtype} b{batch} eager host/total ms: dense | dyvm"] = (
                    "{:.1f}/{:.1f} | {:.1f}/{:.1f}".format(*hosts["vim_small"], *hosts["dyvm_vim_small"]))


def backbones(summary, rows):
    """VideoMamba-S and MambaReg-S: DyVM training on the kernels against the references at full size, then
    dense and DyVM images/s (eager and CUDA graph, fp32 and bf16, batch 128)."""
    from dyvm.benchmark import build_model

    for dense_name in ("videomamba_small", "mambareg_small"):
        check_training(summary, dense_name, tag=f"train fp32 {dense_name}")
    for dense_name in ("videomamba_small", "mambareg_small"):
        built = {name: build_model(name, "cuda", 224, 0.7, 0.735 if name.startswith("dyvm") else None)
                 for name in (dense_name, "dyvm_" + dense_name)}
        for dtype in (torch.bfloat16, None):
            got = {}
            for name, (_, model, realised) in built.items():
                model.eval()
                x = torch.randn(128, 3, 224, 224, device="cuda")
                for mode in ("eager", "cuda_graph"):
                    if mode == "cuda_graph":
                        run = capture(model, x, dtype)
                    else:
                        def run(model=model):
                            with torch.no_grad(), torch.autocast("cuda", dtype=dtype or torch.float32,
                                                                 enabled=dtype is not None):
                                model(x)
                    got[name, mode] = timed_images_per_s(run, 128, 10)
                    rows.append({"model": name, "dtype": str(dtype), "batch": 128, "mode": mode,
                                 "gate_keep": realised, "images_per_s": got[name, mode]})
            for mode in ("eager", "cuda_graph"):
                dense, dy = got[dense_name, mode], got["dyvm_" + dense_name, mode]
                summary[f"infer {dense_name} {dtype} b128 {mode}: dense / dyvm img/s, ratio"] = (
                    f"{dense:.0f} / {dy:.0f}, {dy / dense:.2f}x")
        del built
        torch.cuda.empty_cache()


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
    forward and input gradient, values then times; then one DyVM-S fp32 training step (student, teacher, the
    full loss) with the kernel and with cuBLAS: loss, logits and gradients."""
    from triton.testing import do_bench_cudagraph

    from mamba_ssm.ops import linear_fp32
    from mamba_ssm.ops.triton.linear_tf32x3 import linear_tf32x3

    for L in (197, 138, 98, 68):
        x = torch.randn(batch, L, 384, device="cuda")
        y = torch.randn(batch, L, 768, device="cuda")  # out_proj's input: the scan's channel-contiguous output
        w_in = torch.randn(1536, 384, device="cuda") / 384 ** 0.5
        w_out = torch.randn(384, 768, device="cuda") / 768 ** 0.5
        cases = [("in_proj fwd", x, w_in), ("in_proj dgrad", torch.randn(batch, L, 1536, device="cuda"), w_in.t()),
                 ("out_proj fwd", y, w_out), ("out_proj dgrad", torch.randn(batch, L, 384, device="cuda"), w_out.t())]
        for name, a, w in cases:
            exact = torch.nn.functional.linear(a.double(), w.double())
            wk = w.contiguous()  # (the op layer copies the transposed weight once per backward)
            got, ref = linear_tf32x3(a, wk), torch.nn.functional.linear(a, w)
            t_kernel = do_bench_cudagraph(lambda: linear_tf32x3(a, wk)) * 1e3
            t_cublas = do_bench_cudagraph(lambda: torch.nn.functional.linear(a, w)) * 1e3
            summary[f"linear {name} L{L}: rel to fp64 kernel / cuBLAS fp32; us kernel / cuBLAS"] = (
                f"{rel(got, exact):.1e} / {rel(ref, exact):.1e}; {t_kernel:.0f} / {t_cublas:.0f}")
    saved = linear_fp32.ENABLED
    got = _dyvm_step_both_ways(lambda on: setattr(linear_fp32, "ENABLED", saved if on is None else on))
    (l0, o0, g0, k0), (l1, o1, g1, k1) = got[False], got[True]
    worst = max((rel(g1[n], g0[n]), n) for n in g0 if g0[n].norm() > 0)
    summary["linear train fp32 kernel vs cuBLAS: loss rel"] = abs((l1 - l0) / l0).item()
    summary["linear train fp32 kernel vs cuBLAS: logits rel"] = rel(o1, o0)
    summary["linear train fp32 kernel vs cuBLAS: kept tokens"] = f"{k1} / {k0}"
    summary["linear train fp32 kernel vs cuBLAS: worst grad rel"] = f"{worst[0]:.2e} ({worst[1]}, of {len(g0)})"


def _gate_kernel_off():
    """Within the block, DyVM gate heads run as their ops (DynamicMamba.gates_by_kernel declines)."""
    from dyvm.models.mixer import DynamicMamba

    return mock.patch.object(DynamicMamba, "gates_by_kernel", lambda *args, **kwargs: None)


def _gate_decisions_compared(model, x, autocast):
    """Every layer's gate decisions from the kernel and from the ops, on the same inputs (the ops path's xz),
    and for the decisions that differ, the exact (fp64) logit of the same rounded inputs: which side is right."""
    from dyvm.models.mixer import DynamicMamba

    seen, gate_logits = [], DynamicMamba.gate_logits

    def spy(self, xz, cls_positions, weights=None):
        logits, xz_out = gate_logits(self, xz, cls_positions, weights)
        seen.append((self, xz, cls_positions, weights, logits))
        return logits, xz_out
    with torch.no_grad(), torch.autocast(**autocast), _gate_kernel_off(), \
            mock.patch.object(DynamicMamba, "gate_logits", spy):
        model.forward_aux(x)
    differ, kernel_right, worst = 0, 0, 0.0
    with torch.no_grad():
        for mixer, xz, pos, weights, logits in seen:
            ops_gates = (logits > 0).to(logits.dtype)
            got = mixer.gates_by_kernel(xz, pos, weights, torch.empty_like(ops_gates))
            w, b = weights.linears["block_head"] if weights is not None else (mixer.block_head.weight,
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
    a pointer off 16-byte alignment, after aligned calls, must take its own specialisation."""
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
                    with _gate_kernel_off():
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


def _stage_kernels_off():
    """Within the block, DyVM's pruning stages run their plain ops (dyvm.pruning.stage_kernels_apply declines)."""
    off = lambda *args, **kwargs: False  # noqa: E731
    return mock.patch("dyvm.pruning.stage_kernels_apply", off), mock.patch("dyvm.models.predictor.stage_kernels_apply",
                                                                           off)


def stage_check(summary, device="cuda", batch=128):
    """The pruning-stage kernels against the ops they replace at DyVM-S size (see the module docstring)."""
    import contextlib

    import torch.nn.functional as F

    from dyvm.benchmark import build_model
    from dyvm.models.predictor import TokenScorePredictor
    from dyvm.pruning import (batch_gather, gather_index, indices_to_mask, keep_count, single_static_position,
                              sorted_topk, split_cls)
    from mamba_ssm.ops.triton.pruning_stage import gather_stage, patch_layer_norm, pool_concat, select_top_k

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
        with contextlib.ExitStack() as stack:
            for patch in _stage_kernels_off():
                stack.enter_context(patch)
            stack.enter_context(mock.patch.object(TokenScorePredictor, "score_stream", spy))
            with torch.no_grad(), torch.autocast(**ac):
                plain = model.forward_aux(x)
        with torch.no_grad(), torch.autocast(**ac):
            fused = model.forward_aux(x)
        name = "fp32" if dtype == torch.float32 else "bf16"
        summary[f"stage dyvm_vim_small {name} b{batch}: logits rel, decisions equal, gates equal"] = (
            f"{rel(fused.logits, plain.logits):.1e}, "
            f"{all(torch.equal(a, b) for a, b in zip(fused.decisions, plain.decisions))}, "
            f"{torch.equal(fused.gates, plain.gates)}")
        for stage, (predictor, hidden, residual, cls_positions, policy) in enumerate(seen):
            norm, cls = predictor.in_conv[0], single_static_position(cls_positions)
            out_dtype = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
            with torch.no_grad(), torch.autocast(**ac):
                normed = patch_layer_norm(hidden, residual, cls, norm.weight, norm.bias, norm.eps, out_dtype)
                want = F.layer_norm(split_cls(hidden + residual, cls_positions)[1], norm.normalized_shape, norm.weight,
                                    norm.bias, norm.eps).to(out_dtype)
                scores = predictor.score_stream(hidden, residual, cls_positions, policy)
                with contextlib.ExitStack() as stack:
                    for patch in _stage_kernels_off():
                        stack.enter_context(patch)
                    plain_scores = predictor.score_stream(hidden, residual, cls_positions, policy)
            k = keep_count(model.dyvm_cfg.token_keep_ratios[stage], model.cfg.num_patches)
            kept, plain_kept = sorted_topk(scores[..., 0], k), sorted_topk(plain_scores[..., 0], k)
            new_cls = model.layout.positions(k)
            slot_to_patch = torch.arange(policy.shape[1], device=device).expand(policy.shape[0], -1) * 3
            got = gather_stage(hidden, residual, slot_to_patch, kept, cls, new_cls[0])
            source = gather_index(kept, cls_positions, new_cls)
            ref = batch_gather(hidden, source), batch_gather(residual, source), slot_to_patch.gather(1, kept)
            summary[f"stage {stage} {name}: normed rel, elements differing, scores rel, kept sets equal, gathers equal"] = (
                f"{rel(normed, want):.1e}, {int((normed != want).sum())} of {normed.numel()}, "
                f"{rel(scores, plain_scores):.1e}, {int((kept == plain_kept).all(1).sum())} of {kept.shape[0]}, "
                f"{all(torch.equal(a, b) for a, b in zip(got, ref))}")
            with torch.no_grad(), torch.autocast(**ac):  # the predictor's GELU and pooled half, from one input
                pre = F.linear(want, predictor.in_conv[1].weight, predictor.in_conv[1].bias)
                pooled = pool_concat(pre, policy.float())
                plain_pooled = predictor._pool(F.gelu(pre), policy.float().unsqueeze(-1)).to(pre.dtype)
            index, decision, next_policy = select_top_k(scores[..., 0], slot_to_patch, k, 3 * policy.shape[1])
            summary[f"stage {stage} {name}: pooled input rel, elements differing; top-k kernel: kept, decisions, "
                    f"policy equal"] = (
                f"{rel(pooled, plain_pooled):.1e}, {int((pooled != plain_pooled).sum())} of {pooled.numel()}; "
                f"{torch.equal(index, kept)}, "
                f"{torch.equal(decision, indices_to_mask(slot_to_patch.gather(1, kept), 3 * policy.shape[1]))}, "
                f"{torch.equal(next_policy, torch.ones_like(next_policy))}")
    # ties: bf16 scores of a few values (as a predictor's log-probabilities tie in bf16), one NaN
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
    DyVM-S's first and last stages."""
    import triton

    from dyvm.benchmark import build_model
    from mamba_ssm.ops.triton.gated_proj import gated_projections

    b, d, R, N = 128, 768, 24, 16
    configs = [(64, 64, 4), (32, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8), (32, 128, 4), (64, 64, 8)]
    for dtype, L, tf32 in ((torch.float32, 197, False), (torch.float32, 197, True), (torch.bfloat16, 197, False),
                           (torch.bfloat16, 68, False)):
        name = f"{'fp32' if dtype == torch.float32 else 'bf16'}{' tf32' if tf32 else ''} L{L}"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        xc = torch.randn(2, b, L, d, device="cuda", dtype=dtype).transpose(2, 3)
        wx = (torch.randn(2, R + 2 * N, d, device="cuda") / d ** 0.5).to(dtype)
        wdt = (torch.randn(2, d, R, device="cuda") / R ** 0.5).to(dtype)

        def matmuls():
            x_dbl = torch.bmm(xc.transpose(2, 3).reshape(2, b * L, d), wx.transpose(1, 2))
            return x_dbl, torch.bmm(x_dbl[..., :R], wdt.transpose(1, 2))
        want = matmuls()
        gate = (torch.rand(b, 2, device="cuda") < 0.74).float()
        ones = torch.ones_like(gate)
        on = gate.t().repeat_interleave(L, dim=1).bool()  # (2, b*L) rows of the pairs that are on
        got = gated_projections(xc, wx, wdt, gate)
        summary[f"proj {name} b128: x_dbl rel, delta rel (pairs on)"] = (
            f"{rel(got[0][on], want[0][on]):.1e}, {rel(got[1][on], want[1][on]):.1e}")
        base = triton.testing.do_bench_cudagraph(matmuls) * 1e3
        for cfg in (configs if dtype != torch.float32 else configs[:1]):
            kw = dict(block_t=cfg[0], block_d=cfg[1], num_warps=cfg[2])
            times = [triton.testing.do_bench_cudagraph(lambda: gated_projections(xc, wx, wdt, g, **kw)) * 1e3
                     for g in (ones, gate)]
            summary[f"proj {name} b128 {cfg} us: matmuls, kernel all on, {float(gate.mean()):.2f} on"] = (
                f"{base:.0f}, {times[0]:.0f}, {times[1]:.0f}")
    torch.backends.cuda.matmul.allow_tf32 = False
    _, model, _ = build_model("dyvm_vim_small", "cuda", 224, 0.7, 0.735)
    x = torch.randn(128, 3, 224, 224, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        ac = dict(device_type="cuda", dtype=dtype, enabled=dtype == torch.bfloat16)
        with torch.no_grad(), torch.autocast(**ac):
            fused = model.forward_aux(x)
            with mock.patch("mamba_ssm.ops.bimamba_stacked._gated_projections_apply", lambda xc: False):
                plain = model.forward_aux(x)
        summary[f"proj dyvm_vim_small {dtype} b128: logits rel, gates equal, decisions equal"] = (
            f"{rel(fused.logits, plain.logits):.1e}, {torch.equal(fused.gates, plain.gates)}, "
            f"{all(torch.equal(a, c) for a, c in zip(fused.decisions, plain.decisions))}")


def train_options(graph: bool) -> argparse.Namespace:
    """benchmarks/train_step.py's options for the train sections: its defaults (so that a new option cannot be
    missing here), batch 128, 4 + 12 steps, graphed steps or not."""
    import train_step

    return train_step.parser().parse_args(["--batch-size", "128", "--warmup", "4", "--steps", "12"]
                                          + (["--cuda-graph"] if graph else []))


def train(summary, rows, dtypes, graph=False):
    import train_step

    ns = train_options(graph)
    for name in ("vim_small", "dyvm_vim_small"):
        for dtype in dtypes:
            ns.profile = 25 if dtype == "bf16" else 0
            try:
                row = train_step.measure(name, dtype, ns, torch.device("cuda"), 1, 0)
            except torch.cuda.OutOfMemoryError:
                row = {"model": name, "dtype": dtype, "error": "OOM"}
                torch.cuda.empty_cache()
            rows.append(row)
            if "profile" in row:
                print(f"===== profile {name} {dtype}\n{row['profile']}", flush=True)
            if "error" not in row:
                summary[f"train {name} {dtype}{' graph' if graph else ''}: img/s, ms/step, peak GiB"] = (
                    f"{row['images_per_s_per_gpu']:.0f}, {row['step_ms']:.1f}, {row['peak_memory_gib']:.1f}")
            print(row.get("model"), dtype, {k: v for k, v in row.items() if k != "profile"}, flush=True)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sections", nargs="+", default=["check", "infer", "train"])
    p.add_argument("--modes", nargs="+", default=["eager", "cuda_graph"], help="infer: eager cuda_graph compile")
    p.add_argument("--train-dtypes", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--tag", default="", help="a name for this run's JSON (e.g. baseline)")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    args = p.parse_args()
    from dyvm.benchmark import environment

    env = environment()
    print(" | ".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    summary, rows = {}, {"infer": [], "train": []}
    t0 = time.time()
    for section in args.sections:
        start = time.time()
        try:
            if section == "check":
                check(summary)
            elif section == "infer":
                infer(summary, rows["infer"], [(torch.bfloat16, 128), (None, 64), (None, 128)], args.modes)
            elif section == "train":
                train(summary, rows["train"], args.train_dtypes)
            elif section == "backbones":
                backbones(summary, rows["infer"])
            elif section == "train_graph":
                train(summary, rows["train"], args.train_dtypes, graph=True)
            elif section == "tf32":
                tf32(summary)
            elif section == "launch":
                launch_check(summary)
            elif section == "order":
                order_check(summary)
            elif section == "stage":
                stage_check(summary)
            elif section == "proj":
                proj_check(summary)
            elif section == "linear":
                linear_check(summary)
            else:
                raise ValueError(f"unknown section {section!r}")
        except Exception as e:  # noqa: BLE001  (report and go on to the next section)
            import traceback
            traceback.print_exc()
            summary[f"{section}: FAILED"] = f"{type(e).__name__}: {str(e)[:300]}"
        summary[f"{section}: seconds"] = round(time.time() - start, 1)
        with open(os.path.join(args.out, f"gpu_check{'_' + args.tag if args.tag else ''}.json"), "w") as f:
            json.dump({"environment": env, "summary": summary, "rows": rows}, f, indent=1, default=str)
    print(f"\n===== summary {args.tag} ({time.time() - t0:.0f} s) {env.get('device')} {env.get('date')}")
    for k, v in summary.items():
        print(f"{k:70s} {v:.3g}" if isinstance(v, float) else f"{k:70s} {v}")


if __name__ == "__main__":
    main()
