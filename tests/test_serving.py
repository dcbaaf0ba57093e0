"""dyvm.serving: the CUDA-graph server's contract where it can be checked without a GPU (the plain-call
fallback, output handling, argument errors). Its graph capture is checked at full size on a GPU by
benchmarks/gpu_check.py, before any timing."""
import pytest
import timm
import torch

import dyvm  # noqa: F401
from dyvm.models.dyvm import ForwardOutput
from dyvm.serving import graphed, map_tensors


@pytest.fixture(scope="module")
def tiny_dyvm():
    torch.manual_seed(0)
    return timm.create_model("dyvm_vim_tiny", img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10,
                             pruning_loc=(1, 2, 3))


def test_cpu_inputs_run_the_plain_forward(tiny_dyvm):
    x = torch.randn(3, 3, 32, 32)
    fast = graphed(tiny_dyvm, method="forward_aux")
    assert not tiny_dyvm.training
    out = fast(x)
    with torch.no_grad():
        ref = tiny_dyvm.forward_aux(x)
    assert isinstance(out, ForwardOutput) and torch.equal(out.logits, ref.logits)
    assert torch.equal(out.gates, ref.gates) and out.seq_lens == ref.seq_lens
    assert fast.captures == 0


def test_autocast_dtype_is_applied(tiny_dyvm):
    x = torch.randn(2, 3, 32, 32)
    out = graphed(tiny_dyvm, dtype=torch.bfloat16)(x)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = tiny_dyvm(x)
    assert out.dtype == ref.dtype and torch.equal(out, ref)


def test_training_mode_is_refused(tiny_dyvm):
    fast = graphed(tiny_dyvm)
    tiny_dyvm.train()
    try:
        with pytest.raises(ValueError, match="model.eval"):
            fast(_cuda_like())
    finally:
        tiny_dyvm.eval()


def _cuda_like():
    """A CPU tensor that claims to be on CUDA, to reach the server's checks on a machine without a GPU."""
    class FakeCuda(torch.Tensor):
        @property
        def is_cuda(self):
            return True
    return torch.randn(2, 3, 32, 32).as_subclass(FakeCuda)


def test_bad_arguments_are_one_line_errors(tiny_dyvm):
    with pytest.raises(ValueError, match="max_graphs"):
        graphed(tiny_dyvm, max_graphs=0)
    with pytest.raises(ValueError, match="no method 'forward_axu'"):
        graphed(tiny_dyvm, method="forward_axu")


def test_map_tensors_reaches_dataclass_fields():
    out = ForwardOutput(logits=torch.ones(2, 3), patch_tokens=torch.zeros(2, 4, 5), final_policy=torch.ones(2, 4, 1),
                        slot_to_patch=torch.arange(4).expand(2, 4), decisions=[torch.ones(2, 4)], gates=None,
                        seq_lens=[5, 5])
    copy = map_tensors(out, torch.clone)
    assert copy.logits is not out.logits and torch.equal(copy.logits, out.logits)
    assert copy.decisions[0] is not out.decisions[0] and copy.gates is None and copy.seq_lens == [5, 5]


def test_weights_constant_while_scopes_the_flag():
    from mamba_ssm.modules.mamba_simple import _CONSTANT_WEIGHTS, declare_constant_weights, weights_constant_while

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), declare_constant_weights(torch.nn.Linear(2, 2)))
    flags = lambda: [m.__dict__.get(_CONSTANT_WEIGHTS, False) for m in model.modules()]  # noqa: E731
    with weights_constant_while(model):
        assert all(flags())
    assert flags() == [False, False, True]  # declared before: stays declared


def test_the_caches_a_capture_reads_are_found(tiny_dyvm):
    from mamba_ssm.modules.mamba_simple import inference_caches

    with torch.no_grad():
        tiny_dyvm(torch.randn(2, 3, 32, 32))
    caches = inference_caches(tiny_dyvm)
    mixers = [layer.mixer for layer in tiny_dyvm.layers]
    assert any(c is m.__dict__["_inference_cache"] for m in mixers for c in caches)
    assert any(c is tiny_dyvm.__dict__["_inference_weights_memo"] for c in caches)
    assert len(caches) >= len(mixers) + 1


def test_in_place_updates_and_moves_change_what_the_graphs_were_captured_from(tiny_dyvm):
    fast = graphed(tiny_dyvm)
    fast._tensors = list(tiny_dyvm.parameters())
    state = fast._state()
    assert fast._state() == state
    weight = tiny_dyvm.layers[1].mixer.in_proj.weight
    with torch.no_grad():
        weight.mul_(1.0)  # the values are the same, the version counter moved: captured again to be safe
    assert fast._state() != state
    state = fast._state()
    fast._tensors[0] = fast._tensors[0].clone()  # another address
    assert fast._state() != state
