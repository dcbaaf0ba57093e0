"""One GPU call: full-size checks of the inference and training fast paths, then end-to-end timings.

    python3 benchmarks/gpu_check.py [--sections check infer train ...] [--out DIR]

Model-level sections (here):
check  (before any timing) at Vim-S size:
       - eager inference makes no host-device sync (torch's sync debug mode);
       - eager inference with the cached inference weights (autocast dtype) equals the uncached computation;
       - dyvm.serving's CUDA-graph replays equal eager calls (dense and DyVM, fp32 and bf16), stay correct across a
         cache eviction and an eager call in the other dtype, and see parameters updated in place (a plain weight
         and derived ones: captured again);
       - DyVM training on the kernels against the PyTorch references (MAMBA_FORCE_REFERENCE): logits, every
         loss term and the gradients, fp32, batch 8;
       - the DyVM loss with the teacher replayed from a CUDA graph equals the eager teacher's; with the teacher
         started ahead on a side stream (DyVMLoss.teacher_ahead), the same loss and gradients bit for bit.
infer  images/s of vim_small and dyvm_vim_small (token keep 0.7, gates calibrated to a block keep ratio of
       0.735), the two timed in turns: eager (and its host time), CUDA graph and torch.compile, bf16 batch 128
       and fp32 batch 64 / 128.
backbones  the same for VideoMamba-S and MambaReg-S.
train  benchmarks/train_step.py's measurement for vim_small and dyvm_vim_small, fp32 and bf16, batch 128,
       with a profile of the bf16 steps (train_graph: the same through --cuda-graph-train).
Kernel-level sections (launch, replay, order, stage, proj, linear, tf32): benchmarks/gpu_check_kernels.py.
Prints a table of everything at the end; JSON under --out.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_check_kernels import KERNEL_SECTIONS, gate_kernel_off, rel, stage_kernels_off  # noqa: E402


def decisions_apart(a, b) -> str:
    """How many images took another gate or token decision in DyVM outputs a and b, and the logits' relative
    difference over the images that took the same ones: a decision flips where a bf16 logit or score lies within
    rounding of its threshold, and the calibrated gates put some logits there; the rest must still agree."""
    same = (a.gates == b.gates.detach()).all(2).all(0)  # (depth, B, 2) -> B
    for da, db in zip(a.decisions, b.decisions):
        same &= (da == db.detach()).flatten(1).all(1)
    rest = rel(a.logits[same], b.logits.detach()[same]) if same.any() else float("nan")
    return f"{int((~same).sum())} of {len(same)}; {rest:.2e}"


def eager_syncs(model, x, autocast) -> str:
    """'none' when an eager no-grad forward makes no host-device sync (torch's sync debug mode raises at the
    first), else the first one's message: a sync would make the host wait for the GPU in every forward."""
    with torch.no_grad(), torch.autocast(**autocast):
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x)
        except RuntimeError as e:
            return f"SYNC: {str(e)[:120]}"
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return "none"


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
            # (the gate heads and pruning stages as ops on both sides, as training runs them: their kernels' own
            # checks are the launch and stage sections)
            with torch.no_grad(), torch.autocast(**ac), gate_kernel_off(), stage_kernels_off():
                cached = model.forward_aux(x)
            with torch.enable_grad(), torch.autocast(**ac):  # a gradient would be needed: nothing cached
                uncached = model.forward_aux(x)
            summary[f"check cache {name} {dtype}: logits rel"] = rel(cached.logits, uncached.logits.detach())
            if cached.gates is not None:
                summary[f"check cache {name} {dtype}: gates equal"] = bool(torch.equal(cached.gates,
                                                                                 uncached.gates.detach()))
                summary[f"check cache {name} {dtype}: images with another decision; logits rel of the others"] = \
                    decisions_apart(cached, uncached)
            fast = graphed(model, dtype=dtype, method="forward_aux", max_graphs=1)
            out = fast(x)
            with torch.no_grad(), torch.autocast(**ac):  # eager as the graph runs it (gate kernel included)
                eager = model.forward_aux(x)
            summary[f"check graph {name} {dtype}: logits rel"] = rel(out.logits, eager.logits)
            summary[f"check eager {name} {dtype}: host-device syncs in a forward"] = eager_syncs(model, x, ac)
            out2 = fast(x[:7])  # evicts the batch-32 graph (max_graphs=1)
            with torch.no_grad(), torch.autocast(**ac):
                ref = model.forward_aux(x[:7])
            summary[f"check graph {name} {dtype}: after eviction rel"] = rel(out2.logits, ref.logits)
            # an eager call in the other dtype re-derives the layers' cached weights: the graph keeps reading its own
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype is None):
                model.forward_aux(x[:7])
            summary[f"check graph {name} {dtype}: after an eager call in the other dtype rel"] = rel(
                fast(x[:7]).logits, ref.logits)
            # in-place updates of a plain weight and of weights the forward derives (cast, stacked, split, -exp)
            changed = (model.head.weight, model.layers[5].mixer.in_proj.weight, model.layers[5].mixer.A_log)
            with torch.no_grad():
                for p in changed:
                    p.mul_(0.5)
                out3 = fast(x[:7]).logits.clone()
                with torch.autocast(**ac):
                    ref3 = model(x[:7])
                for p in changed:
                    p.mul_(2.0)
            summary[f"check graph {name} {dtype}: in-place update seen rel"] = rel(out3, ref3)
            summary[f"check graph {name} {dtype}: captures (3: the update captured again)"] = fast.captures
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
    fused AdamW in both, a learning-rate change after step 3) from the same weights; then a non-finite batch and a
    finite one after it (neither updates the weights), and a finite one after clear_nonfinite (it does)."""
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
        # a non-finite batch, then a finite one: the loop reads the first's flag after launching the second, whose
        # update the graph's flag skips too; the error names the first
        bad = [(torch.full_like(batches[0][0], float("nan")), batches[0][1]), batches[1]]
        params_before = torch.cat([p.detach().flatten() for p in model.parameters()])
        try:
            train_one_epoch(AuxForward(model), crit, bad, opt, torch.device("cuda"), 2, amp_dtype=dtype,
                            graph_step=step)
            summary[f"check graph train {dtype}: non-finite"] = "NOT raised"
        except NonFiniteLossError as e:
            unchanged = torch.equal(params_before, torch.cat([p.detach().flatten() for p in model.parameters()]))
            summary[f"check graph train {dtype}: non-finite"] = (f"raised ({str(e)[:50]}); names step 0: "
                                                                 f"{'step 0:' in str(e)}; weights kept: {unchanged}")
        step.clear_nonfinite()  # the skip flag stayed set: cleared, a finite step updates again
        train_one_epoch(AuxForward(model), crit, batches[2:3], opt, torch.device("cuda"), 3, amp_dtype=dtype,
                        graph_step=step)
        summary[f"check graph train {dtype}: updates after clear_nonfinite"] = not torch.equal(
            params_before, torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.cuda.empty_cache()


def time_pair(summary, rows, models: dict, keep: dict, dtype, batch: int, mode: str, label: str):
    """A dense model and its DyVM ({dense name: model, DyVM name: model}, in that order) timed in turns
    (dyvm.benchmark.measure_interleaved: the host's pace drifts within a minute): rows per model, and under
    `label` images/s with the DyVM's ratio (the median of the round-by-round ratios, and their range), host and
    total milliseconds a batch."""
    from dyvm.benchmark import measure_interleaved, paired_speedup

    try:
        got = measure_interleaved(models, batch, 224, 3, "cuda", dtype, warmup=3 if mode == "compile" else 10,
                                  iters=30, mode=mode)
    except Exception as e:  # noqa: BLE001  (a compile failure must not lose the other numbers)
        print(f"{label} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
        return
    for name, r in got.items():
        rows.append({"model": name, "dtype": str(dtype), "batch": batch, "mode": mode, "gate_keep": keep[name],
                     "images_per_s": r["images_per_s"], "host_ms": 1e3 * r["median_host_s"],
                     "total_ms": 1e3 * r["median_batch_s"], "round_s": r["round_s"]})
        print(f"{name:22s} {str(dtype):15s} b{batch:4d} {mode:10s} {r['images_per_s']:9.1f} img/s  host "
              f"{1e3 * r['median_host_s']:6.2f} ms total {1e3 * r['median_batch_s']:6.2f} ms", flush=True)
    dense, dyvm = got.values()
    by_round = [d / m for m, d in zip(dyvm["round_s"], dense["round_s"])]
    summary[f"{label}: dense / dyvm img/s, ratio (rounds)"] = (
        f"{dense['images_per_s']:.0f} / {dyvm['images_per_s']:.0f}, {paired_speedup(dyvm, dense):.2f}x "
        f"({min(by_round):.2f} to {max(by_round):.2f})")
    summary[f"{label} host/total ms: dense | dyvm"] = (
        f"{1e3 * dense['median_host_s']:.1f}/{1e3 * dense['median_batch_s']:.1f} | "
        f"{1e3 * dyvm['median_host_s']:.1f}/{1e3 * dyvm['median_batch_s']:.1f}")


def built_pair(dense_name: str) -> tuple:
    """({dense name: model, DyVM name: model}, {name: realised block keep ratio}) at token keep 0.7, the gates
    calibrated to a block keep ratio of 0.735."""
    from dyvm.benchmark import build_model

    models, keep = {}, {}
    for name in (dense_name, "dyvm_" + dense_name):
        _, models[name], keep[name] = build_model(name, "cuda", 224, 0.7, 0.735 if name.startswith("dyvm") else None)
    return models, keep


def infer(summary, rows, configs, modes):
    models, keep = built_pair("vim_small")
    for dtype, batch in configs:
        for mode in modes:
            if mode == "compile" and (dtype is None or batch != 128):
                continue  # one compiled configuration (bf16, batch 128): each compile takes a minute or more
            time_pair(summary, rows, models, keep, dtype, batch, mode, f"infer {dtype} b{batch} {mode}")


def backbones(summary, rows):
    """VideoMamba-S and MambaReg-S: DyVM training on the kernels against the references at full size, then
    dense and DyVM images/s (eager and CUDA graph, fp32 and bf16, batch 128)."""
    for dense_name in ("videomamba_small", "mambareg_small"):
        check_training(summary, dense_name, tag=f"train fp32 {dense_name}")
    for dense_name in ("videomamba_small", "mambareg_small"):
        models, keep = built_pair(dense_name)
        for dtype in (torch.bfloat16, None):
            for mode in ("eager", "cuda_graph"):
                time_pair(summary, rows, models, keep, dtype, 128, mode, f"infer {dense_name} {dtype} b128 {mode}")
        del models
        torch.cuda.empty_cache()


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
            elif section in KERNEL_SECTIONS:
                KERNEL_SECTIONS[section](summary)
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
