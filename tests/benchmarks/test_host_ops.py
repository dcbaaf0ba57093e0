"""benchmarks/host_ops.py runs end to end (--dry-run: 4-layer tiny models) and its counts mean what they say:
the CUDA-path proxy launches the Triton kernels a Vim layer needs (add+norm, conv, scan, and the scan's direction
sum where the tuning splits the directions) and no more, and a plain layer costs the same everywhere."""
import pytest

from tests.benchmarks.helpers import ROOT, load_benchmark


@pytest.fixture(scope="module")
def host_ops():
    return load_benchmark("host_ops")


@pytest.fixture(scope="module")
def results(host_ops, tmp_path_factory):
    out = tmp_path_factory.mktemp("host_ops") / "host_ops.json"
    return host_ops.main(["--dry-run", "--json", str(out)]), out


def test_dry_run_counts(results):
    res, out = results
    assert out.exists()
    assert set(res) == {f"{m}/{p}" for m in ("vim_tiny", "dyvm_vim_tiny") for p in ("cpu", "cuda-proxy")}
    for name, r in res.items():
        assert r["depth"] == 4
        for key in ("launches", "dispatched", "calls"):
            assert r[key]["forward"] > 0 and r[key]["layer"] > 0, (name, key)
        assert r["host_us"]["forward"] > 0
    for model in ("vim_tiny", "dyvm_vim_tiny"):
        proxy, cpu = res[f"{model}/cuda-proxy"], res[f"{model}/cpu"]
        assert cpu["triton"]["forward"] == 0  # the CPU path runs no Triton kernel
        # per layer: add+norm, conv, scan (+ the direction sum when the tuning splits directions), and DyVM's
        # gated projections (x_proj and dt_proj of the pairs that are on, the gate head inside: fp32 takes them as
        # three TF32 products, where a dense layer's two batched matmuls run); plus norm_f, and DyVM's three
        # pruning stages (pruning_loc 1, 2, 3) of four kernels each
        dyvm = model.startswith("dyvm")
        assert proxy["triton"]["layer"] - dyvm in (3, 4)
        assert ("triton::_gated_proj_kernel" in proxy["kernels"]) == dyvm
        assert "triton::_gate_head_kernel" not in proxy["kernels"]  # (eager: the head is in the projections)
        assert ("aten::bmm" in proxy["kernels"]) != dyvm
        assert proxy["triton"]["forward"] == 4 * proxy["triton"]["layer"] + 1 + 12 * dyvm
        for stage_kernel in ("triton::_patch_norm_kernel", "triton::_pool_concat_kernel", "triton::_select_kernel",
                             "triton::_stage_gather_kernel"):
            assert (proxy["kernels"].get(stage_kernel, 0) == 3) == dyvm
        assert "triton::_scan_fwd_kernel" in proxy["kernels"]
    # one projections launch with the gate head inside against a dense layer's two matmuls: a DyVM layer launches
    # one kernel less
    assert res["dyvm_vim_tiny/cuda-proxy"]["launches"]["layer"] == res["vim_tiny/cuda-proxy"]["launches"]["layer"] - 1


def test_proxy_restores_the_kernels(host_ops):
    import collections

    from mamba_ssm.ops.triton import selective_scan

    kernel = selective_scan._scan_fwd_kernel
    counter = collections.Counter()
    with host_ops.cuda_proxy(counter):
        assert selective_scan._scan_fwd_kernel is not kernel
    assert selective_scan._scan_fwd_kernel is kernel


def test_baseline_comparison_runs(host_ops):
    """--baseline: the same measurement of another checkout (here this one), in processes of their own."""
    res = host_ops.main(["--dry-run", "--paths", "cuda-proxy", "--baseline", str(ROOT), "--repeat", "1"])
    assert set(res) == {f"{m}/cuda-proxy [{label}]" for m in ("vim_tiny", "dyvm_vim_tiny")
                        for label in ("baseline", "this")}
    for model in ("vim_tiny", "dyvm_vim_tiny"):  # the same code counts the same
        a, b = res[f"{model}/cuda-proxy [baseline]"], res[f"{model}/cuda-proxy [this]"]
        assert a["launches"] == b["launches"] and a["dispatched"] == b["dispatched"]
