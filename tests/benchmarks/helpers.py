"""Helpers of the benchmark scripts' tests."""
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_benchmark(name: str):
    """The script benchmarks/<name>.py as a module (the benchmarks folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The benchmarks' dry runs: subprocesses of a minute or so each on the Triton interpreter. Started when collection
# ends (conftest.py), so that they run on the second core while the suite goes on; each test waits for its own.
DRY_RUNS = {
    "test_kernel_benchmark_dry_run": ("kernels.py", ["--dry-run", "--sweep", "--save-tuning", "{dir}/tuning.json",
                                                     "--out", "{dir}/bench.json"]),
    "test_scan_train_tuning_dry_run": ("scan_train_tuning.py", ["--dry-run", "--out", "{dir}/tuning.json",
                                                                "--results", "{dir}/rows.json"]),
    "test_scan_backward_ab_dry_run": ("scan_backward_ab.py", ["--dry-run", "--save", "{dir}/grads.pt"]),
    "test_scan_lengths_dry_run": ("scan_lengths.py", ["--dry-run", "--shares", "0.7", "0.343", "--json",
                                                      "{dir}/lengths.json"]),
    "test_train_small_ops_dry_run": ("train_small_ops.py", ["--dry-run", "--json", "{dir}/ops.json"]),
    "test_kernel_sass_offline": ("kernel_sass.py", ["--cases", "bwd", "train:vim_tiny", "--dtypes", "bf16", "--json",
                                                    "{dir}/sass.json"]),
}
_started = {}  # test name -> (Popen, output folder)


def script_env() -> dict:
    """The environment the benchmark scripts run in: this checkout's packages first."""
    return dict(os.environ, PYTHONPATH=f"{ROOT / 'mamba-1p1p1'}{os.pathsep}{ROOT}")


def start_dry_run(test: str) -> None:
    script, args = DRY_RUNS[test]
    folder = Path(tempfile.mkdtemp(prefix=f"{test}-"))
    argv = [sys.executable, str(ROOT / "benchmarks" / script), *[a.format(dir=folder) for a in args]]
    _started[test] = (subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=script_env()), folder)


def dry_run(test: str, timeout: int = 600):
    """(return code, output, output folder) of the test's dry run, started now if collection did not start it."""
    if test not in _started:
        start_dry_run(test)
    proc, folder = _started.pop(test)
    try:
        output, _ = proc.communicate(timeout=timeout)
    finally:
        proc.kill()
    return proc.returncode, output, folder


def stop_dry_runs() -> None:
    """The runs whose tests did not wait for them (deselected after collection, or the session stopped early)."""
    for proc, folder in _started.values():
        proc.kill()
        proc.wait()
        shutil.rmtree(folder, ignore_errors=True)
    _started.clear()
