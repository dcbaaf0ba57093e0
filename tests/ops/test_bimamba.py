"""The DyVM op bimamba_v2_inner_fn (both scan directions in one call, per-image gates, token masks): the
reference against its definition, the Triton path against the reference, and the inference weight cache."""
import contextlib

import pytest
import torch

from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_fn, bimamba_v2_inner_ref, scan_direction_ref
from mamba_ssm.ops.dispatch import triton_on_cpu
from tests.ops.helpers import assert_close_all, grads, rel, scan_weights


def _scan_weights(d_inner=16, dt_rank=2, d_state=4, width=4):
    return ScanWeights(torch.randn(d_inner, width) * 0.5, torch.randn(d_inner) * 0.1,
                       torch.randn(dt_rank + 2 * d_state, d_inner) * 0.3, torch.randn(d_inner, dt_rank) * 0.3,
                       torch.randn(d_inner) * 0.1, -(torch.rand(d_inner, d_state) + 0.5), torch.randn(d_inner))


def test_bimamba_is_the_halved_sum_of_a_forward_and_a_flipped_scan():
    fwd, bwd = _scan_weights(), _scan_weights()
    xz = torch.randn(3, 32, 10)
    x, z = xz.chunk(2, dim=1)
    want = (scan_direction_ref(x, z, fwd) + scan_direction_ref(x.flip(-1), z.flip(-1), bwd).flip(-1)) / 2
    torch.testing.assert_close(bimamba_v2_inner_ref(xz, fwd, bwd), want)
    torch.testing.assert_close(bimamba_v2_inner_ref(xz, fwd, bwd, divide_out=False), 2 * want)


def test_bimamba_gates_skip_or_multiply_to_the_same_result():
    fwd, bwd = _scan_weights(), _scan_weights()
    xz = torch.randn(4, 32, 9)
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():  # inference: gated-off (sample, direction) pairs are not computed
        skipped = bimamba_v2_inner_ref(xz, fwd, bwd, gate=gate)
    xz_train = xz.clone().requires_grad_(True)
    gate_train = gate.clone().requires_grad_(True)
    multiplied = bimamba_v2_inner_ref(xz_train, fwd, bwd, gate=gate_train)
    torch.testing.assert_close(skipped, multiplied.detach())
    assert torch.count_nonzero(skipped[2]) == 0
    multiplied.sum().backward()
    assert gate_train.grad is not None and torch.count_nonzero(gate_train.grad[2]) == 2  # off gates still learn
    x, z = xz.chunk(2, dim=1)
    torch.testing.assert_close(skipped[0], scan_direction_ref(x[:1], z[:1], fwd)[0] / 2)


def test_bimamba_mask_makes_kept_prefix_equal_to_the_short_sequence():
    """Training rearranges kept tokens first and masks the rest: both directions must then see only the kept ones."""
    fwd, bwd = _scan_weights(), _scan_weights()
    keep = 6
    xz = torch.randn(2, 32, 10)
    mask = torch.zeros(2, 10)
    mask[:, :keep] = 1
    full = bimamba_v2_inner_ref(xz, fwd, bwd, mask=mask)
    short = bimamba_v2_inner_ref(xz[..., :keep], fwd, bwd)
    torch.testing.assert_close(full[..., :keep], short, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype,seqlen,gated,masked", [
    (torch.float32, 23, False, False),
    (torch.float32, 23, True, True),
    (torch.bfloat16, 21, True, True),
    (torch.float32, 1, True, False),
])
def test_bimamba_matches_reference(dtype, seqlen, gated, masked):
    batch, dim = 3, 40
    fwd, bwd = scan_weights(dim, 4, 8, dtype), scan_weights(dim, 4, 8, dtype)
    xz = torch.randn(batch, seqlen, 2 * dim, dtype=dtype).transpose(1, 2)  # in_proj's layout
    gate = torch.tensor([[1.0, 0.0], [0.7, 1.3], [0.0, 0.0]]) if gated else None
    # the mask of DyVM training carries the straight-through gradient of the keep decisions: it must get one
    mask = (torch.rand(batch, seqlen) > 0.3).to(dtype).requires_grad_() if masked else None
    leaves = [t.detach().requires_grad_() for t in (xz, *fwd, *bwd)]
    gate_leaf = gate.clone().requires_grad_() if gated else None
    args = (leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), gate_leaf, mask)
    with triton_on_cpu():
        out = bimamba_v2_inner_fn(*args)
    ref = bimamba_v2_inner_ref(*args)
    inputs = [*leaves, gate_leaf, mask]
    g = torch.randn_like(out)
    with triton_on_cpu():
        got = grads(out, inputs, g)
    want = grads(ref, inputs, g)
    names = ["xz", *[f"fwd.{n}" for n in ScanWeights._fields], *[f"bwd.{n}" for n in ScanWeights._fields], "gate",
             "mask"]
    names = [n for n, t in zip(names, inputs) if t is not None]
    assert_close_all([out, *got], [ref, *want], dtype, ["out", *names])


