"""The throughput benchmark: gate calibration of an untrained DyVM, timing, the CLI's table and JSON."""
import json
import os

import pytest
import timm
import torch

import dyvm  # noqa: F401
from dyvm.benchmark import calibrate_gates, main as bench_main, measure_throughput

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny(name, **kw):
    torch.manual_seed(0)
    return timm.create_model(name, img_size=32, patch_size=4, depth=6, embed_dim=32, num_classes=10, **kw)


@pytest.mark.parametrize("keep", [0.735, 0.5])
def test_calibrated_gates_hit_the_target_and_vary_per_image(keep):
    model = tiny("dyvm_vim_tiny", pruning_loc=(2, 3, 4))
    realised = calibrate_gates(model, keep, batch_size=64, img_size=32, in_chans=3, device="cpu")
    assert abs(realised - keep) < 0.1
    with torch.no_grad():
        gates = model.eval().forward_aux(torch.randn(16, 3, 32, 32)).gates > 0.5  # (depth, B, 2)
    assert gates[1:].float().std(dim=1).max() > 0  # later layers: different images run different directions


def test_calibration_needs_gate_heads():
    with pytest.raises(ValueError, match="no gate heads"):
        calibrate_gates(tiny("dyvm_vim_tiny", pruning_loc=(2, 3, 4), block_selection=False), 0.7, 8, 32, 3, "cpu")


def test_measure_throughput_restores_mode():
    model = tiny("vim_tiny").train()
    r = measure_throughput(model, batch_size=4, img_size=32, in_chans=3, device="cpu", warmup=1, iters=3)
    assert r["images_per_s"] > 0 and r["iters"] == 3 and model.training


