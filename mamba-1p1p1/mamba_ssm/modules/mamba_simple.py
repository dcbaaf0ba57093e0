"""Mamba mixer with the mamba-ssm 1.1.1 constructor plus Vim's bidirectional options.

bimamba_type "none": the original one-direction Mamba. "v2" (Vim): a second, reversed scan with its own
conv1d_b / x_proj_b / dt_proj_b / A_b_log / D_b, sharing in_proj, z and out_proj; the two outputs are
summed (halved when if_divide_out). Parameter names match Vim's, so released Vim checkpoints load as-is.
"""
import contextlib
import math
import operator
from typing import TYPE_CHECKING, Callable, NamedTuple, Optional

import torch
import torch.nn as nn

from mamba_ssm.ops import linear_fp32
from mamba_ssm.ops.bimamba_interface import ScanWeights, bimamba_v2_inner_fn
from mamba_ssm.ops.dispatch import graph_capturing, needs_grad, ops_watched, reference_forced
from mamba_ssm.ops.selective_scan_interface import mamba_inner_fn

if TYPE_CHECKING:
    from mamba_ssm.ops.bimamba_stacked import StackedWeights

BIMAMBA_TYPES = ("none", "v2")
# What the inference cache's key reads from each parameter (C-level getters: the key is built on every call)
_data_ptr, _version, _dtype = torch.Tensor.data_ptr, operator.attrgetter("_version"), operator.attrgetter("dtype")


class InferenceWeights(NamedTuple):
    """A v2 layer's weights as inference on the kernels takes them (Mamba.inference_weights): the Linear
    weights and biases by name and the stacked x_proj / dt_proj weights in the autocast dtype (no cast per
    call), A = -exp(A_log) and the other fp32 parameters as the kernels read them."""
    linears: dict  # name -> (weight, bias or None, memo: a dict for what the fp32 kernel derives from the weight)
    fwd: ScanWeights
    bwd: ScanWeights
    stacked: "StackedWeights"


# Set on a module and its submodules by declare_constant_weights.
_CONSTANT_WEIGHTS = "_constant_weights"
# Where eager inference keeps what it derives: a module's cached weights (cached_for_inference), a model's memo of
# its layers' (inference_weights_of). Plain attributes: not in state_dict, not moved by .to().
_CACHE, _MEMO = "_inference_cache", "_inference_weights_memo"


def declare_constant_weights(module: nn.Module) -> nn.Module:
    """Declare that `module`'s parameters never change from now on (DyVM's frozen teacher, dyvm.losses.DyVMLoss):
    the weights its inference derives from them (each layer's stacked, cast weights and A = -exp(A_log)), kept
    after an eager call, are then used inside CUDA-graph captures too, so the graphs read them instead of deriving
    them again at every replay (some 15 small kernels a layer). A graph captured after this does not see in-place
    changes to the parameters: load other weights into a new module. Nothing is derived inside a capture: the
    weights come from an eager call before it (a capture that finds none derives them in the graph, as before)."""
    for m in module.modules():
        m.__dict__[_CONSTANT_WEIGHTS] = True
    return module


@contextlib.contextmanager
def weights_constant_while(module: nn.Module):
    """Within the block, `module`'s weights count as constant (declare_constant_weights): a CUDA-graph capture
    reads the weights that eager calls derived and kept, instead of deriving them inside the graph (dyvm.serving,
    which holds on to what its graphs read and captures again when a parameter changes). Modules declared
    constant before stay so."""
    changed = [m for m in module.modules() if not m.__dict__.get(_CONSTANT_WEIGHTS, False)]
    for m in changed:
        m.__dict__[_CONSTANT_WEIGHTS] = True
    try:
        yield
    finally:
        for m in changed:
            m.__dict__.pop(_CONSTANT_WEIGHTS, None)


def inference_caches(module: nn.Module) -> list:
    """What `module`'s eager inference keeps (each submodule's cached weights, a model's memo of its layers'):
    a graph captured under weights_constant_while reads these tensors, so its owner keeps them alive."""
    return [m.__dict__[name] for m in module.modules()
            for name in (_CACHE, _MEMO) if name in m.__dict__]


