"""Every entry point sets thread settings that do not spin (OMP_WAIT_POLICY=PASSIVE) before torch loads."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs an entry point with --help under an import hook that records OMP_WAIT_POLICY when torch is imported.
PROBE = """
import os, runpy, sys
class Probe:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            sys.stderr.write("OMP_WAIT_POLICY at torch import: %s\\n" % os.environ.get("OMP_WAIT_POLICY"))
            sys.meta_path.remove(self)
        return None
sys.meta_path.insert(0, Probe())
kind, target = sys.argv[1], sys.argv[2]
sys.argv = [target, "--help"]
try:
    runpy.run_path(target, run_name="__main__") if kind == "path" else runpy.run_module(target, run_name="__main__")
except SystemExit:
    pass
"""


@pytest.mark.parametrize("kind,target,preset", [
    ("path", "main.py", None),  # main.py imports dyvm before torch
    ("module", "dyvm.flops", "ACTIVE"),  # python -m dyvm.* runs dyvm/__init__.py first; a value given wins
])
def test_entry_points_do_not_spin(kind, target, preset):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    proc = subprocess.run([sys.executable, "-c", PROBE, kind, target], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert f"OMP_WAIT_POLICY at torch import: {preset or 'PASSIVE'}" in proc.stderr, proc.stderr[-2000:]
    assert "usage:" in proc.stdout
