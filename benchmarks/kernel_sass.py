"""What the Triton kernels compile to on a GPU, found without one: registers, spills and the instructions of each loop.

    python benchmarks/kernel_sass.py [--arch 90] [--dtypes bf16 fp32] [--cases bwd fwd_ckpt train:vim_small ...]
                                     [--save-sass DIR] [--json FILE]

Runs the real host code on CPU tensors with every Triton launch replaced by the JIT's compile for the given GPU
architecture (a stand-in driver reports that target; the kernels do not run, so their outputs are garbage): the
kernels get the specialisation they get on the GPU (which arguments are 1, which divisible by 16), which decides
how wide their loads are. Cases: "bwd" / "fwd_ckpt", the scan backward / training forward called directly on CPU
tensors laid out as Vim-S's mixer passes them at training shapes (B and C strided views of x_proj's rows of
24 + 2 x 16 elements); "train:MODEL", a training forward and backward of a registry model at batch 2 (every kernel
of a training step; bf16 under CPU autocast; not the kernels a GPU path picks by its compute capability, such as
the fp32 tensor-core linear); "infer:MODEL", an inference forward. Then, from the SASS (Triton's
bundled cuobjdump): registers, spill bytes and, per loop (a backward branch), its instruction count and mix, and
its "merged waits": waits for an exponential that a load issued in the same iteration holds up (the scoreboards,
from the instructions' control bits; what stalls the scan backward's forward walk, docs/kernels.md).
Device time is short; this costs none. Instructions are not time (the scan kernels are bound by their walks'
latency), but they show what a change did to the code: docs/kernels.md, "Backward", counts them.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
if __name__ == "__main__":  # compiled kernels, whatever the caller's setting (the tests' is 1); a test that
    os.environ["TRITON_INTERPRET"] = "0"  # imports this file for its parsers leaves its own process's setting alone

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from scan_train_tuning import inputs  # noqa: E402  (the Vim-S mixer's layouts at training)

# the instruction classes shown per loop (SASS opcodes before the first '.')
CLASSES = ("FFMA", "FMUL", "FADD", "MUFU", "LDG", "STG", "LDS", "STS", "SHFL", "BAR", "LDL", "STL", "CCTL")


class OfflineDriver:
    """The parts of Triton's driver its JIT asks for before compiling: a device, a stream, the target."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


@contextmanager
def compiled_launches(arch: int):
    """Within the block, Triton launches compile for `arch` without running, and CPU tensors take the Triton
    kernels; yields the list that collects (kernel name, compiled kernel), one per new specialisation."""
    from triton.runtime.driver import driver
    from triton.runtime.jit import JITFunction

    from causal_conv1d import triton_utils
    from causal_conv1d.kernel_utils import triton_on_cpu

    got, seen, run, previous = [], set(), JITFunction.run, driver._active  # (None until a driver was asked for)

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        if id(kernel) not in seen:
            seen.add(id(kernel))
            got.append((self.__name__, kernel))
        return kernel

    JITFunction.run = compile_only
    driver.set_active(OfflineDriver(arch))
    try:
        with triton_on_cpu(), triton_utils.fast_launches(False):
            yield got
    finally:
        JITFunction.run = run
        driver._active = previous


