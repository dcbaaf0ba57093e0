"""torch.compile of dense Vim and DyVM inference: graph breaks (torch._dynamo.explain), the first call's time
(the compile), and the compiled logits against the eager ones. One line of JSON per model.

    PYTHONPATH=$PWD:$PWD/mamba-1p1p1 python3 benchmarks/compile_check.py > compile_check.jsonl
    [--models vim_small dyvm_vim_small] [--device cuda] [--dtype bf16] [--batch-size 128] [--img-size 224]
    [--backend inductor]

DyVM's gates are calibrated to the authors' realised block keep ratio, as in dyvm.benchmark. Its token and gate
decisions are discrete: where the compiled arithmetic rounds differently (in bf16 the norms are inductor's fused
reference ops, not our kernel), near-tied decisions of an untrained model flip and the logits move far more than
rounding alone would move them. Images/s: `python -m dyvm.benchmark --modes compile eager cuda_graph`.
"""
import argparse
import contextlib
import json
import time

import torch
import torch._dynamo

from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, build_model

DTYPES = {"bf16": torch.bfloat16, "fp32": None}


def check(name, args):
    _, model, _ = build_model(name, args.device, args.img_size, block_keep_ratio=AUTHORS_REALISED_BLOCK_KEEP_RATIO,
                              calib_batch=max(args.batch_size, 8))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=args.device)
    dtype = DTYPES[args.dtype]
    autocast = torch.autocast(args.device, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    with torch.no_grad(), autocast:
        torch._dynamo.reset()
        explained = torch._dynamo.explain(model)(x[:8])
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=args.backend)
        start = time.perf_counter()
        got = compiled(x)
        if args.device == "cuda":
            torch.cuda.synchronize()
        first = time.perf_counter() - start
        want = model(x)
    got, want = got.float(), want.float()
    return {"model": name, "dtype": args.dtype, "batch": args.batch_size, "backend": args.backend,
            "graph_breaks": explained.graph_break_count, "graphs": explained.graph_count,
            "first_call_s": round(first, 1), "logits_rel_vs_eager": (got - want).norm().item() / want.norm().item(),
            "top1_agree": (got.argmax(-1) == want.argmax(-1)).float().mean().item()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["vim_small", "dyvm_vim_small"])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--backend", default="inductor", help="torch.compile backend (the CPU test uses 'eager')")
    args = p.parse_args(argv)
    rows = []
    for name in args.models:
        rows.append(check(name, args))
        print(json.dumps(rows[-1]), flush=True)
    return rows


if __name__ == "__main__":
    main()
