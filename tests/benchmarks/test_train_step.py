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
