"""benchmarks/train_step.py times GPU steps; what it sets up is checked here on a CPU: predictors that keep the
target share of the tokens, as a fine-tune's ratio loss holds them."""
import timm
import torch

import dyvm  # noqa: F401  (registers the timm names)

from tests.benchmarks.helpers import load_benchmark


def test_predictors_keep_the_target_share_of_the_tokens():
    train_step = load_benchmark("train_step")
    model = timm.create_model("dyvm_vim_tiny", img_size=64, patch_size=4, depth=4, embed_dim=32, num_classes=10,
                              pruning_loc=(1, 2, 3)).train()
    images = torch.randn(16, 3, 64, 64)
    assert abs(train_step.kept_tokens(model, images)[0] / 256 - 0.5) < 0.05  # fresh predictors: about half
    train_step.keep_target_share(model, 0.7)
    kept = train_step.kept_tokens(model, images)  # of 256 patches: 0.7, 0.49, 0.343 in expectation
    for got, want in zip(kept, (0.7, 0.49, 0.343)):
        assert abs(got / 256 - want) < 0.04, kept


def test_gpu_check_times_steps_with_every_option_the_script_reads():
    """gpu_check.py's train sections call train_step.measure with train_step's own parser defaults (a namespace
    written out by hand once lacked a newer option, and the section failed on the GPU)."""
    gpu_check = load_benchmark("gpu_check")
    for graph in (False, True):
        ns = gpu_check.train_options(graph)
        assert ns.cuda_graph is graph and ns.batch_size == 128 and (ns.warmup, ns.steps) == (4, 12)
        assert ns.token_keep == "target" and ns.teacher_dtype == "auto"


def test_kernel_census_counts_overlap_and_gaps_per_stream():
    """--profile-streams reads a step's kernels from its trace: the busy time is the union of the kernels'
    intervals (two branches overlapping count once), the time from the first start to the last end keeps the gaps,
    each stream lists its kernels by time and its idle time between them, by the kernel that waited."""
    train_step = load_benchmark("train_step")

    def kernel(name, ts, dur, stream):
        return {"cat": "kernel", "ph": "X", "name": name, "ts": ts, "dur": dur, "args": {"stream": stream}}

    events = [kernel("scan", 0.0, 1000.0, 7), kernel("cast", 1500.0, 100.0, 7), kernel("cast", 1700.0, 100.0, 7),
              kernel("teacher", 500.0, 2000.0, 9), kernel("tail", 3000.0, 100.0, 7), {"cat": "cpu_op", "ph": "X", "name": "aten::add", "ts": 0.0,
                                                     "dur": 5.0}]
    text = train_step.kernel_census(events, top=5)
    first = text.splitlines()[0]
    assert first == ("kernels 5, 3.30 ms of kernel time, busy 2.60 ms, first start to last end 3.10 ms"), first
    assert "stream 9: 1 kernels, 2.00 ms, from 0.50 to 2.50 ms" in text
    assert "stream 7: 4 kernels, 1.30 ms, from 0.00 to 3.10 ms" in text
    assert "0.200 ms     2x  cast" in text and "aten::add" not in text
    # stream 7's idle time: 500 us before the first cast, 100 before the second, 1200 before the tail
    assert "  gaps: 3, 1.800 ms, median 500.0 us, 90th percentile 500.0 us, longest 1200.0 us" in text
    assert "   0.600 ms     2x before cast (median 500.0 us)" in text
    assert "  1200.0 us at 1.80 ms: cast -> tail" in text
    memset = {"cat": "gpu_memset", "ph": "X", "name": "Memset", "ts": 1000.0, "dur": 40.0}
    assert "memsets and copies (not kernels: in the gaps above): 1, 0.040 ms" in train_step.kernel_census(
        events + [memset], top=5)
    assert train_step.kernel_census([], top=5) == "no kernels in the trace"
