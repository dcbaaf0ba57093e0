"""The reference ops of causal_conv1d and mamba_ssm against plain computations written here."""
import pytest
import torch
import torch.nn.functional as F

from causal_conv1d import causal_conv1d_fn, causal_conv1d_ref
from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_ref, scan_direction_ref
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn, mamba_inner_ref, selective_scan_fn, selective_scan_ref
from mamba_ssm.ops.triton.layernorm import RMSNorm, layer_norm_fn, rms_norm_fn


def scan_by_steps(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False):
    """The selective scan one time step at a time, in float64: the oracle."""
    u, delta, A, B, C = (t.double() for t in (u, delta, A, B, C))
    if delta_bias is not None:
        delta = delta + delta_bias.double()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, length = u.shape
    h = torch.zeros(batch, dim, A.shape[1], dtype=torch.float64)
    ys = []

    def at(M, t):  # B or C at step t as (batch, dim, N)
        if M.dim() == 2:
            return M.expand(batch, dim, -1)
        if M.dim() == 3:
            return M[:, None, :, t].expand(batch, dim, -1)
        return M[:, :, :, t].repeat_interleave(dim // M.shape[1], dim=1)

    for t in range(length):
        h = torch.exp(delta[:, :, t, None] * A) * h + (delta[:, :, t] * u[:, :, t])[..., None] * at(B, t)
        ys.append((h * at(C, t)).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + u * D.double()[:, None]
    if z is not None:
        y = y * F.silu(z.double())
    return y, h


def make_scan_inputs(batch=2, dim=6, length=13, d_state=4, bc="variable", dtype=torch.float32, requires_grad=False):
    shapes = {"fixed": (dim, d_state), "variable": (batch, d_state, length), "grouped": (batch, 2, d_state, length)}
    t = {
        "u": torch.randn(batch, dim, length),
        "delta": 0.5 * torch.randn(batch, dim, length),
        "A": -(0.1 + torch.rand(dim, d_state)),
        "B": torch.randn(shapes[bc]),
        "C": torch.randn(shapes[bc]),
        "D": torch.randn(dim),
        "z": torch.randn(batch, dim, length),
        "delta_bias": 0.5 * torch.randn(dim),
    }
    for k in ("u", "delta", "B", "C", "z"):
        t[k] = t[k].to(dtype)
    if requires_grad:
        for v in t.values():
            v.requires_grad_(True)
    return t


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


def conv_by_taps(x, weight, bias, activation):
    width = weight.shape[1]
    out = torch.zeros_like(x) if bias is None else bias[None, :, None].expand_as(x).clone()
    for k in range(width):
        shift = width - 1 - k  # tap k looks `shift` steps back
        out[..., shift:] += weight[None, :, k, None] * x[..., :x.shape[-1] - shift]
    return F.silu(out) if activation else out


@pytest.mark.parametrize("width", [2, 3, 4])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
@pytest.mark.parametrize("bias", [True, False])
def test_causal_conv1d_matches_tap_sum(width, activation, bias):
    x = torch.randn(2, 5, 17, requires_grad=True)
    w = torch.randn(5, width, requires_grad=True)
    b = torch.randn(5, requires_grad=True) if bias else None
    out = causal_conv1d_fn(x, w, b, activation=activation)
    ref = conv_by_taps(x, w, b, activation)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    params = [p for p in (x, w, b) if p is not None]
    for got, want in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_causal_conv1d_errors_name_the_problem():
    x = torch.randn(2, 5, 9)
    with pytest.raises(ValueError, match="widths 2 to 4"):
        causal_conv1d_ref(x, torch.randn(5, 6))
    with pytest.raises(NotImplementedError, match="activation"):
        causal_conv1d_ref(x, torch.randn(5, 4), activation="relu")


@pytest.mark.parametrize("residual_in_fp32", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_add_rmsnorm_matches_unfused(residual_in_fp32, dtype):
    x = torch.randn(3, 7, 16).to(dtype)
    residual = torch.randn(3, 7, 16)
    weight = torch.randn(16)
    out, res_out = rms_norm_fn(x, weight, None, residual=residual, prenorm=True, residual_in_fp32=residual_in_fp32,
                               eps=1e-5)
    s = x.float() + residual
    want = (s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * weight).to(dtype)
    assert res_out.dtype == (torch.float32 if residual_in_fp32 else dtype)
    assert out.dtype == dtype
    torch.testing.assert_close(res_out.float(), s.to(res_out.dtype).float())
    torch.testing.assert_close(out, want)
    # Without prenorm only the normalised tensor comes back; LayerNorm flavour matches F.layer_norm.
    assert torch.equal(rms_norm_fn(x, weight, None, residual=residual, eps=1e-5), out)
    ln = layer_norm_fn(x.float(), weight, torch.zeros(16), eps=1e-5)
    torch.testing.assert_close(ln, F.layer_norm(x.float(), (16,), weight, torch.zeros(16), 1e-5))


def test_rmsnorm_module_first_layer_residual_is_the_input_in_fp32():
    norm = RMSNorm(8)
    x = torch.randn(2, 3, 8, dtype=torch.bfloat16)
    out, residual = norm(x, prenorm=True, residual_in_fp32=True)
    assert residual.dtype == torch.float32 and torch.equal(residual, x.float())
    assert norm.bias is None


def _inner_args(d_model=8, d_inner=16, dt_rank=2, d_state=4, width=4, length=11):
    return dict(
        xz=torch.randn(2, 2 * d_inner, length),
        conv1d_weight=torch.randn(d_inner, 1, width) * 0.5, conv1d_bias=torch.randn(d_inner) * 0.1,
        x_proj_weight=torch.randn(dt_rank + 2 * d_state, d_inner) * 0.3,
        delta_proj_weight=torch.randn(d_inner, dt_rank) * 0.3, out_proj_weight=torch.randn(d_model, d_inner) * 0.3,
        out_proj_bias=None, A=-(torch.rand(d_inner, d_state) + 0.5), D=torch.randn(d_inner),
        delta_bias=torch.randn(d_inner) * 0.1)


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
