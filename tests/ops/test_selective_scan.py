"""The selective scan (mamba_ssm.ops.selective_scan_interface, ops/triton/selective_scan.py): the reference
against a float64 step loop (every B/C layout, options, dtypes, gradcheck), the Triton kernel against the
reference (values and every gradient), and mamba_inner against its pieces."""
import pytest
import torch

from mamba_ssm.ops.dispatch import triton_on_cpu
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, mamba_inner_ref, selective_scan_fn, selective_scan_ref
from tests.ops.helpers import assert_close_all, conv_by_taps, grads, make_scan_inputs, rel, scan_by_steps, scan_inputs


def _inner_args(d_model=8, d_inner=16, dt_rank=2, d_state=4, width=4, length=11):
    return dict(
        xz=torch.randn(2, 2 * d_inner, length),
        conv1d_weight=torch.randn(d_inner, 1, width) * 0.5, conv1d_bias=torch.randn(d_inner) * 0.1,
        x_proj_weight=torch.randn(dt_rank + 2 * d_state, d_inner) * 0.3,
        delta_proj_weight=torch.randn(d_inner, dt_rank) * 0.3, out_proj_weight=torch.randn(d_model, d_inner) * 0.3,
        out_proj_bias=None, A=-(torch.rand(d_inner, d_state) + 0.5), D=torch.randn(d_inner),
        delta_bias=torch.randn(d_inner) * 0.1)