def compile_case(case: str, dtype, arch: int) -> list:
    """[(kernel name, compiled kernel)] of one case (see the module's docstring)."""
    from mamba_ssm.ops.triton import selective_scan as ss

    kind, _, model_name = case.partition(":")
    with compiled_launches(arch) as got:
        if kind in ("bwd", "fwd_ckpt"):
            args, dout = inputs(dtype, "cpu", 2, 768, 197)  # (batch 2: the strides' specialisation is Vim-S's)
            ckpt = torch.zeros(2, 2, -(-197 // ss.CKPT_CHUNK), 16, 768)
            if kind == "bwd":
                ss.scan_backward(*args, dout, ckpt=ckpt)
            else:
                ss.scan_forward(*args, torch.empty_like(dout), want_ckpt=True)
        elif kind in ("train", "infer") and model_name:
            from dyvm.models.registry import create_model

            model = create_model(model_name, img_size=224).train(kind == "train")
            x = torch.randn(2, 3, 224, 224)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16), \
                    torch.set_grad_enabled(kind == "train"):
                out = model(x)
                if kind == "train":
                    (out if torch.is_tensor(out) else out.logits).float().sum().backward()
        else:
            raise ValueError(f"unknown case {case!r} (bwd, fwd_ckpt, train:MODEL, infer:MODEL)")
    return got


def _cuobjdump(*args) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    return subprocess.run([tool, *args], capture_output=True, text=True, check=True).stdout


def _opcode(text: str) -> str:
    """'@!P2 FMUL.FTZ R1, R2, R3' -> 'FMUL'."""
    return re.sub(r"^@!?U?P\w+\s+", "", text).split()[0].split(".")[0]


def control_bits(high_word: int) -> tuple:
    """(write scoreboard, read scoreboard, wait mask) of an sm_70+ instruction from the high 64 bits of its encoding
    (bits 105-125 of 128: stall 4, yield 1, write scoreboard 3, read scoreboard 3, wait mask 6, reuse 4; scoreboard
    7 is none). A variable-latency instruction (a load, MUFU) counts up its write scoreboard until its result is
    written, and a read scoreboard until its source registers are read; an instruction with bit k of its wait mask
    set waits until everything on scoreboard k is done."""
    c = high_word >> 41
    return (c >> 5) & 7, (c >> 8) & 7, (c >> 11) & 63


def merged_waits(body: list) -> int:
    """How many waits in a loop body [(text, high word)] are on a scoreboard that holds both a MUFU result and a
    load issued since that scoreboard's last wait: ptxas has six scoreboards, and where it puts an exponential on
    one that the next step's prefetched loads hold, the exponential's user waits for those loads
    (docs/kernels.md, "What the walks wait on")."""
    pending, merged = {k: set() for k in range(6)}, 0
    for text, high in body:
        write, read, wait = control_bits(high)
        for k in range(6):
            if wait >> k & 1:
                merged += {"MUFU", "LDG"} <= pending[k]
                pending[k] = set()
        for k in (write, read):
            if k != 7:
                pending[k].add(_opcode(text))
    return merged


def analyse_sass(sass: str) -> list:
    """The loops (a backward branch each) of cuobjdump's SASS text: [{"start", "end", "instructions",
    "merged_waits", <class>: count}]."""
    code = [(int(a, 16), text, int(high, 16)) for a, text, high in re.findall(
        r"/\*([0-9a-f]{4,})\*/\s+([^;]*);\s*/\* 0x[0-9a-f]+ \*/\s*/\* (0x[0-9a-f]+) \*/", sass)]
    index = {addr: i for i, (addr, _, _) in enumerate(code)}
    loops = set()
    for i, (addr, text, _) in enumerate(code):
        target = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr and int(target.group(1), 16) in index:
            loops.add((index[int(target.group(1), 16)], i))
    rows = []
    for first, last in sorted(loops):
        body = code[first:last + 1]
        ops = collections.Counter(_opcode(t) for _, t, _ in body)
        rows.append({"start": hex(code[first][0]), "end": hex(code[last][0]), "instructions": last - first + 1,
                     "merged_waits": merged_waits([(t, h) for _, t, h in body]), **{c: ops[c] for c in CLASSES}})
    return rows


def sass_report(cubin: bytes) -> dict:
    """{"registers", "stack_bytes", "loops": analyse_sass's, "sass"} of a cubin."""
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        usage, sass = _cuobjdump("--dump-resource-usage", path), _cuobjdump("-sass", path)
    regs, stack = re.search(r"REG:(\d+)", usage), re.search(r"STACK:(\d+)", usage)
    return {"registers": int(regs.group(1)) if regs else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "loops": analyse_sass(sass), "sass": sass}


def innermost(loops: list) -> list:
    """The loops that hold no other loop (the walks' bodies, one step or one group of steps each)."""
    def inside(a, b):
        return int(b["start"], 16) <= int(a["start"], 16) and int(a["end"], 16) <= int(b["end"], 16) and a != b
    return [lp for lp in loops if not any(inside(other, lp) for other in loops)]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: Hopper)")
    p.add_argument("--dtypes", nargs="+", choices=("bf16", "fp32"), default=["bf16", "fp32"])
    p.add_argument("--cases", nargs="+", default=["bwd", "fwd_ckpt"],
                   help="bwd, fwd_ckpt, train:MODEL, infer:MODEL (MODEL: a registry name, e.g. vim_small)")
    p.add_argument("--save-sass", default="", metavar="DIR", help="also write each kernel's SASS there")
    p.add_argument("--json", default="", help="also write every kernel's registers, stack and loops here")
    args = p.parse_args(argv)
    dtypes = {"bf16": torch.bfloat16, "fp32": torch.float32}
    reports = []
    for case in args.cases:
        for name in args.dtypes:
            for kernel, compiled in compile_case(case, dtypes[name], args.arch):
                rep = sass_report(compiled.asm["cubin"])
                reports.append({"case": case, "dtype": name, "kernel": kernel, "arch": args.arch,
                                **{k: v for k, v in rep.items() if k != "sass"}})
                print(f"{case} {name} {kernel} sm_{args.arch}: {rep['registers']} registers, {rep['stack_bytes']} "
                      f"bytes of stack", flush=True)
                for lp in innermost(rep["loops"]):
                    mix = " ".join(f"{c} {lp[c]}" for c in CLASSES if lp[c])
                    print(f"  loop {lp['start']}-{lp['end']}: {lp['instructions']:4d} instructions | {mix} | "
                          f"merged waits {lp['merged_waits']}")
                if args.save_sass:
                    os.makedirs(args.save_sass, exist_ok=True)
                    with open(os.path.join(args.save_sass, f"{case}_{name}_{kernel}.sass"), "w") as f:
                        f.write(rep["sass"])
    if args.json:
        import json

        import triton

        with open(args.json, "w") as f:
            json.dump({"triton": triton.__version__, "command": " ".join(sys.argv), "kernels": reports}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
