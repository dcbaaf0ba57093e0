"""dyvm.train_graph where it can be checked without a GPU: the one-line reasons a graphed training step
cannot run. Its replays are checked against eager steps at full size on a GPU by benchmarks/gpu_check.py
(the same weights after six steps with a learning-rate change; a non-finite batch leaves the weights alone),
and under DDP on two GPUs by benchmarks/ddp_graph_check.py."""
import torch

from dyvm.train_graph import graph_step_problem


def _adamw(**kw):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, **kw)


def test_reasons_are_one_line_and_specific():
    cuda = torch.device("cuda", 0)
    assert "CUDA device" in graph_step_problem(torch.device("cpu"), _adamw(), None)
    assert "GradScaler" in graph_step_problem(cuda, _adamw(), object())
    assert "fused=True, capturable=True" in graph_step_problem(cuda, _adamw(), None)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert "Adam" in graph_step_problem(cuda, sgd, None)
    for reason in (graph_step_problem(torch.device("cpu"), _adamw(), None),
                   graph_step_problem(cuda, sgd, None)):
        assert "\n" not in reason


def test_a_fused_capturable_adamw_is_accepted():
    opt = _adamw()
    for group in opt.param_groups:  # what fused=True, capturable=True sets (fused needs a GPU to construct)
        group.update(fused=True, capturable=True)
    assert graph_step_problem(torch.device("cuda", 0), opt, None) is None


def test_a_graphed_ddp_step_needs_the_stream_its_module_was_built_on():
    import pytest
    from torch.nn.parallel import DistributedDataParallel

    from dyvm.train_graph import GraphedTrainStep

    ddp = DistributedDataParallel.__new__(DistributedDataParallel)  # only its type matters to the check
    with pytest.raises(ValueError, match="distributed_for_graphs"):
        GraphedTrainStep(ddp, None, _adamw())