@pytest.mark.parametrize("length", [1, 2, 7, 50, 197])
@pytest.mark.parametrize("bc", ["fixed", "variable", "grouped"])
@pytest.mark.parametrize("options", [dict(), dict(D=True, z=True, delta_bias=True, delta_softplus=True)])
def test_selective_scan_ref_matches_step_loop(length, bc, options):
    t = make_scan_inputs(length=length, bc=bc)
    kw = {k: t[k] for k in ("D", "z", "delta_bias") if options.get(k)}
    out, last = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], **kw,
                                   delta_softplus=options.get("delta_softplus", False), return_last_state=True)
    ref, ref_last = scan_by_steps(t["u"], t["delta"], t["A"], t["B"], t["C"], **kw,
                                  delta_softplus=options.get("delta_softplus", False))
    assert out.dtype == torch.float32 and last.dtype == torch.float32
    # Without softplus, negative deltas make the state grow: fp32 error is relative to the output's scale.
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=1e-5 * ref_last.abs().max().item())
    # The public function (on CPU: the PyTorch implementation behind the custom op) agrees as closely.
    out, last = selective_scan_fn(t["u"], t["delta"], t["A"], t["B"], t["C"], **kw,
                                  delta_softplus=options.get("delta_softplus", False), return_last_state=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    torch.testing.assert_close(last.double(), ref_last, rtol=1e-4, atol=1e-5 * ref_last.abs().max().item())


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_selective_scan_ref_low_precision_inputs_keep_fp32_state(dtype, tol):
    t = make_scan_inputs(length=33, dtype=dtype)
    out = selective_scan_ref(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    ref, _ = scan_by_steps(t["u"], t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    assert out.dtype == dtype
    assert (out.double() - ref).norm() / ref.norm() < tol


@pytest.mark.parametrize("bc", ["fixed", "variable", "grouped"])
def test_selective_scan_ref_gradcheck(bc):
    t = make_scan_inputs(batch=2, dim=4, length=9, d_state=3, bc=bc)
    args = [t[k].double().requires_grad_(True) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]

    def f(*a):
        out, last = selective_scan_ref(*a, delta_softplus=True, return_last_state=True)
        return out, last

    assert torch.autograd.gradcheck(f, args)


def test_selective_scan_gradients_match_step_loop_in_fp32():
    t = make_scan_inputs(length=50, requires_grad=True)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    out = selective_scan_ref(*(t[k] for k in names), delta_softplus=True)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, [t[k] for k in names], grad_out)
    ref = scan_by_steps(*(t[k] for k in names), delta_softplus=True)[0]
    want = torch.autograd.grad(ref, [t[k] for k in names], grad_out.double())
    for name, g, w in zip(names, got, want):
        assert (g.double() - w).norm() / w.norm() < 1e-5, name


def test_zero_input_at_the_end_leaves_earlier_outputs_unchanged():
    """DyVM puts pruned tokens at the end with u = 0: the kept tokens' outputs must not move."""
    t = make_scan_inputs(length=20)
    keep = 13
    u_padded = t["u"].clone()
    u_padded[..., keep:] = 0
    full = selective_scan_ref(u_padded, t["delta"], t["A"], t["B"], t["C"], t["D"], t["z"], t["delta_bias"], True)
    short = selective_scan_ref(t["u"][..., :keep], t["delta"][..., :keep], t["A"], t["B"][..., :keep],
                               t["C"][..., :keep], t["D"], t["z"][..., :keep], t["delta_bias"], True)
    torch.testing.assert_close(full[..., :keep], short, rtol=0, atol=1e-6)


def test_zero_input_at_the_start_keeps_the_state_at_zero():
    """The reversed scan meets the pruned tokens first: zero inputs there must leave h = 0."""
    t = make_scan_inputs(length=20)
    lead = 7
    u = t["u"].clone()
    u[..., :lead] = 0
    out, _ = selective_scan_ref(u[..., :lead], t["delta"][..., :lead], t["A"], t["B"][..., :lead],
                                t["C"][..., :lead], return_last_state=True, delta_softplus=True)
    _, state = selective_scan_ref(u[..., :lead], t["delta"][..., :lead], t["A"], t["B"][..., :lead],
                                  t["C"][..., :lead], return_last_state=True, delta_softplus=True)
    assert torch.count_nonzero(state) == 0 and torch.count_nonzero(out) == 0
    full = selective_scan_ref(u, t["delta"], t["A"], t["B"], t["C"], delta_softplus=True)
    rest = selective_scan_ref(u[..., lead:], t["delta"][..., lead:], t["A"], t["B"][..., lead:],
                              t["C"][..., lead:], delta_softplus=True)
    torch.testing.assert_close(full[..., lead:], rest, rtol=1e-5, atol=1e-6)


def test_scan_rejects_bad_shapes_with_a_clear_message():
    t = make_scan_inputs()
    with pytest.raises(ValueError, match="A must be"):
        selective_scan_ref(t["u"], t["delta"], t["A"][:-1], t["B"], t["C"])
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_ref(t["u"], t["delta"], t["A"], t["B"][..., :-1], t["C"])
    with pytest.raises(NotImplementedError, match="complex"):
        selective_scan_ref(t["u"], t["delta"], t["A"].to(torch.cfloat), t["B"], t["C"])


def test_mamba_inner_matches_its_pieces():
    a = _inner_args()
    out = mamba_inner_fn(**a)
    ref = mamba_inner_ref(**a)
    torch.testing.assert_close(out, ref)
    x, z = a["xz"].chunk(2, dim=1)
    xc = conv_by_taps(x, a["conv1d_weight"][:, 0], a["conv1d_bias"], "silu")
    x_dbl = xc.transpose(1, 2) @ a["x_proj_weight"].t()
    delta = (x_dbl[..., :2] @ a["delta_proj_weight"].t()).transpose(1, 2)
    y, _ = scan_by_steps(xc, delta, a["A"], x_dbl[..., 2:6].transpose(1, 2), x_dbl[..., 6:].transpose(1, 2),
                         a["D"], z, a["delta_bias"], True)
    want = y.transpose(1, 2) @ a["out_proj_weight"].double().t()
    torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_selective_scan_ref_under_bf16_autocast_keeps_fp32_math_and_trains():
    t = make_scan_inputs(length=19, requires_grad=True)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = selective_scan_ref(*(t[k] for k in names), delta_softplus=True)
    assert out.dtype == torch.float32  # fp32 inputs: no silent bf16 state
    ref = selective_scan_ref(*(t[k] for k in names), delta_softplus=True)
    torch.testing.assert_close(out, ref)
    grads = torch.autograd.grad(out.sum(), [t[k] for k in names])
    assert all(g is not None and g.dtype == t[k].dtype and torch.isfinite(g).all() for g, k in zip(grads, names))


@pytest.mark.parametrize("dtype,seqlen,options", [
    (torch.float32, 50, "all"),
    (torch.bfloat16, 50, "all"),
    (torch.float32, 1, "all"),
    (torch.float32, 197, "all"),
    (torch.float32, 23, "bare"),          # no D, z, delta_bias, softplus
    (torch.float32, 23, "fixed_B"),       # B (dim, N), as selective_scan_fn allows
    (torch.float32, 19, "groups"),        # B with 2 groups, C with 1
    (torch.bfloat16, 50, "channels_last"),  # u, delta, z with channel-contiguous memory (the Vim mixer's)
    (torch.float32, 37, "channels_last"),   # ... at fp32 tolerance; the output keeps u's layout
])
def test_selective_scan_matches_reference(dtype, seqlen, options):
    batch, dim = (1, 40) if seqlen == 197 else (2, 40)
    if options == "fixed_B":  # a fixed B is a group per channel, a program per channel: fewer keep it fast
        dim = 8
    layout = "fixed" if options == "fixed_B" else "var"
    u, delta, A, B, C, D, z, bias = scan_inputs(batch, dim, seqlen, 8, dtype, layout, 2 if options == "groups" else 1)
    if options == "bare":
        D = z = bias = None
    if options == "channels_last":
        u, delta, z = [t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (u, delta, z)]
    kw = dict(delta_softplus=options != "bare", return_last_state=True)
    with triton_on_cpu():
        out, last = selective_scan_fn(u, delta, A, B, C, D, z, bias, **kw)
    ref, last_ref = selective_scan_ref(u, delta, A, B, C, D, z, bias, **kw)
    assert out.dtype == dtype and out.shape == u.shape
    if options == "channels_last":  # written in u's layout: coalesced stores, and no copy for the caller
        assert out.stride(1) == 1
    inputs = (u, delta, A, B, C, D, z, bias)
    g, gl = torch.randn_like(out), torch.randn_like(last)
    with triton_on_cpu():
        got = grads((out, last), inputs, (g, gl))
    want = grads((ref, last_ref), inputs, (g, gl))
    names = [n for n, t in zip("u delta A B C D z bias".split(), inputs) if t is not None]
    assert_close_all([out, last, *got], [ref, last_ref, *want], dtype, ["out", "last_state", *names])


@pytest.mark.parametrize("lanes_on_channels", [False, True])
def test_scan_walk_variants_agree(lanes_on_channels):
    """The plain unrolled walks and the prefetching ones (loads issued ahead of the stores) compute the same
    thing, forward and backward, for both directions with gates, on lengths that end mid-group; so does the
    backward that recomputes each checkpoint chunk in pieces (sub_chunk), a partial last piece included."""
    from mamba_ssm.ops.triton import selective_scan as ss

    R, b, d, N, L = 2, 2, 24, 8, 19  # two 16-channel blocks (one partial), two checkpoint chunks, a partial group
    cl = lambda: torch.randn(R, b, L, d).transpose(2, 3)  # noqa: E731  (the mixer's channel-contiguous layout)
    u, delta = cl(), 0.5 * cl()
    A, B, C = -torch.rand(R, d, N) - 0.5, torch.randn(R, b, 1, N, L), torch.randn(R, b, 1, N, L)
    D, z, bias = torch.randn(R, d), torch.randn(b, L, d).transpose(1, 2), torch.randn(R, d)
    # each direction off for one image and scaled for the other
    gate, dout = torch.tensor([[0.5, 0.0], [0.0, 0.3]]), torch.randn(b, L, d).transpose(1, 2)
    args = (u, delta, A, B, C, D, z, bias, True, gate, 0.5)
    results = []
    with triton_on_cpu():
        for prefetch, sub_chunk in ((False, 16), (True, 16), (True, 4 if lanes_on_channels else 8)):
            if sub_chunk == 16:  # (the last backward reads the prefetching forward's checkpoints)
                out = torch.empty(b, L, d).transpose(1, 2)
                last, ckpt = ss.scan_forward(*args, out, want_last=True, want_ckpt=True, unroll=4, block_d=16,
                                             lanes_on_channels=lanes_on_channels, prefetch=prefetch)
            g = ss.scan_backward(*args, dout, ckpt=ckpt, block_d=16, prefetch=prefetch, sub_chunk=sub_chunk,
                                 scratch_evict="evict_last" if sub_chunk == 4 else "")
            results.append([out, last, ckpt] + [g[k] for k in sorted(g)])
    for other in results[1:]:
        for a, c in zip(results[0], other):
            assert torch.allclose(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last,want_ckpt", [(True, False), (True, True), (False, False)])
def test_scan_split_directions_agree(channels_last, want_ckpt):
    """A program per direction with one output each, summed after the launch (split_dirs), computes what one
    program running both directions computes: outputs, last states and checkpoints, with a sample whose
    directions are both gated off and one with only direction 1 on; so does the inference grid that runs the
    pairs whose gate is on first (active_first), whose rows past the last of them do nothing."""
    from mamba_ssm.ops.triton import selective_scan as ss

    R, b, d, N, L = 2, 4, 24, 8, 19
    act = (lambda *s: torch.randn(*s[:-2], s[-1], s[-2]).transpose(-1, -2)) if channels_last else torch.randn
    u, delta, z = act(R, b, d, L), 0.5 * act(R, b, d, L), act(b, d, L)
    A, B, C = -torch.rand(R, d, N) - 0.5, torch.randn(R, b, 1, N, L), torch.randn(R, b, 1, N, L)
    D, bias = torch.randn(R, d), torch.randn(R, d)
    gate = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.0, 0.3], [0.0, 0.0]])
    results = []
    with triton_on_cpu():
        for split, active_first in ((False, None), (True, False)) + (() if want_ckpt else ((True, True),)):
            out = act(b, d, L).fill_(float("nan"))  # every element must be written
            last, ckpt = ss.scan_forward(u, delta, A, B, C, D, z, bias, True, gate, 0.5, out, want_last=True,
                                         want_ckpt=want_ckpt, block_d=16, split_dirs=split,
                                         active_first=active_first)
            if active_first:  # (the plan of that call: the grid of pairs was taken)
                assert list(ss._forward_plans.values())[-1].kwargs["ACTIVE_SAMPLES"] == 4
            assert out.stride() == z.stride()
            ran = (gate.t() != 0) | want_ckpt  # (R, b): a gated-off walk leaves its last state unwritten
            results.append([out, last[ran]] + ([ckpt] if want_ckpt else []))
    for split_result in results[1:]:
        assert torch.isfinite(split_result[0]).all()
        assert (split_result[0][3] == 0).all()  # both directions off: zeros
        for a, c in zip(results[0], split_result):
            assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scan_backward_reads_state_contiguous_B_C_in_aligned_units(dtype):
    """B and C as the mixer passes them, strided views of x_proj's output with the states contiguous and every
    step 16 bytes aligned: the backward kernel takes their strides in units of 16 bytes (for wide loads) and gives
    the gradients that contiguous copies of B and C give (strides in elements), which are the PyTorch
    implementation's; a row that breaks the alignment takes the element strides."""
    from mamba_ssm.ops.cpu import selective_scan as cpu
    from mamba_ssm.ops.triton import selective_scan as ss

    R, b, d, N, L = 2, 2, 32, 8, 11
    cl = lambda *s: torch.randn(*s[:-2], s[-1], s[-2]).transpose(-1, -2).to(dtype)  # noqa: E731
    u, delta, z, dout = cl(R, b, d, L), 0.5 * cl(R, b, d, L), cl(b, d, L), cl(b, d, L)
    A, D, bias, gate = -torch.rand(R, d, N) - 0.5, torch.randn(R, d), torch.randn(R, d), torch.rand(b, R)
    for row, dt_rank in ((24 + 2 * N, 24), (3 + 2 * N, 3)):  # aligned rows, then rows of an odd length
        x_dbl = torch.randn(R, b * L, row).to(dtype)
        B, C = [x_dbl[..., o:o + N].reshape(R, b, L, 1, N).permute(0, 1, 3, 4, 2) for o in (dt_rank, dt_rank + N)]
        assert ss._vector_alignment(B, C) == (16 // B.element_size() if dt_rank == 24 else 1)
        args = (u, delta, A, B, C, D, z, bias, True, gate, 0.5)
        copies = (u, delta, A, B.contiguous(), C.contiguous(), D, z, bias, True, gate, 0.5)
        _, ckpt = cpu.scan_forward(*copies, cl(b, d, L), want_ckpt=True)
        want = cpu.scan_backward(*copies, dout, ckpt=ckpt)
        with triton_on_cpu():
            got = ss.scan_backward(*args, dout, ckpt=ckpt)
            got_copies = ss.scan_backward(*copies, dout, ckpt=ckpt)
        for name, g in got.items():
            if g is not None:
                assert torch.equal(g, got_copies[name]), name
                assert rel(g, want[name]) < (1e-6 if dtype == torch.float32 else 1e-2), name


def test_scan_backward_rejects_bad_launch_parameters_clearly():
    from mamba_ssm.ops.triton import selective_scan as ss

    R, b, d, N, L = 2, 1, 16, 4, 5
    cl = lambda *s: torch.randn(*s[:-2], s[-1], s[-2]).transpose(-1, -2)  # noqa: E731
    args = (cl(R, b, d, L), cl(R, b, d, L), -torch.rand(R, d, N), torch.randn(R, b, 1, N, L),
            torch.randn(R, b, 1, N, L), None, None, None, True, None, 1.0)
    ckpt = torch.zeros(R, b, 1, N, d)
    for bad, message in ((dict(sub_chunk=5), "sub_chunk .5. must divide"), (dict(sum_steps=3), "power of two")):
        with triton_on_cpu(), pytest.raises(ValueError, match=message):
            ss.scan_backward(*args, cl(b, d, L), ckpt=ckpt, **bad)


def test_backward_partial_sums_reduce_in_order_and_skip_past_lengths():
    """The scan backward's partial sums of dB and dC (one per channel block) are summed block by block in order, the
    same bits as a sequential fp32 sum, and nothing at or past a sample's length is read (the kernel writes no
    partials there: NaN here) and those positions come out 0; dD and d delta_bias, which share one buffer, come out
    as their own sums over the samples, and dA as its. Given B's and C's columns of a bf16 x_dbl gradient, the
    sums go there, in bf16, and nothing else of it is written."""
    from mamba_ssm.ops.triton import selective_scan as ss

    R, blocks, b, L, N, d = 2, 5, 3, 70, 16, 8
    part_B, part_C = torch.randn(R, blocks, b, L, N), torch.randn(R, blocks, b, L, N)
    lengths = torch.tensor([70, 33, 0], dtype=torch.int32)
    dead = torch.arange(L)[None, :] >= lengths[:, None].long()  # (b, L)
    for part in (part_B, part_C):
        part[:, :, dead] = float("nan")
    dD_dbias = torch.randn(2, R, b, d)
    out = dict(dB=part_B, dC=part_C, dA=torch.randn(R, b, d, N), dD_dbias=dD_dbias, du=None, ddelta=None, dz=None,
               dgate=None)
    with triton_on_cpu():
        got = ss._reduce_backward_partials(out, N, (1, 1), True, True, lengths)
    for name, part in (("dB", part_B), ("dC", part_C)):
        want = part[:, 0].clone()
        for k in range(1, blocks):
            want += part[:, k]
        want[:, dead] = 0
        assert torch.equal(got[name], want.unsqueeze(2).transpose(-1, -2)), name  # (R, b, 1, N, L) view
    torch.testing.assert_close(got["dD"], dD_dbias[0].sum(1))
    torch.testing.assert_close(got["ddelta_bias"], dD_dbias[1].sum(1))
    torch.testing.assert_close(got["dA"], out["dA"].sum(1))
    # into given memory (eager training: B's and C's columns of x_dbl's gradient, in its dtype), the rest untouched
    x_dbl_grad = torch.full((R, b * L, 3 + 2 * N), float("nan"), dtype=torch.bfloat16)
    B_cols, C_cols = (x_dbl_grad[..., 3 + k * N:3 + (k + 1) * N].view(R, b, L, 1, N).permute(0, 1, 3, 4, 2)
                      for k in (0, 1))
    with triton_on_cpu():
        into = ss._reduce_backward_partials(out, N, (1, 1), True, True, lengths, (B_cols, C_cols))
    assert into["dB"] is B_cols and into["dC"] is C_cols and x_dbl_grad[..., :3].isnan().all()
    for name in ("dB", "dC"):  # (to a bf16 step: the interpreter's casts truncate, the GPU's round to nearest)
        torch.testing.assert_close(into[name].float(), got[name], rtol=2 ** -7, atol=0)


def test_scan_lengths_walk_each_samples_own_sequence():
    """With per-sample lengths the kernels walk only each sample's first lengths[b] positions (direction 1 starts
    at its last one) and write zeros after them, output and gradients: what the PyTorch implementation computes by
    masking, on inputs that are not zero after the end. Lengths that end inside a checkpoint chunk, on a chunk
    boundary, at 0 and at L; one program for both directions, and one per direction; the programs in the samples'
    order by length, one or two channel blocks each."""
    from mamba_ssm.ops.cpu import selective_scan as cpu
    from mamba_ssm.ops.triton import selective_scan as ss

    R, b, d, N, L = 2, 4, 16, 8, 21
    cl = lambda *s: torch.randn(*s[:-2], s[-1], s[-2]).transpose(-1, -2)  # noqa: E731  (channel-contiguous)
    u, delta, z, dout = cl(R, b, d, L), 0.5 * cl(R, b, d, L), cl(b, d, L), cl(b, d, L)
    A, B, C = -torch.rand(R, d, N) - 0.5, torch.randn(R, b, 1, N, L), torch.randn(R, b, 1, N, L)
    D, bias = torch.randn(R, d), torch.randn(R, d)
    gate, lengths = torch.tensor([[1.0, 0.0], [0.5, 1.0], [1.0, 0.3], [1.0, 1.0]]), torch.tensor([21, 9, 0, 16])
    args = (u, delta, A, B, C, D, z, bias, True, gate, 0.5)
    want = cl(b, d, L)
    _, ckpt = cpu.scan_forward(*args, want, want_ckpt=True, lengths=lengths)
    want_grads = cpu.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths)
    assert not want[1, :, 9:].any() and want[1, :, :9].all()
    for split, fwd_block_d in ((False, None), (True, None), (True, 8)):
        out = cl(b, d, L).fill_(float("nan"))
        with triton_on_cpu():
            _, ckpt = ss.scan_forward(*args, out, want_ckpt=True, split_dirs=split, lengths=lengths.int(),
                                      block_d=fwd_block_d)
            got = [ss.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths.int(), block_d=block_d)
                   for block_d in (None, 8)]
        assert rel(out, want) < 1e-6
        for name in want_grads:
            for g in (got[0][name], got[1][name]):
                assert (g is None) == (want_grads[name] is None), name
                assert g is None or rel(g, want_grads[name]) < 1e-6, name
    with pytest.raises(ValueError, match="lengths and the last state"):
        cpu.scan_forward(*args, want, want_last=True, lengths=lengths)