def test_bimamba_gated_off_sample_is_not_computed():
    """Inference: a sample whose two gates are 0 is never read by the conv or the scan (NaN input stays
    out of the result) and gets zeros; a direction gated off contributes nothing."""
    batch, dim, seqlen = 3, 40, 29
    fwd, bwd = scan_weights(dim, 4, 8, torch.float32), scan_weights(dim, 4, 8, torch.float32)
    xz = torch.randn(batch, seqlen, 2 * dim).transpose(1, 2)
    xz[2] = float("nan")
    gate = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    with torch.no_grad(), triton_on_cpu():
        out = bimamba_v2_inner_fn(xz, fwd, bwd, gate)
    with torch.no_grad():
        ref = bimamba_v2_inner_ref(xz[:2], fwd, bwd, gate[:2])
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    assert rel(out[:2], ref) < 1e-5


def test_mamba_inference_weight_cache_follows_parameter_updates():
    """Inference on the kernels reuses the stacked scan weights and the Linear weights (cast to the autocast
    dtype) while the parameters are unchanged, and an in-place update (an optimizer step, load_state_dict)
    or another autocast dtype is seen at the next call."""
    from mamba_ssm.modules.mamba_simple import Mamba

    torch.manual_seed(0)
    mixer = Mamba(16, d_state=8, bimamba_type="v2", if_divide_out=True)
    x = torch.randn(2, 21, 16)
    cache = lambda: mixer.__dict__["_inference_cache"]  # noqa: E731
    with torch.no_grad():
        ref = mixer(x)  # CPU reference path: no cache
        with triton_on_cpu():
            out = mixer(x)
            first = cache()
            mixer(x)
            assert cache() is first  # reused
            assert rel(out, ref) < 1e-5
            mixer.A_b_log.add_(0.3)
            mixer.conv1d.weight.mul_(-1.0)
            mixer.out_proj.weight.mul_(0.5)
            out = mixer(x)
            assert cache() is not first
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out_bf16 = mixer(x)
                assert cache()[1].linears["in_proj"][0].dtype == torch.bfloat16
                assert cache()[1].stacked.x_proj_weight.dtype == torch.bfloat16
                assert cache()[1].stacked.A.dtype == torch.float32
        ref = mixer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            ref_bf16 = mixer(x)
    assert rel(out, ref) < 1e-5
    assert out_bf16.dtype == ref_bf16.dtype == torch.bfloat16 and rel(out_bf16.float(), ref_bf16.float()) < 2e-2
    seen = []
    with torch.no_grad(), triton_on_cpu():  # a forward hook still sees its module's call with the cache on
        handle = mixer.out_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        mixer(x)
        handle.remove()
    assert seen == [(2, 21, 16)]
    with triton_on_cpu():  # training: no cache, gradients reach the parameters
        mixer.__dict__.pop("_inference_cache")
        mixer(x).sum().backward()
    assert "_inference_cache" not in mixer.__dict__ and mixer.A_b_log.grad is not None
    assert mixer.in_proj.weight.grad is not None


