"""benchmarks/scan_gate_order.py runs end to end on a CPU (tiny shapes, Triton's interpreter): every pattern's
two grids agree (the script exits otherwise) and each gets a row."""
import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scan_gate_order_compares_grids_for_every_pattern(capsys):
    spec = importlib.util.spec_from_file_location("scan_gate_order", ROOT / "benchmarks" / "scan_gate_order.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--device", "cpu", "--batch-size", "3", "--dim", "16", "--seqlens", "5", "--dtypes", "fp32"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"dtype"')]
    assert [r["pattern"] for r in rows] == ["one direction", *bench.PATTERNS]
    assert all(r["speedup"] > 0 for r in rows[1:])