def test_cpu_scan_walks_stop_after_the_longest_sample():
    """The PyTorch implementation with lengths all under L walks only up to the longest sample: what the masked
    walk over the whole sequence computes (to rounding: its sums run over fewer terms), zeros after that point,
    and the gradients in the layouts and strides the op declares; the checkpoint keeps the full length's size."""
    from mamba_ssm.ops.cpu import selective_scan as cpu

    R, b, d, N, L = 2, 4, 16, 8, 21
    cl = lambda *s: torch.randn(*s[:-2], s[-1], s[-2]).transpose(-1, -2)  # noqa: E731  (channel-contiguous)
    u, delta, z, dout = cl(R, b, d, L), 0.5 * cl(R, b, d, L), cl(b, d, L), cl(b, d, L)
    A, B, C = -torch.rand(R, d, N) - 0.5, torch.randn(R, b, 1, N, L), torch.randn(R, b, 1, N, L)
    gate, lengths = torch.tensor([[1.0, 0.0], [0.5, 1.0], [1.0, 0.3], [1.0, 1.0]]), torch.tensor([13, 9, 0, 5])
    args = (u, delta, A, B, C, torch.randn(R, d), z, torch.randn(R, d), True, gate, 0.5)
    out = cl(b, d, L).fill_(float("nan"))
    _, ckpt = cpu.scan_forward(*args, out, want_ckpt=True, lengths=lengths)
    got = cpu.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths)
    want_out = cl(b, d, L)
    _, want_ckpt = cpu._forward(*args, want_out, False, True, lengths)  # the whole sequence, masked
    want = cpu._backward(*args, dout, None, want_ckpt, lengths)
    assert ckpt.shape == want_ckpt.shape and rel(out, want_out) < 1e-6 and not out[..., 13:].any()
    for name, g in got.items():
        if g is None:
            assert want[name] is None, name
            continue
        assert g.shape == want[name].shape and g.stride() == want[name].stride(), name
        assert rel(g, want[name]) < 1e-6, name
        if name in ("du", "ddelta", "dB", "dC", "dz"):
            assert not g[..., 13:].any(), name