def inference_cache_usable(x, owner: Optional[nn.Module] = None) -> bool:
    """Whether inference may take cached weights: not when traced or watched (fake tensors have no data
    pointers, and torch.compile should see the ops), nor while a CUDA graph is captured (the graph must read
    the parameters, which may change in place) unless the owner's weights are constant (declare_constant_weights)."""
    if reference_forced() or ops_watched():
        return False
    return not graph_capturing(x) or (owner is not None and owner.__dict__.get(_CONSTANT_WEIGHTS, False))


def inference_cache_key(params: list, x) -> Optional[tuple]:
    """The inference cache's key for these parameters, or None where a gradient is needed (nothing cached)."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in params):
        return None
    device = x.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    return (dtype, *tensors_state(params))


def tensors_state(tensors: list) -> tuple:
    """What tells whether tensors changed: their addresses, version counters (bumped by in-place updates) and dtypes.
    The inference caches' key (inference_cache_key) and dyvm.serving's check before a replay."""
    return (*map(_data_ptr, tensors), *map(_version, tensors), *map(_dtype, tensors))


def cached_for_inference(owner, params: list, x, derive: Callable):
    """derive(autocast dtype or None), kept in owner.__dict__ while `params` and the autocast dtype are unchanged
    (inference_cache_key); None where a gradient is needed. The caller checks inference_cache_usable first."""
    key = inference_cache_key(params, x)
    if key is None:
        return None
    cached = owner.__dict__.get(_CACHE)
    if cached is None or cached[0] != key:
        if graph_capturing(x):  # (constant weights: only what an eager call derived before the capture)
            return None
        cached = (key, derive(key[0]))
        owner.__dict__[_CACHE] = cached
    return cached[1]


_UNSET = object()  # Mamba.forward's weights when the caller has not looked them up

# Bumped whenever any module registers a parameter or a submodule (attribute assignment included): a model's
# memo of its mixers and their parameters (inference_weights_of) is rebuilt then.
_registrations = [0]


def _count_registration(*_):
    _registrations[0] += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)
torch.nn.modules.module.register_module_module_registration_hook(_count_registration)


def inference_weights_of(owner, mixers: Callable[[], list], x) -> list:
    """[m.inference_weights(x) for m in mixers()], checked with one key over all the mixers' parameters
    instead of one per layer (some 30 us of host time per layer on an H200 machine, where eager inference is
    bound by the host). The memo lives in owner.__dict__ (the model: a plain attribute, not saved), touched only
    where the cache is usable (a tracer cannot follow that write). Its list of mixers and of where their
    parameters live is rebuilt when any module registers a parameter or submodule (a replaced Parameter or
    Linear); a parameter swapped into a parameter dict directly (torch.func.functional_call) is seen by an
    identity check of every parameter; in-place updates, .to() and dtype changes show in the key itself, as
    for one layer."""
    if not inference_cache_usable(x, owner):
        return [None] * len(mixers())
    memo = owner.__dict__.setdefault(_MEMO, {})
    params = _memo_params(mixers, memo)
    if params is None:
        return [m.inference_weights(x) for m in memo["mixers"]]
    key = inference_cache_key(params, x)
    if key is None:
        return [None] * len(memo["mixers"])
    if memo.get("key") != key:
        if graph_capturing(x):  # (constant weights: only what an eager call derived before the capture)
            return [None] * len(memo["mixers"])
        memo["weights"], memo["key"] = [m.inference_weights(x) for m in memo["mixers"]], key
    return memo["weights"]


def _memo_params(mixers: Callable[[], list], memo: dict) -> Optional[list]:
    """The mixers' current cache parameters through the memo (None: a mixer without the cache)."""
    if memo.get("registrations") == _registrations[0]:
        if memo["params"] is None:
            return None
        try:  # (C-level maps: a few microseconds for a whole model)
            current = list(map(operator.getitem, memo["dicts"], memo["names"]))
            if all(map(operator.is_, current, memo["params"])):
                return current
        except KeyError:  # a parameter was removed: rebuild
            pass
    layers = mixers()
    memo.clear()
    memo.update(registrations=_registrations[0], mixers=layers, params=None)
    try:
        if all(m.bimamba_type == "v2" for m in layers):
            sources = [src for m in layers for src in m._cache_param_sources()]
            memo.update(dicts=[d for d, _ in sources], names=[n for _, n in sources],
                        params=[d[n] for d, n in sources])
    except (KeyError, AttributeError):
        pass
    return memo["params"]


