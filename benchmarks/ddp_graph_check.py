"""Graphed DDP training steps against eager DDP steps, at full size on several GPUs:

    torchrun --standalone --nproc_per_node=2 benchmarks/ddp_graph_check.py [--dtype bf16]

DyVM-Vim-S (its frozen teacher, the full DyVM loss, no Gumbel noise) from the same weights on every process, each
process its own batches of 8; 14 steps of fused AdamW with a learning-rate change after step 7, first eagerly
(DDP as main.py builds it), then through dyvm.train_graph (11 eager DDP steps, then captured replays). Prints, on
rank 0: the parameters' relative difference graph against eager, whether every process holds the same
parameters, and then whether a non-finite batch on one process (and a finite one after it: the loop reads each step's
flag a step late) makes every process raise naming that step, with its weights kept.
"""
import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def flat(model):
    return torch.cat([p.detach().flatten().float() for p in model.parameters()])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", default="bf16", choices=("fp32", "bf16"))
    args = p.parse_args()
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import create_optimizer_v2

    from dyvm.checkpoint import load_checkpoint
    from dyvm.engine import AuxForward, NonFiniteLossError, train_one_epoch
    from dyvm.losses import DyVMLoss, build_teacher
    from dyvm.models.registry import create_model
    from dyvm.train_graph import GraphedTrainStep, distributed_for_graphs

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl")
    amp = {"fp32": None, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    dense = create_model("vim_small")
    student = create_model("dyvm_vim_small", gumbel_noise=False)
    load_checkpoint(student, dense.state_dict())
    teacher = build_teacher(student.cfg, dense.state_dict()).to(device)
    g = torch.Generator().manual_seed(100 + rank)
    batches = [(torch.randn(8, 3, 224, 224, generator=g).to(device),
                torch.softmax(torch.randn(8, 1000, generator=g), -1).to(device)) for _ in range(14)]
    start = flat(student).to(device)
    finals = {}
    for mode in ("eager", "graph"):
        model = copy.deepcopy(student).to(device)
        opt = create_optimizer_v2(model, opt="adamw", lr=1e-4, weight_decay=0.05, fused=True, capturable=True)
        crit = DyVMLoss.from_model(model, SoftTargetCrossEntropy(), teacher, token_weight=10.0, block_weight=10.0)
        if mode == "graph":
            train_model, stream = distributed_for_graphs(AuxForward(model), device, find_unused_parameters=True)
            step = GraphedTrainStep(train_model, crit, opt, amp, stream=stream)
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(AuxForward(model), device_ids=[device.index],
                                                                    find_unused_parameters=True)
            step = None
        for epoch, part in enumerate((batches[:7], batches[7:])):
            train_one_epoch(train_model, crit, part, opt, device, epoch, amp_dtype=amp, graph_step=step)
            for group in opt.param_groups:
                group["lr"] = group["lr"] * 0.5
        finals[mode] = (flat(model), step, train_model, model, opt, crit)
    pe, pg = finals["eager"][0], finals["graph"][0]
    same = torch.stack([pg.sum(), pg.square().sum()])
    gathered = [torch.empty_like(same) for _ in range(world)]
    dist.all_gather(gathered, same)
    report = {
        "params rel, graph vs eager": ((pg - pe).norm() / pe.norm()).item(),
        "(graph - eager) / (eager - start)": ((pg - pe).norm() / (pe - start).norm()).item(),
        "captured": finals["graph"][1].graph is not None,
        "every process holds the same parameters": all(torch.equal(gathered[0], t) for t in gathered),
    }
    _, step, train_model, model, opt, crit = finals["graph"]
    x, y = batches[0]
    # a batch non-finite on the last process, then a finite one: the loop reads the first step's flag after
    # launching the second, whose update the graph's flag skips too; every process names step 0
    bad = [(x.clone().fill_(float("nan")) if rank == world - 1 else x, y), batches[1]]
    before = flat(model)
    try:
        train_one_epoch(train_model, crit, bad, opt, device, 2, amp_dtype=amp, graph_step=step)
        report["non-finite on the last process"] = "NOT raised"
    except NonFiniteLossError as e:
        report["non-finite on the last process"] = f"raised ({e}); weights kept: {torch.equal(before, flat(model))}"
    for r in range(world):
        if r == rank:
            print(f"rank {rank} ({args.dtype}, world {world}): {report}", flush=True)
        dist.barrier()
    # Free the graphs before the process group: a first run, which tore the group down while they were alive,
    # hung there after printing its results.
    del finals, step, train_model, model, opt, crit
    torch.cuda.synchronize()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
