"""benchmarks/kernel_sass.py compiles the scan backward for a Hopper GPU on this CPU machine, through the real
launch path and the JIT's own specialisation, and reads its SASS: what the kernel's loads came to (no GPU)."""
import json

from tests.benchmarks.helpers import dry_run, load_benchmark


def test_kernel_sass_offline():
    # (python benchmarks/kernel_sass.py --cases bwd --json DIR/sass.json, started in the background when
    # collection ended: tests.benchmarks.helpers.DRY_RUNS)
    returncode, output, folder = dry_run("test_kernel_sass_offline", timeout=300)
    assert returncode == 0, output[-6000:]
    kernels = json.loads((folder / "sass.json").read_text())["kernels"]
    assert [(k["dtype"], k["kernel"]) for k in kernels] == [("bf16", "_scan_bwd_kernel"), ("fp32", "_scan_bwd_kernel")]
    for k in kernels:
        assert 0 < k["registers"] <= 255 and k["stack_bytes"] == 0, k  # no spills
        walks = load_benchmark("kernel_sass").innermost(k["loops"])
        assert len(walks) == 10, walks  # per direction: advance, forward walk, dC sums, adjoint walk, dB sums
        advance = walks[0]
        # a step of the advance loads u and delta (one element per lane) and B: in 16-byte pieces, not one load
        # per state (x_proj's rows of 56 elements: the strides' units, docs/kernels.md)
        assert advance["LDG"] <= 6 and advance["SHFL"] == 0 and advance["BAR"] == 0, advance
        adjoint = walks[3]  # the walks hold no layout conversions (a channel per lane)
        assert adjoint["SHFL"] == 0 and adjoint["BAR"] == 0 and adjoint["LDS"] == 0, adjoint