def test_kernels_write_the_xz_gradient_in_place(monkeypatch):
    """Eager training on the kernels: the scan's backward writes dz and the conv's writes dx straight into the
    halves of xz's gradient, which is handed on as is (no copies; the values are checked against the reference
    in test_bimamba_matches_reference), and so are x_dbl's: dB and dC from the scan's backward, d dt from dt_proj's;
    on the PyTorch path the halves and dB, dC are copied in. On both, x_proj's backward adds its input gradient into
    the scan's du in place (one batched matmul, no separate add)."""
    import mamba_ssm.ops.bimamba_stacked as stacked

    seen, in_place = [], []
    same = stacked._same_memory
    monkeypatch.setattr(stacked, "_same_memory", lambda a, b: seen.append(same(a, b)) or seen[-1])
    baddbmm_ = torch.Tensor.baddbmm_
    monkeypatch.setattr(torch.Tensor, "baddbmm_", lambda t, *a: in_place.append(t.shape) or baddbmm_(t, *a))
    fwd, bwd = scan_weights(40, 4, 8, torch.float32), scan_weights(40, 4, 8, torch.float32)
    xz = torch.randn(2, 13, 80).transpose(1, 2).requires_grad_()
    with triton_on_cpu():
        bimamba_v2_inner_fn(xz, fwd, bwd).sum().backward()
    assert seen == [True] * 3 + [True, True] and xz.grad.transpose(1, 2).is_contiguous()  # (x_dbl's dt, B, C; xz's)
    assert in_place == [(2, 2 * 13, 40)]  # (both directions, batch x L rows, d_inner)
    kernel_grad, xz.grad, seen[:], in_place[:] = xz.grad, None, [], []
    bimamba_v2_inner_fn(xz, fwd, bwd).sum().backward()
    assert seen == [True, False, False] + [False, False] and len(in_place) == 1
    torch.testing.assert_close(xz.grad, kernel_grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kernels", [False, True], ids=["cpu", "triton"])
def test_retained_graph_backward_again_after_a_partial_one(kernels):
    """The hand-offs between the mixer's backward passes (MixerGrads) hold across passes over a retained graph:
    a first pass that asks only for dt_proj's weight (x_proj's backward does not run: the scan's du is left
    unclaimed), then a full pass, gives what a fresh graph gives."""
    fwd, bwd = scan_weights(40, 4, 8, torch.float32), scan_weights(40, 4, 8, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (torch.randn(2, 11, 80).transpose(1, 2), *fwd, *bwd)]

    def out():
        with triton_on_cpu() if kernels else contextlib.nullcontext():
            return bimamba_v2_inner_fn(leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]))
    with triton_on_cpu() if kernels else contextlib.nullcontext():
        want = torch.autograd.grad(out().square().sum(), leaves)
        y = out().square().sum()
        torch.autograd.grad(y, [leaves[4]], retain_graph=True)  # fwd.dt_proj_weight alone
        got = torch.autograd.grad(y, leaves)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kernels", [False, True], ids=["cpu", "triton"])
def test_lengths_change_nothing_where_the_mask_ends_the_sequence(kernels):
    """DyVM training: kept tokens first, the pruned ones masked behind them. Scans that stop at each sample's last
    kept token (lengths) give the same output and, where no gradient arrives after that token (no loss term reads
    a pruned one), the same gradients for every input (the mask's straight-through gradient too): bit for bit on
    the PyTorch implementation; to rounding on the kernels, whose backward recomputes states from checkpoints
    that then sit at other positions of direction 1 (its recompute rounds exp(dt A) another way than the
    forward). The reference agrees with lengths given."""
    batch, dim, seqlen = 3, 16, 21  # two checkpoint chunks; a sample ending inside the first, one empty
    lengths = torch.tensor([21, 9, 0], dtype=torch.int32)
    inside = torch.arange(seqlen) < lengths[:, None].long()
    fwd, bwd = scan_weights(dim, 4, 8, torch.float32), scan_weights(dim, 4, 8, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (torch.randn(batch, seqlen, 2 * dim).transpose(1, 2), *fwd, *bwd)]
    gate = torch.tensor([[1.0, 0.0], [0.7, 1.3], [1.0, 1.0]], requires_grad=True)
    mask = (inside * (0.5 + torch.rand(batch, seqlen))).requires_grad_()  # nonzero exactly inside
    inputs = [*leaves, gate, mask]
    dout = torch.randn(batch, dim, seqlen) * inside[:, None]
    results = []
    for lens in (None, lengths):
        with triton_on_cpu() if kernels else contextlib.nullcontext():
            out = bimamba_v2_inner_fn(leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), gate, mask,
                                      lengths=lens)
            results.append([out, *torch.autograd.grad(out, inputs, dout)])
        assert torch.equal(out * ~inside[:, None], torch.zeros_like(out))
    for name, a, b in zip(["out", "xz", *[f"w{i}" for i in range(14)], "gate", "mask"], *results):
        assert (rel(a, b) < 1e-6) if kernels else torch.equal(a, b), name
    ref = bimamba_v2_inner_ref(leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), gate, mask,
                               lengths=lengths)
    assert rel(results[1][0], ref) < 1e-5
    with pytest.raises(ValueError, match="lengths must be int32 of shape"):
        bimamba_v2_inner_fn(leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), mask=mask,
                            lengths=lengths.long())
    with pytest.raises(ValueError, match="give the mask too"):
        bimamba_v2_inner_fn(leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), lengths=lengths)