def _gated_two_direction_inputs(b, d, N, L):
    """The stacked scan's arguments for two samples (both directions, channel-contiguous, D, z, delta_bias,
    softplus, gates, scale 0.5), the output gradient, and the channel-contiguous tensor maker."""
    R = 2
    cl = lambda *s: torch.randn(*s[:-2], s[-1], s[-2]).transpose(-1, -2)  # noqa: E731  (channel-contiguous)
    u, delta, z, dout = cl(R, b, d, L), 0.5 * cl(R, b, d, L), cl(b, d, L), cl(b, d, L)
    A, B, C = -torch.rand(R, d, N) - 0.5, torch.randn(R, b, 1, N, L), torch.randn(R, b, 1, N, L)
    gate = torch.tensor([[1.0, 0.5], [0.3, 1.0]])
    return (u, delta, A, B, C, torch.randn(R, d), z, torch.randn(R, d), True, gate, 0.5), dout, cl


def test_scan_checkpoint_intervals_agree(monkeypatch):
    """MAMBA_SCAN_CKPT_CHUNK (8, 16 or 32 steps between the training forward's stored states): every interval gives
    what the PyTorch implementation computes, output and every gradient, with per-sample lengths that end inside a
    chunk and a sequence whose last chunk is partial; any other value is one line naming the variable."""
    from mamba_ssm.ops.cpu import selective_scan as cpu
    from mamba_ssm.ops.triton import selective_scan as ss

    b, d, L = 2, 16, 37
    args, dout, cl = _gated_two_direction_inputs(b, d, 8, L)
    for lengths in (None, torch.tensor([37, 19])):
        want = cl(b, d, L)
        _, ckpt = cpu.scan_forward(*args, want, want_ckpt=True, lengths=lengths)
        want_grads = cpu.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths)
        for chunk in ss.CKPT_CHUNKS:
            monkeypatch.setattr(ss, "CKPT_CHUNK", chunk)
            out = cl(b, d, L)
            lens = None if lengths is None else lengths.int()
            with triton_on_cpu():
                _, ckpt = ss.scan_forward(*args, out, want_ckpt=True, lengths=lens)
                got = ss.scan_backward(*args, dout, ckpt=ckpt, lengths=lens)
            assert ckpt.shape[2] == -(-L // chunk) and rel(out, want) < 1e-6, chunk
            for name, g in got.items():
                assert g is None or rel(g, want_grads[name]) < 1e-6, (chunk, name)
    for value in ("8", "32"):
        monkeypatch.setenv(ss.CKPT_CHUNK_ENV, value)
        assert ss.ckpt_chunk_from_env() == int(value)
    monkeypatch.setenv(ss.CKPT_CHUNK_ENV, "12")
    with pytest.raises(RuntimeError) as e:
        ss.ckpt_chunk_from_env()
    assert str(e.value) == "MAMBA_SCAN_CKPT_CHUNK=12: the scan's checkpoint interval must be one of 8, 16, 32 (steps)"


def test_scan_backward_channel_sums_in_the_adjoint_walk_or_after_it_agree():
    """dB and dC summed over the program's channels within the adjoint walk (lane_sums, the default: from the state
    the walk reads and the g dt u it makes; in the interpreter with Triton's sums over the lanes, the GPU's warp
    reduce-scatter being tested below) or from the scratch after each walk: both give what the PyTorch
    implementation computes, with a partial channel block, per-sample lengths and a partial last chunk."""
    from mamba_ssm.ops.cpu import selective_scan as cpu
    from mamba_ssm.ops.triton import selective_scan as ss

    b, d, L = 2, 48, 29
    args, dout, cl = _gated_two_direction_inputs(b, d, 16, L)
    for lengths in (None, torch.tensor([29, 12])):
        _, ckpt = cpu.scan_forward(*args, cl(b, d, L), want_ckpt=True, lengths=lengths)
        want = cpu.scan_backward(*args, dout, ckpt=ckpt, lengths=lengths)
        lens = None if lengths is None else lengths.int()
        for lane_sums in (True, False):
            with triton_on_cpu():
                _, ckpt = ss.scan_forward(*args, cl(b, d, L), want_ckpt=True, lengths=lens)
                got = ss.scan_backward(*args, dout, ckpt=ckpt, lengths=lens, lane_sums=lane_sums)
            for name, g in got.items():
                assert g is None or rel(g, want[name]) < 1e-6, (lane_sums, name)


def _run_warp_ptx(asm: str, inputs):
    """Runs the straight-line PTX of REDUCE_SCATTER_ASM on 32 lanes in lockstep (the instructions it uses only),
    inputs[lane] the lane's $16.. registers; -> each lane's $0.. outputs."""
    import re

    n_out = len(inputs[0])
    regs = [{f"${n_out + j}": float(x) for j, x in enumerate(row)} | {"%laneid": lane} for lane, row in
            enumerate(inputs)]
    val = lambda r, a: r[a] if a in r else int(a)  # noqa: E731
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        a = [x.strip() for x in rest.split(",")]
        if op.startswith("shfl.sync.bfly"):
            sent = [val(r, a[1]) for r in regs]
            for lane, r in enumerate(regs):
                r[a[0]] = sent[lane ^ int(a[2])]
            continue
        for r in regs:
            if op in ("mov.u32", "mov.f32"):
                r[a[0]] = val(r, a[1])
            elif op == "and.b32":
                r[a[0]] = val(r, a[1]) & int(a[2])
            elif op == "setp.ne.u32":
                r[a[0]] = val(r, a[1]) != int(a[2])
            elif op == "selp.f32":
                r[a[0]] = val(r, a[1]) if r[a[3]] else val(r, a[2])
            elif op == "add.f32":
                r[a[0]] = val(r, a[1]) + val(r, a[2])
            else:
                raise AssertionError(f"instruction outside the simulated subset: {line}")
        assert re.fullmatch(r"[\w.]+", op)
    return [[r[f"${j}"] for j in range(n_out)] for r in regs]


def test_the_warp_reduce_scatter_gives_each_lane_pair_one_states_sum():
    """The PTX that sums the backward's (16 states x 32 lanes) tiles over the lanes on the GPU, run here by a
    lockstep simulation of its instructions: lanes 2n and 2n + 1 end with the sum over all 32 lanes of state n,
    in every output register (integers, so every order of the adds gives the exact sum)."""
    from mamba_ssm.ops.triton import selective_scan as ss

    x = torch.randint(-1000, 1000, (32, 16), generator=torch.Generator().manual_seed(0)).double()
    out = torch.tensor(_run_warp_ptx(ss.REDUCE_SCATTER_ASM.value, x.tolist()))
    want = x.sum(0)[torch.arange(32) // 2]
    assert torch.equal(out, want[:, None].expand(32, 16))


def _run_shared_tile_ptx(asm: str, operands, memory: dict) -> list:
    """Runs SHARED_TILE_STORE_ASM or SHARED_TILE_LOAD_ASM on 32 lanes (operands[lane]: that lane's $n -> value) over
    `memory` (byte address -> fp32 value); -> each lane's operands after it, and records in memory["spans"] the
    bytes that each instruction touched across the lanes."""
    import re

    regs = [dict(r) for r in operands]
    for line in asm.splitlines():
        vector = re.fullmatch(r"(ld|st)\.shared\.v4\.f32 (?:\{(.+)\}, )?\[\$(\d+)\+(\d+)\](?:, \{(.+)\})?;", line)
        if vector:
            kind, loaded, base, offset, stored = vector.groups()
            touched = []
            for r in regs:
                address = r[f"${base}"] + int(offset)
                touched.append(address)
                for j, name in enumerate((loaded or stored).split(", ")):
                    if kind == "ld":
                        r[name] = memory[address + 4 * j]
                    else:
                        memory[address + 4 * j] = r[name]
            memory.setdefault("spans", []).append(touched)
        else:
            dead = re.fullmatch(r"mov\.b32 (\$\d+), 0;", line)
            assert dead, f"instruction outside the simulated subset: {line}"
            for r in regs:
                r[dead.group(1)] = 0
    return regs


def test_the_shared_scratch_holds_each_slots_states_without_bank_conflicts():
    """The PTX that stores (loads) a lane's 16 states into (from) a state slot of the scan backward's scratch in
    shared memory, at the addresses _state_slot_store gives it (slot k at k * 2048 bytes, lane l's 16 bytes at
    l * 16 within each 512-byte vector row), simulated on 32 lanes for the 9 slots of a piece of 8 steps: every load
    returns its slot's stored tile; each instruction covers 512 contiguous bytes, one lane's 16 after another's (no
    bank conflicts); the slots fill the scratch's state part exactly, its dy rows after them."""
    from mamba_ssm.ops.triton import selective_scan as ss

    memory, slots, n, d = {}, 9, 16, 32
    tiles = torch.randn(slots, d, n, generator=torch.Generator().manual_seed(0)).tolist()
    lane_address = lambda k, lane: k * n * d * 4 + lane * 16  # noqa: E731
    for k in range(slots):
        operands = [{"$16": lane_address(k, lane)} | {f"${32 + j}": tiles[k][lane][j] for j in range(n)}
                    for lane in range(d)]
        _run_shared_tile_ptx(ss.SHARED_TILE_STORE_ASM.value, operands, memory)
    for k in reversed(range(slots)):
        got = _run_shared_tile_ptx(ss.SHARED_TILE_LOAD_ASM.value, [{"$16": lane_address(k, lane)} for lane in range(d)],
                                   memory)
        assert [[r[f"${j}"] for j in range(n)] for r in got] == tiles[k]
    for touched in memory.pop("spans"):
        assert touched == list(range(touched[0], touched[0] + 16 * d, 16))
    assert sorted(memory) == list(range(0, slots * n * d * 4, 4))
    sub_t = 8  # the scratch's size for pieces of 8 steps: these state slots, then a dy row of 32 lanes per step
    config = ss._BackwardConfig(32, 1, True, sub_t, "", 0, 4, True, True, True, True)
    assert ss._scratch_elements(n, config) * 4 == slots * n * d * 4 + sub_t * d * 4


def test_the_scratch_goes_to_shared_memory_only_where_the_programs_fit():
    """The scan backward's scratch (19 KiB a program at pieces of 8 steps) goes to shared memory where an SM holds 8
    programs' (H100 / H200: 228 KiB, A100: 164 KiB), not on GPUs with about 100 KiB an SM (there it would halve the
    programs in flight); a scratch past the 48 KiB of a static array never does."""
    from mamba_ssm.ops.triton import selective_scan as ss

    config = ss._BackwardConfig(32, 1, True, 8, "", 0, 4, True, True, True, True)
    piece_bytes = ss._scratch_elements(16, config) * 4
    assert piece_bytes == 19456
    assert ss.shared_scratch_fits(228 * 1024, piece_bytes) and ss.shared_scratch_fits(164 * 1024, piece_bytes)
    assert not ss.shared_scratch_fits(100 * 1024, piece_bytes)
    assert not ss.shared_scratch_fits(228 * 1024, 48 * 1024)


@pytest.mark.parametrize("lanes_on_channels", [True, False])
def test_forward_takes_A_in_its_memory_order_without_a_copy_when_it_comes_so(lanes_on_channels):
    """The forward kernel reads A (R, d, N) from (R, N, d)-contiguous memory (lanes on channels) or (R, d, N)-
    contiguous: A laid out so is passed as it is, any other layout is copied into it; the values are A's."""
    from mamba_ssm.ops.triton.selective_scan import A_in_kernel_order

    R, dim, d_state = 2, 6, 4
    by_channel = torch.randn(R, d_state, dim).transpose(1, 2)  # (R, N, d) memory
    by_state = torch.randn(R, dim, d_state)  # (R, d, N) memory
    odd = torch.randn(dim, R, d_state).transpose(0, 1)
    for A in (by_channel, by_state, odd):
        got = A_in_kernel_order(A, lanes_on_channels)
        in_order = got.transpose(1, 2).is_contiguous() if lanes_on_channels else got.is_contiguous()
        assert in_order and torch.equal(got, A)
        assert (got is A) == (A is (by_channel if lanes_on_channels else by_state))
