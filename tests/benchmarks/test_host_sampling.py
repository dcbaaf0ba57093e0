"""benchmarks/host_sampling.py: the summary of py-spy's stacks, and the whole recording run on a CPU with a stand-in
py-spy (the real one needs ptrace rights, which CI need not have)."""
import os
import stat
import sys

import pytest

from tests.benchmarks.helpers import load_benchmark

RAW = [
    # outside a forward: not counted
    "<module> (loop.py:9);warm_up (loop.py:3);0x7f00 (libc.so.6) 50",
    # a forward: the interpreter itself, then F.linear into the driver, then a Triton launch in its C launcher
    "<module> (w.py:1);_eager_forward (w.py:5);Vim.forward (dyvm/models/vim.py:250) 2",
    "<module> (w.py:1);_eager_forward (w.py:5);Vim.forward (dyvm/models/vim.py:250);"
    "linear (mamba_ssm/ops/linear_fp32.py:199);at::_ops::linear::call (libtorch_cpu.so);"
    "cuLaunchKernel (libcuda.so.580.1) 5",
    "<module> (w.py:1);_eager_forward (w.py:5);Vim.forward (dyvm/models/vim.py:251);"
    "launch (causal_conv1d/triton_utils.py:240);FastLauncher.__call__ (causal_conv1d/triton_utils.py:160);"
    "launch (__triton_launcher.cpython-312-x86_64-linux-gnu.so) 3",
    "",
]


def test_summarise_counts_the_samples_of_forwards_by_library_frame_and_function():
    sampling = load_benchmark("host_sampling")
    s = sampling.summarise(RAW)
    assert s["samples"] == 10
    assert s["library"] == {"python": 2, "libcuda.so (the CUDA driver)": 5, "Triton's C launcher": 3}
    assert s["python_frame"] == {"Vim.forward (dyvm/models/vim.py)": 2, "linear (mamba_ssm/ops/linear_fp32.py)": 5,
                                 "FastLauncher.__call__ (causal_conv1d/triton_utils.py)": 3}
    # inclusive: a function once per stack, whatever its lines
    assert s["inclusive"]["Vim.forward (dyvm/models/vim.py)"] == 10
    assert s["inclusive"]["launch (causal_conv1d/triton_utils.py)"] == 3
    text = sampling.report("vim", s, top=3)
    assert "== vim: 10 samples inside forwards" in text and " 50.0%  libcuda.so (the CUDA driver)" in text
    # another script's stacks: any function as the marker, bare or qualified
    assert sampling.summarise(RAW, marker="forward")["samples"] == 10
    assert sampling.summarise(RAW, marker="warm_up")["samples"] == 50
    assert "no samples inside a forward" in sampling.report("x", sampling.summarise(RAW[:1]), top=3)


def test_a_missing_py_spy_is_one_line(monkeypatch):
    sampling = load_benchmark("host_sampling")
    monkeypatch.setattr(sampling.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="py-spy is not on PATH"):
        sampling.main(["--device", "cpu"])


def test_records_each_model_with_py_spy_and_prints_its_summary(tmp_path, monkeypatch, capsys):
    """The worker builds the model and runs forwards on the CPU; a stand-in py-spy checks it was called on a live
    process and writes stacks through the worker's marker."""
    sampling = load_benchmark("host_sampling")
    fake = tmp_path / "bin" / "py-spy"
    fake.parent.mkdir()
    fake.write_text(f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
pid = int(args[args.index("-p") + 1])
os.kill(pid, 0)  # raises if the worker is not running
assert "--native" in args and args[args.index("--format") + 1] == "raw"
with open(args[args.index("-o") + 1], "w") as out:
    out.write("<module> (w.py:1);_eager_forward (host_sampling.py:40);Vim.forward (dyvm/models/vim.py:250) 4\\n")
""")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    sampling.main(["--device", "cpu", "--models", "vim_small", "--dtype", "fp32", "--batch-size", "1", "--img-size",
                   "32", "--seconds", "0", "--out", str(tmp_path / "out")])
    out = capsys.readouterr().out
    assert "== vim_small: 4 samples inside forwards (vim_small: " in out and "forwards while sampled" in out
    assert "100.0%  Vim.forward (dyvm/models/vim.py)" in out
    assert (tmp_path / "out" / "vim_small.raw").exists()