@pytest.mark.parametrize("kernels, kept_only", [(False, False), (True, False), (True, True)],
                         ids=["cpu", "triton", "triton-kept-only"])
def test_rebuilt_scan_inputs_give_the_same_gradients_and_are_not_kept(kernels, kept_only, monkeypatch):
    """Eager training with the scan's inputs (the conv's output u and delta) recomputed in the backward
    (MAMBA_REBUILD_SCAN_INPUTS): the same output and gradients bit for bit, with gates and a DyVM token mask (and
    DyVM's kept-only scans: lengths), and autograd keeps exactly those two tensors' memory less for the backward."""
    import mamba_ssm.ops.bimamba_stacked as stacked

    batch, dim, seqlen = 2, 16, 19
    fwd, bwd = scan_weights(dim, 4, 8, torch.float32), scan_weights(dim, 4, 8, torch.float32)
    leaves = [t.detach().requires_grad_() for t in (torch.randn(batch, seqlen, 2 * dim).transpose(1, 2), *fwd, *bwd)]
    gate = torch.tensor([[1.0, 0.3], [0.7, 1.3]], requires_grad=True)
    lengths = torch.tensor([19, 11], dtype=torch.int32) if kept_only else None
    inside = torch.arange(seqlen) < (lengths if kept_only else torch.tensor([seqlen] * batch))[:, None].long()
    mask = (inside * (0.5 + torch.rand(batch, seqlen))).requires_grad_()
    dout = torch.randn(batch, dim, seqlen)
    results, kept = [], []
    for rebuild in (False, True):
        monkeypatch.setattr(stacked, "REBUILD_SCAN_INPUTS", rebuild)
        storages = {}

        def pack(t):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with triton_on_cpu() if kernels else contextlib.nullcontext():
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                out = bimamba_v2_inner_fn(leaves[0], ScanWeights(*leaves[1:8]), ScanWeights(*leaves[8:15]), gate,
                                          mask, lengths=lengths)
            results.append([out, *torch.autograd.grad(out, [*leaves, gate, mask], dout)])
        kept.append(sum(storages.values()))
    for i, (a, b) in enumerate(zip(*results)):
        assert torch.equal(a, b), i
    assert kept[0] - kept[1] == 2 * (2 * batch * dim * seqlen * 4)  # u and delta: (2, b, d, L) fp32 each


def test_rebuild_setting_is_checked():
    """MAMBA_REBUILD_SCAN_INPUTS: 1, 0 or unset; anything else is one line naming it."""
    import mamba_ssm.ops.bimamba_stacked as stacked

    with pytest.MonkeyPatch.context() as m:
        for value, want in (("", False), ("0", False), ("1", True)):
            m.setenv(stacked.REBUILD_ENV, value)
            assert stacked.rebuild_from_env() is want
        m.setenv(stacked.REBUILD_ENV, "yes")
        with pytest.raises(RuntimeError) as e:
            stacked.rebuild_from_env()
    assert str(e.value) == ("MAMBA_REBUILD_SCAN_INPUTS=yes: must be 1 (recompute the scan's inputs in the backward), "
                            "0 (keep them) or unset")