class Mamba(nn.Module):
    def __init__(self, d_model, d_state=16, d_conv=4, expand=2, dt_rank="auto", dt_min=0.001, dt_max=0.1,
                 dt_init="random", dt_scale=1.0, dt_init_floor=1e-4, conv_bias=True, bias=False,
                 use_fast_path=True, layer_idx=None, device=None, dtype=None, bimamba_type="none",
                 if_divide_out=False, init_layer_scale=None):
        super().__init__()
        if bimamba_type not in BIMAMBA_TYPES:
            raise ValueError(f"bimamba_type must be one of {BIMAMBA_TYPES}, got {bimamba_type!r}")
        factory = {"device": device, "dtype": dtype}
        self.d_model, self.d_state, self.d_conv, self.expand = d_model, d_state, d_conv, expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.use_fast_path = use_fast_path  # kept for API compatibility: dispatch is by device
        self.layer_idx = layer_idx
        self.bimamba_type = bimamba_type
        self.if_divide_out = if_divide_out
        self.activation = "silu"

        self.in_proj = nn.Linear(d_model, self.d_inner * 2, bias=bias, **factory)
        directions = ("", "_b") if bimamba_type == "v2" else ("",)
        for sfx in directions:
            conv = nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, padding=d_conv - 1,
                             bias=conv_bias, **factory)
            x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
            dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
            self._init_dt_proj(dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor)
            # S4D-real init; keep A_log in fp32 whatever the module dtype.
            A = torch.arange(1, d_state + 1, dtype=torch.float32, device=device).repeat(self.d_inner, 1)
            A_log = nn.Parameter(torch.log(A))
            A_log._no_weight_decay = True
            D = nn.Parameter(torch.ones(self.d_inner, device=device))
            D._no_weight_decay = True
            setattr(self, "conv1d" + sfx, conv)
            setattr(self, "x_proj" + sfx, x_proj)
            setattr(self, "dt_proj" + sfx, dt_proj)
            setattr(self, "A_log" if not sfx else "A_b_log", A_log)
            setattr(self, "D" + sfx, D)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.gamma = None
        if init_layer_scale is not None:
            self.gamma = nn.Parameter(init_layer_scale * torch.ones(d_model, **factory))

    def _init_dt_proj(self, dt_proj, dt_init, dt_scale, dt_min, dt_max, dt_init_floor):
        std = self.dt_rank ** -0.5 * dt_scale
        if dt_init == "constant":
            nn.init.constant_(dt_proj.weight, std)
        elif dt_init == "random":
            nn.init.uniform_(dt_proj.weight, -std, std)
        else:
            raise ValueError(f"dt_init must be 'constant' or 'random', got {dt_init!r}")
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # inverse of softplus, so that softplus(bias) = dt
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        dt_proj.bias._no_reinit = True

    def scan_weights(self, backward=False):
        """ScanWeights of one direction (A = -exp(A_log) in fp32)."""
        sfx = "_b" if backward else ""
        conv, dt_proj = getattr(self, "conv1d" + sfx), getattr(self, "dt_proj" + sfx)
        A_log = self.A_b_log if backward else self.A_log
        return ScanWeights(conv.weight, conv.bias, getattr(self, "x_proj" + sfx).weight, dt_proj.weight,
                           dt_proj.bias.float(), -torch.exp(A_log.float()), getattr(self, "D" + sfx).float())

    def training_stack_params(self) -> dict:
        """The parameters stack_for_training takes: (forward, backward direction) pairs by
        mamba_ssm.ops.bimamba_stacked.TRAINING_STACK_FIELDS name ("v2" layers)."""
        conv, conv_b, dt_proj, dt_proj_b = self.conv1d, self.conv1d_b, self.dt_proj, self.dt_proj_b
        return dict(conv_weight=(conv.weight, conv_b.weight), conv_bias=(conv.bias, conv_b.bias),
                    x_proj_weight=(self.x_proj.weight, self.x_proj_b.weight),
                    dt_proj_weight=(dt_proj.weight, dt_proj_b.weight), dt_proj_bias=(dt_proj.bias, dt_proj_b.bias),
                    A_log=(self.A_log, self.A_b_log), D=(self.D, self.D_b))

    def _uncached_weights(self, xz):
        """(fwd, bwd, stacked) where no cached weights apply (training, mostly): where a gradient is wanted and
        nothing watches the ops, stacked by stack_for_training in a third of the launches (fwd and bwd then hold
        views of its A), else the directions' ScanWeights (stacked by the op itself)."""
        from mamba_ssm.ops.bimamba_stacked import stack_for_training, training_stack_applies

        pairs = self.training_stack_params()
        if not (needs_grad(xz, *(t for pair in pairs.values() for t in pair)) and not ops_watched()
                and not reference_forced() and training_stack_applies(pairs)):
            return self.scan_weights(), self.scan_weights(backward=True), None
        stacked = stack_for_training(pairs, xz.dtype)
        fwd, bwd = (ScanWeights(*(pairs[n][r] for n in ("conv_weight", "conv_bias", "x_proj_weight",
                                                       "dt_proj_weight", "dt_proj_bias")), stacked.A[r], pairs["D"][r])
                    for r in (0, 1))
        return fwd, bwd, stacked

    def _cached_linears(self) -> dict:
        """The Linear layers whose weights inference takes from the cache (subclasses add theirs), by their
        attribute names (linear() and the cache's checks find them in self._modules under those names)."""
        return {"in_proj": self.in_proj, "out_proj": self.out_proj}

    def _cache_slots(self) -> tuple:
        """Where the parameters the inference cache derives from live: (submodule name or "" for this module,
        parameter name). Read through the modules' parameter dicts, not attribute access: Module.__getattr__
        costs about a microsecond a call, and the cache is validated on every layer of every forward."""
        own = [(m + sfx, n) for sfx in ("", "_b") for m, n in (("conv1d", "weight"), ("conv1d", "bias"),
                                                                ("x_proj", "weight"), ("dt_proj", "weight"),
                                                                ("dt_proj", "bias"))]
        own += [("", "A_log"), ("", "D"), ("", "A_b_log"), ("", "D_b")]
        return tuple(own + [(name, n) for name in self._cached_linears() for n in ("weight", "bias")])

    def _cache_param_sources(self) -> list:
        """(parameter dict, name) of each current parameter of _cache_slots (None-valued ones, e.g. absent
        biases, left out): where the inference cache reads them, without Module.__getattr__."""
        slots = self.__dict__.get("_cache_slot_memo")
        if slots is None:
            slots = self.__dict__["_cache_slot_memo"] = self._cache_slots()
        modules = self._modules
        sources = [(modules[m]._parameters if m else self._parameters, n) for m, n in slots]
        return [(d, n) for d, n in sources if d[n] is not None]

    def _cache_params(self) -> list:
        """The current parameters of _cache_param_sources."""
        return [d[n] for d, n in self._cache_param_sources()]

    def inference_weights(self, x) -> Optional[InferenceWeights]:
        """This layer's weights as the inference kernels take them, or None where nothing is cached (forced
        references, training, torch.compile, a dispatch mode, CUDA-graph capture). Kept while the parameters
        and the autocast dtype are unchanged: deriving A, stacking the directions and casting each weight to
        the autocast dtype is some 15 small ops per layer, which the host pays on every eager call (eager
        inference is bound by the host, not the GPU). The check itself is a few microseconds: the parameters'
        data pointers and version counters (bumped by every in-place update: optimizer steps,
        load_state_dict), read without Module.__getattr__. A model checks all its layers at once:
        inference_weights_of."""
        if self.bimamba_type != "v2" or not inference_cache_usable(x, self):
            return None
        try:
            params = self._cache_params()
        except (KeyError, AttributeError):  # a submodule or parameter was replaced or removed: the module path
            return None
        return cached_for_inference(self, params, x, self._derive_inference_weights)

    def _derive_inference_weights(self, dtype) -> InferenceWeights:
        from mamba_ssm.ops.bimamba_stacked import stack_directions

        cast = (lambda t: t) if dtype is None else (lambda t: None if t is None else t.to(dtype))  # noqa: E731
        fwd, bwd = self.scan_weights(), self.scan_weights(backward=True)
        stacked = stack_directions(fwd, bwd)
        stacked = stacked._replace(x_proj_weight=cast(stacked.x_proj_weight), memo={},
                                   dt_proj_weight=cast(stacked.dt_proj_weight))
        return InferenceWeights({n: (cast(m.weight), cast(m.bias), {}) for n, m in self._cached_linears().items()},
                                fwd, bwd, stacked)

    def linear(self, name: str, x, weights: Optional[InferenceWeights] = None,
               live_rows: Optional[linear_fp32.LiveRows] = None):
        """The Linear `name` (see _cached_linears) applied to x, with the cached weights when given; fp32 on a GPU
        as three TF32 tensor-core products where mamba_ssm.ops.linear_fp32 applies (training and inference), there
        computing only the live rows when given: each image's first lengths + d_conv - 1 rows (the conv reads that
        far past its last kept token); the others come out as zeros (masked DyVM training, where nobody reads them)."""
        cached = weights.linears.get(name) if weights is not None else None  # (inference: no live rows)
        return linear_fp32.linear_module(self._modules[name], x, cached, live_rows, self.d_conv - 1)

    def in_proj_xz(self, hidden_states, weights: Optional[InferenceWeights] = None,
                   live_rows: Optional[linear_fp32.LiveRows] = None):
        """(batch, L, d_model) -> xz (batch, 2*d_inner, L): x then z, channels first as the scan wants.
        live_rows: see linear."""
        return self.linear("in_proj", hidden_states, weights, live_rows).transpose(1, 2)

    def mix(self, xz, gate=None, mask=None, weights: Optional[InferenceWeights] = None, lengths=None,
            gate_head=None, live_rows: Optional[linear_fp32.LiveRows] = None):
        """xz (batch, 2*d_inner, L) -> (batch, L, d_model): conv, scans, z-gating, out_proj.

        gate (batch, 2), mask (batch, L), lengths (batch,) and gate_head are the DyVM options of
        bimamba_v2_inner_fn ("v2" only);
        weights: inference_weights(xz), if the caller has them already; live_rows: out_proj's (see linear).
        """
        if self.bimamba_type == "v2":
            weights = weights if weights is not None else self.inference_weights(xz)
            if weights is None:
                fwd, bwd, stacked = self._uncached_weights(xz)
            else:
                fwd, bwd, stacked = weights.fwd, weights.bwd, weights.stacked
            y = bimamba_v2_inner_fn(xz, fwd, bwd, gate=gate, mask=mask, divide_out=self.if_divide_out,
                                    stacked=stacked, lengths=lengths, gate_head=gate_head)
            out = self.linear("out_proj", y.transpose(1, 2), weights, live_rows)
        else:
            if any(o is not None for o in (gate, mask, lengths, gate_head, live_rows)):
                raise ValueError("gate, mask, lengths, gate_head and live_rows need bimamba_type='v2'")
            w = self.scan_weights()
            out = mamba_inner_fn(xz, w.conv_weight, w.conv_bias, w.x_proj_weight, w.dt_proj_weight,
                                 self.out_proj.weight, self.out_proj.bias, w.A, None, None, w.D,
                                 delta_bias=w.dt_proj_bias, delta_softplus=True)
        return out * self.gamma if self.gamma is not None else out

    def forward(self, hidden_states, inference_params=None, mask=None, gate=None, weights=_UNSET):
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model). weights: this layer's inference_weights
        when the caller has them (a model checks all its layers at once: inference_weights_of)."""
        if inference_params is not None:
            raise NotImplementedError("step-by-step decoding (inference_params) is not implemented: "
                                      "Vim and DyVM run whole sequences")
        if weights is _UNSET:
            weights = self.inference_weights(hidden_states)
        return self.mix(self.in_proj_xz(hidden_states, weights), gate=gate, mask=mask, weights=weights)
