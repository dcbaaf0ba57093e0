import os

# Tests never reach a model hub, and stay on the CPU's two cores.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# CI has no GPU: Triton kernels run on CPU tensors through Triton's interpreter. It must be set before any
# kernel module is imported (the @triton.jit decorator reads it), whichever test file imports one first.
os.environ.setdefault("TRITON_INTERPRET", "1")
# OpenMP threads spin while waiting: with two processes on two cores (the torchrun test, subprocess runs of
# main.py) that makes each step 10-20x slower. Set before torch is imported; subprocesses inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

# Under pytest-xdist (pyproject's addopts: -n 2) each of the two workers takes one core.
XDIST_WORKER = "PYTEST_XDIST_WORKER" in os.environ
torch.set_num_threads(1 if XDIST_WORKER else min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tf32_switch():
    """For tests of --tf32: torch's process-wide switch for fp32 matmuls, put back afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = saved


def pytest_collection_modifyitems(session, config, items):
    """In one process: the tests of the benchmarks' dry runs go last, their runs having had the whole suite's time
    on the second core by then (pytest_collection_finish). Under xdist they go first: a worker waiting for its
    run's process leaves that process the core, so the runs start as early as possible."""
    from tests.benchmarks import helpers

    # (stable sorts: the rest keep their order)
    items.sort(key=lambda item: (item.name in helpers.DRY_RUNS) != XDIST_WORKER)


def pytest_collection_finish(session):
    """In one process the benchmarks' dry runs (tests.benchmarks.helpers.DRY_RUNS) start as soon as collection
    ends, in the background on the second core; their tests wait for them. (Under xdist every worker collects every
    test and runs only some: each test starts its own run.)"""
    from tests.benchmarks import helpers

    if XDIST_WORKER:
        return
    for item in session.items:
        if item.name in helpers.DRY_RUNS:
            helpers.start_dry_run(item.name)


def pytest_sessionfinish(session, exitstatus):
    from tests.benchmarks import helpers

    helpers.stop_dry_runs()
