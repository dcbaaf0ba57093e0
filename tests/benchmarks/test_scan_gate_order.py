"""benchmarks/scan_gate_order.py runs end to end on a CPU (tiny shapes, Triton's interpreter): every pattern's
two grids agree (the script exits otherwise) and each gets a row."""
import json

from tests.benchmarks.helpers import load_benchmark


def test_scan_gate_order_compares_grids_for_every_pattern(capsys):
    bench = load_benchmark("scan_gate_order")
    bench.main(["--device", "cpu", "--batch-size", "3", "--dim", "16", "--seqlens", "5", "--dtypes", "fp32"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"dtype"')]
    assert [r["pattern"] for r in rows] == ["one direction", *bench.PATTERNS]
    assert all(r["speedup"] > 0 for r in rows[1:])
