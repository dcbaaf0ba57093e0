"""dyvm.train_graph where it can be checked without a GPU: the one-line reasons a graphed training step
cannot run. Its replays are checked against eager steps at full size on a GPU by benchmarks/gpu_check.py
(the same weights after six steps with a learning-rate change; a non-finite batch leaves the weights alone)."""
import torch

from dyvm.train_graph import graph_step_problem


def _adamw(**kw):
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, **kw)


def test_reasons_are_one_line_and_specific():
    cuda = torch.device("cuda", 0)
    assert "CUDA device" in graph_step_problem(torch.device("cpu"), 1, _adamw(), None)
    assert "single process" in graph_step_problem(cuda, 2, _adamw(), None)
    assert "GradScaler" in graph_step_problem(cuda, 1, _adamw(), object())
    assert "fused=True, capturable=True" in graph_step_problem(cuda, 1, _adamw(), None)
    sgd = torch.optim.SGD([torch.nn.Parameter(torch.zeros(3))], lr=0.1)
    assert "Adam" in graph_step_problem(cuda, 1, sgd, None)
    for reason in (graph_step_problem(torch.device("cpu"), 1, _adamw(), None),
                   graph_step_problem(cuda, 1, sgd, None)):
        assert "\n" not in reason


def test_a_fused_capturable_adamw_on_one_gpu_is_accepted():
    opt = _adamw()
    for group in opt.param_groups:  # what fused=True, capturable=True sets (fused needs a GPU to construct)
        group.update(fused=True, capturable=True)
    assert graph_step_problem(torch.device("cuda", 0), 1, opt, None) is None
