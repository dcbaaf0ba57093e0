"""benchmarks/kernel_sass.py compiles the kernels for a Hopper GPU on this CPU machine, through the real host code
and the JIT's own specialisation, and reads their SASS: what the scan backward's loads came to, and every kernel
of a Vim-T training step compiled (no GPU)."""
import json

from tests.benchmarks.helpers import dry_run, load_benchmark


def test_kernel_sass_offline():
    # (python benchmarks/kernel_sass.py --cases bwd train:vim_tiny --dtypes bf16 --json DIR/sass.json, started in
    # the background when collection ended: tests.benchmarks.helpers.DRY_RUNS)
    returncode, output, folder = dry_run("test_kernel_sass_offline", timeout=300)
    assert returncode == 0, output[-6000:]
    kernels = json.loads((folder / "sass.json").read_text())["kernels"]
    step = {k["kernel"] for k in kernels if k["case"] == "train:vim_tiny"}
    assert step == {"_norm_fwd_kernel", "_conv_fwd_kernel", "_scan_fwd_kernel", "_sum_directions_kernel",
                    "_norm_bwd_kernel", "_scan_bwd_kernel", "_sum_bc_partials_kernel", "_conv_bwd_walk_kernel",
                    "_sum_middle_kernel"}, step
    backward = [k for k in kernels if k["case"] == "bwd" and k["kernel"] == "_scan_bwd_kernel"]
    assert [(k["dtype"], k["kernel"]) for k in kernels if k["case"] == "bwd"] == \
        [("bf16", "_scan_bwd_kernel"), ("bf16", "_sum_bc_partials_kernel"), ("bf16", "_sum_middle_kernel")]
    for k in backward:
        assert 0 < k["registers"] <= 255 and k["stack_bytes"] == 0, k  # no spills
        loops = load_benchmark("kernel_sass").innermost(k["loops"])
        # the L2 prefetches of the first chunk's inputs (loops of CCTL.E.PF2, before each direction's walks; those of
        # each next chunk, inside the chunk loop, hold no loop) and nothing else; the walks: per direction, advance,
        # forward walk, adjoint walk (which sums dB and dC), which prefetch nothing into L2
        prefetches, walks = [lp for lp in loops if lp["CCTL"]], [lp for lp in loops if not lp["CCTL"]]
        assert prefetches and not any(lp["MUFU"] or lp["LDG"] or lp["STG"] for lp in prefetches), prefetches
        assert len(walks) == 6, walks
        advance = walks[0]
        # a step of the advance loads u and delta (one element per lane) and B: in 16-byte pieces, not one load
        # per state (x_proj's rows of 56 elements: the strides' units, docs/kernels.md)
        assert advance["LDG"] <= 6 and advance["SHFL"] == 0 and advance["BAR"] == 0, advance
        forward, adjoint = walks[1], walks[2]  # the walks hold no layout conversions (a channel per lane)
        # their scratch in shared memory: a step's state in four 16-byte stores (loads), its dy in one; and nothing
        # else goes through shared memory (Triton's layout conversions would)
        assert forward["SHFL"] == 0 and forward["BAR"] == 0 and forward["STS"] == 5 and forward["LDS"] == 0, forward
        # the adjoint's only shuffles: the reduce-scatters of dB and dC, 8 + 4 + 2 + 1 + 1 values each
        assert adjoint["SHFL"] == 32 and adjoint["BAR"] == 0 and adjoint["LDS"] == 5 and adjoint["STS"] == 0, adjoint
        assert all(isinstance(w["merged_waits"], int) for w in walks), walks


def test_the_sass_reader_counts_waits_that_a_load_holds_up():
    """kernel_sass reads each instruction's scoreboards from its encoding and counts, per loop, the waits for a
    MUFU result on a scoreboard that a load issued in the same iteration also holds (on a hand-made loop)."""
    ks = load_benchmark("kernel_sass")

    def line(addr, text, write=7, read=7, wait=0):
        high = ((write << 5) | (read << 8) | (wait << 11)) << 41
        return f"        /*{addr:04x}*/   {text} ;   /* 0x000000000000794c */\n        /* {high:#018x} */\n"

    sass = (line(0x10, "LDG.E R2, desc[UR4][R4.64]", write=2)
            + line(0x20, "MUFU.EX2 R3, R5", write=2)
            + line(0x30, "FMUL R6, R3, R7", wait=0b100)  # scoreboard 2: the exponential and the load
            + line(0x40, "MUFU.EX2 R8, R9", write=1, read=2)
            + line(0x50, "FMUL R10, R8, R7", wait=0b10)  # scoreboard 1: the exponential alone
            + line(0x60, "@P0 BRA 0x10"))
    [loop] = ks.analyse_sass(sass)
    assert (loop["instructions"], loop["MUFU"], loop["LDG"], loop["merged_waits"]) == (6, 2, 1, 1), loop
    assert ks.control_bits(((3 << 5) | (7 << 8) | (0b101 << 11) | 9) << 41) == (3, 7, 0b101)
