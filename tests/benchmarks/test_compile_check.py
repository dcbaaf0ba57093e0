"""benchmarks/compile_check.py runs end to end on a CPU (small images, the 'eager' backend): DyVM inference
traces whole, and the traced forward computes what the eager one does (tests/test_compile.py covers dense Vim and
the GPU's paths)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_compile_check_finds_no_graph_break():
    spec = importlib.util.spec_from_file_location("compile_check", ROOT / "benchmarks" / "compile_check.py")
    compile_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(compile_check)
    rows = compile_check.main(["--models", "dyvm_vim_tiny", "--device", "cpu", "--dtype", "fp32",
                               "--batch-size", "2", "--img-size", "32", "--backend", "eager"])
    for row in rows:
        assert row["graph_breaks"] == 0 and row["graphs"] == 1, row
        assert row["logits_rel_vs_eager"] < 1e-5, row
