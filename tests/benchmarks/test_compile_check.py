"""benchmarks/compile_check.py runs end to end on a CPU (small images, the 'eager' backend): DyVM inference
traces whole, and the traced forward computes what the eager one does (tests/test_compile.py covers dense Vim and
the GPU's paths)."""
from tests.benchmarks.helpers import load_benchmark


def test_compile_check_finds_no_graph_break():
    compile_check = load_benchmark("compile_check")
    rows = compile_check.main(["--models", "dyvm_vim_tiny", "--device", "cpu", "--dtype", "fp32",
                               "--batch-size", "2", "--img-size", "32", "--backend", "eager"])
    for row in rows:
        assert row["graph_breaks"] == 0 and row["graphs"] == 1, row
        assert row["logits_rel_vs_eager"] < 1e-5, row