@pytest.mark.parametrize("rebuild", [False, True])
def test_a_graph_kept_by_its_output_holds_no_activations_after_the_backward(rebuild, monkeypatch):
    """After the backward, an output that is still referenced (a training loop's last result) keeps the graph's
    nodes alive, but not the layer's activations: in_proj's output xz is freed with the rest (the rebuild of the
    scan's inputs reads it through the scan's saved tensors, not through the shared state the nodes keep)."""
    import gc
    import weakref

    import mamba_ssm.ops.bimamba_stacked as stacked

    monkeypatch.setattr(stacked, "REBUILD_SCAN_INPUTS", rebuild)
    fwd, bwd = scan_weights(16, 4, 8, torch.float32), scan_weights(16, 4, 8, torch.float32)
    leaf = torch.randn(2, 11, 32).transpose(1, 2).requires_grad_()
    with triton_on_cpu():
        xz = leaf * 2
        freed = weakref.ref(xz)
        out = bimamba_v2_inner_fn(xz, fwd, bwd)
        del xz
        out.sum().backward()
    gc.collect()
    assert out.grad_fn is not None and freed() is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_training_stack_is_stack_directions_in_four_launches(dtype):
    """stack_for_training (a training call's weights) gives stack_directions' tensors, and the parameters the same
    gradients, bit for bit; with 16-bit activations also x_proj's and dt_proj's weights in their dtype, without a
    gradient (projections); its forward is four ops (a concatenation, that cast, exp, negation) however many
    parameters."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mamba_ssm.modules.mamba_simple import Mamba
    from mamba_ssm.ops.bimamba_stacked import stack_directions, stack_for_training

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.__name__)
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    mixer = Mamba(16, d_state=8, bimamba_type="v2", if_divide_out=True)
    params = [p for p in mixer.parameters()]
    pairs = mixer.training_stack_params()
    with Ops() as ops:
        got = stack_for_training(pairs, dtype)
    shaping = ("view", "_reshape_alias", "slice", "empty", "transpose", "detach", "alias", "reshape")
    computing = [n.split(".")[0] for n in ops.names if n.split(".")[0] not in shaping]
    assert computing == ["cat", "_to_copy", "exp", "neg_"] if dtype != torch.float32 else ["cat", "exp", "neg_"]
    with triton_on_cpu():  # what a training call of the mixer takes
        taken = mixer._uncached_weights(torch.randn(2, 32, 5).to(dtype).requires_grad_())[2]
    assert all(torch.equal(a, b) for a, b in zip(taken.tensors(), got.tensors()))
    want = stack_directions(mixer.scan_weights(), mixer.scan_weights(backward=True))
    if dtype == torch.float32:
        assert got.projections is None
    else:
        for cast, weight in zip(got.projections, (want.x_proj_weight, want.dt_proj_weight)):
            assert cast.dtype == dtype and not cast.requires_grad and torch.equal(cast, weight.to(dtype))
    cotangents = [torch.randn_like(t) for t in want.tensors()]
    grads_of = []
    for stacked in (got, want):
        assert all(a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
                   for a, b in zip(stacked.tensors(), want.tensors()))
        assert stacked.A.transpose(1, 2).is_contiguous()  # (the memory order the kernels read)
        with Ops() as backward_ops:
            grads_of.append(torch.autograd.grad(stacked.tensors(), params, cotangents, allow_unused=True))
        # (no zeros made for the casts' gradients, which nothing takes: materialized, each was a launch a layer)
        assert not [n for n in backward_ops.names if n.split(".")[0] in ("zeros", "zeros_like", "fill_", "zero_")]
    for name, a, b in zip([n for n, _ in mixer.named_parameters()], *grads_of):
        assert (a is None) == (b is None), name
        assert a is None or (a.dtype == b.dtype and torch.equal(a, b)), name


@pytest.mark.parametrize("offset", [0, 3])
def test_inference_views_are_the_training_paths_views(offset):
    """Eager inference takes the scan's views of x_dbl and delta, and xz's halves, as one as_strided each: the same
    shapes, strides and values as the slicing, viewing and permuting that autograd follows, from tensors at any
    storage offset; a non-contiguous x_dbl falls back to that path."""
    from mamba_ssm.ops.bimamba_stacked import _halves, _scan_views, _scan_views_of_columns

    batch, seqlen, dim, dt_rank, d_state = 3, 5, 8, 2, 4
    n_out, rows = dt_rank + 2 * d_state, batch * seqlen
    x_dbl = torch.randn(offset + 2 * rows * n_out)[offset:].view(2, rows, n_out)
    delta = torch.randn(offset + 2 * rows * dim)[offset:].view(2, rows, dim)
    for strided in (x_dbl, x_dbl.transpose(0, 1).contiguous().transpose(0, 1)):  # (the second: the fallback)
        _, B, C = strided.split_with_sizes((dt_rank, d_state, d_state), dim=-1)
        want = _scan_views_of_columns(delta, B, C, batch, seqlen)
        got = _scan_views(strided, delta, batch, seqlen, dt_rank, d_state)
        for g, w in zip(got, want):
            assert g.shape == w.shape and g.stride() == w.stride() and torch.equal(g, w)
    for xz in (torch.randn(offset + batch * seqlen * 2 * dim)[offset:].view(batch, seqlen, 2 * dim).transpose(1, 2),
               torch.randn(batch, 2 * dim, seqlen)):
        for g, w in zip(_halves(xz), (xz[:, :dim], xz[:, dim:])):
            assert g.shape == w.shape and g.stride() == w.stride() and g.data_ptr() == w.data_ptr()
