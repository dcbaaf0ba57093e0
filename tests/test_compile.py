"""torch.compile sees whole models: dense Vim and DyVM, eval and training mode, trace with no graph break
(fullgraph=True; the "eager" backend checks the trace without inductor's compile time, which CI cannot afford),
and the compiled forward computes what the eager one does. The scan and the conv are torch.library custom ops on
every device, with fake implementations, which is what makes this work."""
import pytest
import torch

from dyvm.models.registry import create_model


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    kw = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10)
    return {"vim_tiny": create_model("vim_tiny", **kw),
            "dyvm_vim_tiny": create_model("dyvm_vim_tiny", pruning_loc=(1, 2, 3), gumbel_noise=False, **kw)}


@pytest.mark.parametrize("name", ["vim_tiny", "dyvm_vim_tiny"])
@pytest.mark.parametrize("training", [False, True])
def test_fullgraph_compile_matches_eager(models, name, training):
    torch._dynamo.reset()
    model = models[name].train(training)
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with torch.set_grad_enabled(training):
        got, want = compiled(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    if training:  # gradients flow through the traced custom ops' registered backward
        got.square().mean().backward()
        assert all(p.grad is not None for p in model.layers[0].mixer.parameters() if p.requires_grad)
        model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ["vim_tiny", "dyvm_vim_tiny"])
def test_fullgraph_compile_of_inference_on_the_kernels(models, name):
    """Inference as it runs on a GPU (the Triton kernels, here through the interpreter, with the eager paths
    that skip the custom ops: cached weights, direct norm and gate-head launches) still traces whole: those
    paths step aside while torch.compile traces. A graph break there once sent dynamo into the launch code and
    left DyVM-S uncompiled after minutes on an H200."""
    from causal_conv1d.kernel_utils import triton_on_cpu

    torch._dynamo.reset()
    model = models[name].eval()
    x = torch.randn(1, 3, 32, 32)  # (one image: the interpreter's time grows with the programs)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with triton_on_cpu(), torch.no_grad():
        got, want = compiled(x), model(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_fullgraph_compile_steps_around_the_fp32_linear_kernel(models, monkeypatch):
    """in_proj / out_proj (and x_proj's forward) take the tf32x3 kernel in eager fp32 calls on the kernels' devices
    (mamba_ssm.ops.linear_fp32, here its autograd path); while torch.compile traces, the same layers are F.linear
    (x_proj a batched matmul), with no graph break."""
    from causal_conv1d.kernel_utils import triton_on_cpu
    from mamba_ssm.ops import linear_fp32
    from mamba_ssm.ops.triton import linear_tf32x3

    monkeypatch.setattr(linear_fp32, "MIN_ROWS", 1)  # the tiny model's few tokens reach the kernel too
    monkeypatch.setattr(linear_fp32, "ENABLED", True)
    calls, kernel = [], linear_tf32x3.linear_tf32x3
    monkeypatch.setattr(linear_tf32x3, "linear_tf32x3", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    torch._dynamo.reset()
    model = models["vim_tiny"].train()
    x = torch.randn(2, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    with triton_on_cpu():
        got = compiled(x)
        assert not calls  # traced: F.linear
        want = model(x)
    assert len(calls) == 3 * len(model.layers)  # eager: in_proj, x_proj and out_proj of every layer on the kernel
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
