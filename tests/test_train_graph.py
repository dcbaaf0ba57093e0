"""dyvm.train_graph where it can be checked without a GPU: the one-line reasons a graphed training step
cannot run. Its replays are checked against eager steps at full size on a GPU by benchmarks/gpu_check.py
(the same weights after six steps with a learning-rate change; a non-finite batch, read a step late, leaves the
weights alone through the step after it),
and under DDP on two GPUs by benchmarks/ddp_graph_check.py."""
import pytest
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
    from torch.nn.parallel import DistributedDataParallel

    from dyvm.train_graph import GraphedTrainStep

    ddp = DistributedDataParallel.__new__(DistributedDataParallel)  # only its type matters to the check
    with pytest.raises(ValueError, match="distributed_for_graphs"):
        GraphedTrainStep(ddp, None, _adamw())


def _fake_graph_step(bad_from: int, calls: list, elsewhere: bool = False):
    """A stand-in for GraphedTrainStep's call on the CPU: loss 0.5 * step; from step `bad_from` on `finite` is False
    (the graph's flag stays set after a non-finite step) and that step's loss NaN (elsewhere: finite, as on a
    process whose flag came from another one's loss)."""
    from types import SimpleNamespace

    from dyvm.train_graph import StepResult

    def step(images, targets):
        i = len(calls)
        calls.append(i)
        loss = torch.tensor(float("nan") if i == bad_from and not elsewhere else 0.5 * i)
        out = SimpleNamespace(gates=None, decisions=[])
        return StepResult(loss, {"cls_loss": loss}, out, torch.tensor(i < bad_from))
    return step


def _run_epoch(bad_from: int, steps: int = 4, elsewhere: bool = False):
    from dyvm.engine import train_one_epoch

    calls, ema_steps = [], []
    ema = type("Ema", (), {"update": lambda self, model, step: ema_steps.append(step)})()
    batches = [(torch.full((2, 3), float("nan") if i == bad_from else 1.0), torch.zeros(2)) for i in range(steps)]
    model = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    try:
        stats = train_one_epoch(model, torch.nn.Identity(), batches, opt, torch.device("cpu"), 0, ema=ema,
                                graph_step=_fake_graph_step(bad_from, calls, elsewhere))
    except Exception as e:  # noqa: BLE001 (the test looks at it)
        return e, calls, ema_steps
    return stats, calls, ema_steps


def test_a_graphed_epoch_reads_each_step_a_step_late_and_names_the_bad_one():
    """train_one_epoch checks a graphed step's flag after launching the next step (no wait for the GPU to drain):
    a non-finite step 1 is named as step 1 while step 2 has already been called (its update skipped on the
    device by the graph's flag), and the EMA was not updated after step 1."""
    from dyvm.engine import NonFiniteLossError

    error, calls, ema_steps = _run_epoch(bad_from=1)
    assert isinstance(error, NonFiniteLossError), error
    assert "epoch 0 step 1: the input batch contains non-finite pixels" in str(error)
    assert calls == [0, 1, 2] and ema_steps == [0, 1]
    error, calls, ema_steps = _run_epoch(bad_from=3)  # the last step: checked after the loop
    assert isinstance(error, NonFiniteLossError) and "step 3" in str(error)
    assert calls == [0, 1, 2, 3]
    error, _, _ = _run_epoch(bad_from=2, elsewhere=True)  # DDP: the flag all-reduced from another process's loss
    assert isinstance(error, NonFiniteLossError) and str(error).endswith("step 2: in another process")


def test_a_graphed_epoch_without_bad_steps_logs_every_step():
    stats, calls, ema_steps = _run_epoch(bad_from=99)
    assert calls == ema_steps == [0, 1, 2, 3]
    assert stats["loss"] == pytest.approx((0 + 0.5 + 1.0 + 1.5) / 4) and stats["steps"] == 4


def test_lagged_read_returns_the_step_before():
    from dyvm.engine import LaggedRead

    lagged = LaggedRead()
    assert lagged.take() is None and lagged.push(torch.tensor([1.0, 2.0]), "a") is None
    assert lagged.push(torch.tensor([3.0]), "b") == ([1.0, 2.0], "a")
    assert lagged.take() == ([3.0], "b") and lagged.take() is None