def test_cli_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert bench_main(["--models", "vim_tiny", "dyvm_vim_tiny", "--img-size", "32", "--batch-sizes", "2",
                       "--dtypes", "fp32", "--block-keep-ratio", "0.7", "--warmup", "1", "--iters", "2",
                       "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "torch:" in text and "date:" in text and "x the dense model" in text
    res = json.loads(out.read_text())
    assert {r["model"] for r in res["rows"]} == {"vim_tiny", "dyvm_vim_tiny"}
    assert res["speedups"][0]["model"] == "dyvm_vim_tiny" and res["speedups"][0]["speedup_vs_dense"] > 0


def test_profile_names_where_the_time_goes():
    from dyvm.benchmark import profile_top

    table = profile_top(tiny("vim_tiny"), batch_size=2, img_size=32, in_chans=3, device="cpu", top=5)
    assert "Self CPU" in table and "aten::" in table


def test_cuda_graph_needs_cuda():
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        measure_throughput(tiny("vim_tiny"), batch_size=2, img_size=32, in_chans=3, device="cpu", mode="cuda_graph")


def test_other_backbones_by_timm_and_authors_names(capsys, tf32_switch):
    """The authors' names are DyVM students; dense and DyVM models of a family pair up for the speed-up."""
    from dyvm.benchmark import build_model

    name, model, _ = build_model("MambaReg-Tiny", "cpu", img_size=32)
    assert name == "dyvm_mambareg_tiny" and model.cfg.family == "MambaReg" and not model.training
    assert bench_main(["--models", "videomamba_tiny", "VideoMamba-Tiny", "--img-size", "32", "--batch-sizes", "2",
                       "--dtypes", "fp32", "--warmup", "1", "--iters", "1"]) == 0
    assert "dyvm_videomamba_tiny fp32 batch 2 eager:" in capsys.readouterr().out
    # --tf32 reaches torch's switch for fp32 matmuls (what main.py --tf32 sets)
    assert bench_main(["--models", "vim_tiny", "--img-size", "32", "--batch-sizes", "1", "--dtypes", "fp32",
                       "--warmup", "1", "--iters", "1", "--tf32"]) == 0
    assert torch.backends.cuda.matmul.allow_tf32


def test_block_keep_ratio_flag(capsys):
    """--block-keep-ratio takes a fraction or 'authors' (the authors' realised 0.735); --gate-keep is its old
    name; a ratio outside [0, 1] is the same one-line error as in main.py and dyvm.flops."""
    from dyvm.benchmark import AUTHORS_REALISED_BLOCK_KEEP_RATIO, _block_keep_ratio

    assert _block_keep_ratio("authors") == AUTHORS_REALISED_BLOCK_KEEP_RATIO == 0.735
    assert _block_keep_ratio("0.5") == 0.5
    for flag in ("--block-keep-ratio", "--gate-keep"):
        assert bench_main(["--models", "dyvm_vim_tiny", flag, "1.5"]) == 2
        assert capsys.readouterr().err.strip() == "error: --block-keep-ratio must be in [0, 1], got 1.5"


def test_seed_makes_runs_time_the_same_decisions():
    """DyVM's speed follows how many directions its gates run: --seed (default 0) fixes the weights, the gate
    calibration and the inputs, so two runs (or two revisions) time the same realised keep ratio."""
    from dyvm.benchmark import run

    def realised(seed):
        rows = run(["dyvm_vim_tiny"], [2], ["fp32"], 32, "cpu", 0.6, None, 1, 1, seed=seed)
        return rows[0]["block_keep_ratio"]

    first = realised(0)
    torch.rand(3)  # whatever ran in between
    assert realised(0) == first


class Recorder(torch.nn.Module):
    """A model that records its calls (name, input) in a shared log."""

    def __init__(self, name, log):
        super().__init__()
        self.name, self.log = name, log

    def forward(self, x):
        self.log.append((self.name, x.clone()))
        return x.sum()


def test_interleaved_models_take_turns_on_the_same_batch():
    from dyvm.benchmark import ROUND, measure_interleaved

    log = []
    models = {"a": Recorder("a", log).train(), "b": Recorder("b", log).eval()}
    res = measure_interleaved(models, batch_size=2, img_size=4, in_chans=1, device="cpu", warmup=1,
                              iters=2 * ROUND + 1, seed=3)
    names = [n for n, _ in log]
    timed = names[2:]  # after one warm-up call each
    assert names[:2] == ["a", "b"]
    assert timed == ["a"] * ROUND + ["b"] * ROUND + ["b"] * ROUND + ["a"] * ROUND + ["a", "b"]
    assert all(torch.equal(x, log[0][1]) for _, x in log)  # one batch for every model and call
    again = []
    measure_interleaved({"c": Recorder("c", again)}, 2, 4, 1, "cpu", warmup=0, iters=1, seed=3)
    assert torch.equal(again[0][1], log[0][1])  # the batch follows the seed alone
    for name in models:
        r = res[name]
        assert len(r["round_s"]) == 3 and r["iters"] == 2 * ROUND + 1 and r["images_per_s"] > 0
        assert 0 < r["median_host_s"] <= r["median_batch_s"] * 10
    assert models["a"].training and not models["b"].training  # modes restored


def test_paired_speedup_is_the_median_of_round_ratios():
    from dyvm.benchmark import paired_speedup

    fast = {"round_s": [1.0, 1.0, 4.0], "images_per_s": 10.0}
    slow = {"round_s": [2.0, 3.0, 4.0], "images_per_s": 10.0}
    assert paired_speedup(fast, slow) == 2.0  # rounds: 2, 3, 1
    assert paired_speedup({"images_per_s": 30.0}, {"images_per_s": 10.0}) == 3.0  # timed apart


def test_host_bound_eager_gpu_rows_point_to_graphs():
    """An eager GPU timing whose calls returned after 90% of the batch's time was set by the host: its row says so
    and names the graphed path; graphed rows, CPU rows and GPU-bound rows do not."""
    from dyvm.benchmark import host_bound

    row = dict(mode="eager", median_host_s=0.0095, median_batch_s=0.010)
    assert host_bound(row, "cuda") and not host_bound(row, "cpu")
    assert not host_bound(dict(row, mode="cuda_graph"), "cuda")
    assert not host_bound(dict(row, median_host_s=0.005), "cuda")
