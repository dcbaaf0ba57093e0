"""Dynamic Vision Mamba: a Vim with learned token pruning and per-image scan-direction selection.

docs/reference.md section 2. Before each pruning location a score predictor rates the patch
tokens; training keeps the full sequence, moves pruned tokens behind the kept ones and masks them out of
the scans (so gradients reach the decisions), inference gathers the top-k tokens so the sequence
physically shrinks. Both orderings are the same (kept tokens in original order, the class token(s) placed
among them by the backbone's layout: Vim's in their middle, VideoMamba's first, MambaReg's registers spread
evenly; dyvm.models.layout), which makes the two paths compute the same function for the same decisions.
Each layer's gate head decides per image which of the two scans run.
"""
from dataclasses import dataclass, fields
from functools import partial
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from dyvm.models.mixer import DynamicMamba, reset_gate_head
from dyvm.models.output import ForwardOutput
from dyvm.models.predictor import TokenScorePredictor
from dyvm.models.vim import Vim, VimConfig, build_config
from dyvm.pruning import (ClsPositions, gather_index, gather_stage, gumbel_sigmoid_gate, indices_to_mask, insert_cls,
                          keep_count, kept_first_order, make_selection, permute_tokens, split_cls,
                          to_original_order)
from mamba_ssm.ops.linear_fp32 import LiveRows

PRUNING_MODES = ("learned", "random", "static", "none")
PREDICTOR_INPUTS = ("residual", "ssm_B", "ssm_delta")
GATE_TAU = 2.0
# The defaults of the two keep ratios are the authors' main.py defaults (--token-keep-ratio 0.7,
# --block-keep-ratio 0.7); a table row sets its own in its config. dyvm.models.registry re-exports them
# for every entry point, so a flag, a config key and a model built from Python agree.
DEFAULT_TOKEN_KEEP_RATIO = 0.7
DEFAULT_BLOCK_KEEP_RATIO = 0.7
DEFAULT_PRUNING_LOC = (6, 12, 18)
# Training: the scans of a layer after a pruning stage walk each image's kept tokens only (the pruned ones sit
# masked behind them, where they change nothing the kept ones see: mamba_ssm.ops.bimamba_interface), about a
# third of the scans' work at token keep 0.7. Outputs and gradients are the same either way; the test that
# checks this turns it off.
SCAN_KEPT_ONLY = True
# With them, the mixers' fp32 Linear layers on the GPU kernel compute only those rows too (and the conv's reach
# past them): mamba_ssm.ops.linear_fp32.LiveRows. The same outputs and gradients; the test turns it off.
LINEAR_KEPT_ONLY = True


@dataclass(frozen=True)
class DyVMConfig:
    # cumulative fractions of the original patches, per stage: r, r^2, r^3
    token_keep_ratios: tuple = tuple(DEFAULT_TOKEN_KEEP_RATIO ** s for s in (1, 2, 3))
    pruning_loc: tuple = DEFAULT_PRUNING_LOC  # a stage prunes before these layers
    pruning: str = "learned"  # "learned" | "random" | "static" | "none" (block selection only)
    block_selection: bool = True  # False: token pruning only
    predictor_input: str = "residual"  # "residual" | "ssm_B" | "ssm_delta" (previous layer's SSM B / raw delta)
    gumbel_noise: bool = True  # False: deterministic training decisions (argmax / sigmoid > 0.5)
    block_keep_ratio: float = DEFAULT_BLOCK_KEEP_RATIO  # target of the block-ratio loss (mean of the gates)

    @property
    def num_stages(self) -> int:
        return 0 if self.pruning == "none" else len(self.pruning_loc)

    def check(self, cfg: VimConfig) -> None:
        """Raise a one-line ValueError naming the first inconsistent option."""
        if self.pruning not in PRUNING_MODES:
            raise ValueError(f"pruning must be one of {PRUNING_MODES}, got {self.pruning!r}")
        if self.predictor_input not in PREDICTOR_INPUTS:
            raise ValueError(f"predictor_input must be one of {PREDICTOR_INPUTS}, got {self.predictor_input!r}")
        if self.predictor_input != "residual" and self.pruning != "learned":
            raise ValueError(f"predictor_input={self.predictor_input!r} needs pruning='learned'")
        if not 0.0 <= self.block_keep_ratio <= 1.0:
            raise ValueError(f"block_keep_ratio must be in [0, 1], got {self.block_keep_ratio}")
        if self.pruning == "none":
            return
        locs, ratios = tuple(self.pruning_loc), tuple(self.token_keep_ratios)
        if len(locs) != len(ratios):
            raise ValueError(f"pruning_loc {locs} and token_keep_ratios {ratios} must have the same length")
        if not locs or list(locs) != sorted(set(locs)) or locs[0] < 1 or locs[-1] >= cfg.depth:
            raise ValueError(f"pruning_loc {locs} must be strictly increasing layer indices in [1, {cfg.depth - 1}]")
        counts = [keep_count(r, cfg.num_patches) for r in ratios]
        if any(not 0 < r <= 1 for r in ratios) or counts[0] < 1 or counts != sorted(counts, reverse=True):
            raise ValueError(f"token_keep_ratios {ratios} must be non-increasing in (0, 1] and keep at least "
                             f"one of the {cfg.num_patches} patches")


def make_dyvm_config(*, token_keep_ratio: Optional[float] = None, token_keep_ratios: Optional[Sequence] = None,
                     pruning_loc: Sequence[int] = DyVMConfig.pruning_loc, **options) -> DyVMConfig:
    """DyVMConfig from create_model style options: token_keep_ratio r gives (r, r^2, ...) per location."""
    if token_keep_ratio is not None and token_keep_ratios is not None:
        raise ValueError("give token_keep_ratio (r -> r, r^2, r^3) or token_keep_ratios, not both")
    if token_keep_ratios is None:
        r = DEFAULT_TOKEN_KEEP_RATIO if token_keep_ratio is None else token_keep_ratio
        token_keep_ratios = tuple(r ** (s + 1) for s in range(len(pruning_loc)))
    known = {f.name for f in fields(DyVMConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise TypeError(f"unknown DyVM option(s) {unknown}; known: {sorted(known | {'token_keep_ratio'})}")
    return DyVMConfig(token_keep_ratios=tuple(float(r) for r in token_keep_ratios),
                      pruning_loc=tuple(int(i) for i in pruning_loc), **options)


class _Tokens(NamedTuple):
    """Where the tokens are: class positions, keep policy (B, N), slot -> patch map (B, N), scan mask (B, N+n),
    and in training each image's number of kept tokens with its class tokens (B,) int32, the scans' lengths, and
    the rows of them the mixers' fp32 Linear layers compute (LINEAR_KEPT_ONLY)."""
    cls_positions: ClsPositions
    policy: Tensor
    slot_to_patch: Tensor
    mask: Optional[Tensor]
    scan_lengths: Optional[Tensor] = None
    live_rows: Optional[LiveRows] = None


class DyVM(Vim):
    """Vim + token-score predictors (`score_predictors`) + per-layer gate heads (`layers.i.mixer.block_head`)."""

    def __init__(self, cfg: VimConfig, dyvm_cfg: DyVMConfig = DyVMConfig()):
        dyvm_cfg.check(cfg)
        super().__init__(cfg, mixer_cls=partial(DynamicMamba, block_selection=dyvm_cfg.block_selection))
        self.dyvm_cfg = dyvm_cfg
        self.selection = make_selection(dyvm_cfg.pruning, dyvm_cfg.gumbel_noise) if dyvm_cfg.num_stages else None
        self.score_predictors = None
        if self.selection is not None and self.selection.needs_predictor:
            width = {"residual": cfg.embed_dim, "ssm_B": cfg.d_state, "ssm_delta": cfg.d_inner}
            self.score_predictors = nn.ModuleList(
                TokenScorePredictor(width[dyvm_cfg.predictor_input]) for _ in range(dyvm_cfg.num_stages))
        for layer in self.layers:  # Vim's init zeroed every Linear bias; gates start open
            if layer.mixer.block_head is not None:
                reset_gate_head(layer.mixer.block_head)

    @property
    def stage_at(self) -> dict:
        """{layer index: pruning stage} for the layers that a stage prunes before."""
        return {loc: s for s, loc in enumerate(self.dyvm_cfg.pruning_loc[:self.dyvm_cfg.num_stages])}

    def keep_counts(self) -> list:
        """Patch tokens kept after each stage at inference: int(ratio * num_patches)."""
        return [keep_count(r, self.cfg.num_patches) for r in self.dyvm_cfg.token_keep_ratios[:self.dyvm_cfg.num_stages]]

    def _decide_gate(self, logits: Tensor, out: Optional[Tensor] = None) -> Tensor:
        """Gate logits (B, 2) -> 0/1 gates. At inference into `out` when given (a row of the forward's gate
        tensor, in the logits' dtype): one op (two on a CPU, which casts the comparison's output in a second
        one), no allocation, and no stack of the gates at the end."""
        if self.training:
            return gumbel_sigmoid_gate(logits, noise=self.dyvm_cfg.gumbel_noise, tau=GATE_TAU)
        # sigmoid(l) > 0.5 exactly when l > 0 (the sigmoid would round to 0.5 for |l| < 3e-8), one op less
        if out is not None:
            return torch.gt(logits, 0, out=out)
        return (logits > 0).to(logits.dtype)

    def _prune(self, stage: int, hidden: Tensor, residual: Tensor, tokens: _Tokens, feature: Optional[Tensor]):
        """One pruning stage -> (hidden, residual, tokens, decision (B, M) over the original patches)."""
        M = self.cfg.num_patches
        k = keep_count(self.dyvm_cfg.token_keep_ratios[stage], M)
        log_probs = None
        if self.score_predictors is not None:
            predictor = self.score_predictors[stage]
            if feature is None:  # the residual stream's tokens: hidden + residual
                log_probs = predictor.score_stream(hidden, residual, tokens.cls_positions, tokens.policy)
            else:
                features = split_cls(feature, tokens.cls_positions)[1]
                log_probs = predictor(features, tokens.policy.unsqueeze(-1).to(features.dtype))
        if not self.training:  # the sequence shrinks to the k best tokens, still in original order
            cls_positions = self.layout.positions(k)
            streams = (hidden, residual, tokens.cls_positions, cls_positions)
            index, policy, decision = self.selection.eval_select(log_probs, tokens.policy, tokens.slot_to_patch, k, M,
                                                                 streams)
            hidden, residual, slot_to_patch = gather_stage(hidden, residual, tokens.slot_to_patch, index,
                                                           tokens.cls_positions, cls_positions)
            return (hidden, residual, _Tokens(cls_positions, policy, slot_to_patch, None),
                    indices_to_mask(slot_to_patch, M) if decision is None else decision)
        # training: full length, kept tokens first (original order), pruned ones masked out of the scans
        keep = self.selection.train_keep(log_probs, tokens.policy, k)
        decision = to_original_order(keep, tokens.slot_to_patch, M)
        order = kept_first_order(keep)
        policy = keep.gather(1, order)
        kept = (policy > 0.5).sum(1)
        cls_positions = self.layout.positions(kept)  # per image, from its own kept count
        # one permutation of the sequence for both streams (its backward gathers by the inverse permutation)
        source = gather_index(order, tokens.cls_positions, cls_positions, num_slots=order.shape[1])
        streams = [permute_tokens(x, source) for x in (hidden, residual)]
        slot_to_patch = tokens.slot_to_patch.gather(1, order)
        cls_ones = policy.new_ones(policy.shape[0], self.layout.num_tokens, 1)
        mask = insert_cls(policy.unsqueeze(-1), cls_ones, cls_positions).squeeze(-1)
        lengths = (kept + self.layout.num_tokens).to(torch.int32) if SCAN_KEPT_ONLY else None
        live_rows = LiveRows(lengths) if lengths is not None and LINEAR_KEPT_ONLY else None
        return streams[0], streams[1], _Tokens(cls_positions, policy, slot_to_patch, mask, lengths, live_rows), decision

    def forward_aux(self, x: Tensor) -> ForwardOutput:
        """Images (B, C, H, W) -> ForwardOutput (see its docstring)."""
        M = self.cfg.num_patches
        hidden, residual = self.embed(x), None
        batch = hidden.shape[0]
        tokens = _Tokens(self.cls_positions, hidden.new_ones(batch, M, dtype=torch.float32),
                         torch.arange(M, device=x.device).expand(batch, M), None)
        stage_at = self.stage_at
        ssm_input = self.dyvm_cfg.predictor_input if self.dyvm_cfg.predictor_input != "residual" else None
        decisions, gates, seq_lens, feature = [], [], [], None
        # inference without autograd: the gates' (depth, B, 2) tensor, written a layer at a time (with autograd,
        # a row saved for the backward of one layer's scan would change version when the next row is written)
        gate_rows, row_views, rows_wanted = None, (), not self.training and not torch.is_grad_enabled()
        layer_weights = self.layer_inference_weights(hidden)  # all None unless eager inference
        for i, layer in enumerate(self.layers):
            if i in stage_at:
                hidden, residual, tokens, decision = self._prune(stage_at[i], hidden, residual, tokens, feature)
                decisions.append(decision)
            normed, residual = layer.add_norm(hidden, residual)
            mixer = layer.mixer
            weights = layer_weights[i]
            xz = mixer.in_proj_xz(normed, weights, tokens.live_rows)
            gate, gate_head = None, None
            if mixer.block_head is not None:
                if rows_wanted and gate_rows is None:  # in the logits' dtype (autocast's, else xz's)
                    device = xz.device.type
                    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xz.dtype
                    gate_rows = xz.new_empty((len(self.layers), batch, 2), dtype=dtype)
                    row_views = gate_rows.unbind(0)  # (one op for every layer's row, not an index op per layer)
                row = None if gate_rows is None else row_views[len(gates)]
                if row is not None and row.dtype == xz.dtype:  # the gates by the kernels, written into the row
                    gate_head = mixer.gate_head_for(xz, tokens.cls_positions, weights)
                    gate = None if gate_head is None else row
                if gate is None:
                    logits, xz = mixer.gate_logits(xz, tokens.cls_positions, weights)
                    gate = self._decide_gate(logits, row)
                gates.append(gate)
            if ssm_input is not None and i + 1 in stage_at:  # the next stage's predictor reads this layer's SSM
                feature = mixer.ssm_feature(xz, ssm_input, tokens.mask)
            hidden = mixer.mix(xz, gate=gate, mask=tokens.mask, weights=weights, lengths=tokens.scan_lengths,
                               gate_head=gate_head, live_rows=tokens.live_rows)
            seq_lens.append(hidden.shape[1])
        cls, patches = split_cls(self.final_norm(hidden, residual), tokens.cls_positions)
        policy = tokens.policy.detach().unsqueeze(-1)
        gates = gate_rows[:len(gates)] if gate_rows is not None else torch.stack(gates) if gates else None
        return ForwardOutput(logits=self.classify(cls), patch_tokens=patches, final_policy=policy,
                             slot_to_patch=tokens.slot_to_patch, decisions=decisions, gates=gates, seq_lens=seq_lens)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_aux(x).logits

    def forward_with_tokens(self, x: Tensor):
        out = self.forward_aux(x)
        return out.logits, out.patch_tokens

    def forward_features(self, x: Tensor):
        raise NotImplementedError("a DyVM's sequence changes per image: use forward_aux(x), which returns the "
                                  "logits and the final patch tokens with their positions")


def create_dyvm(base: VimConfig, **kwargs) -> DyVM:
    """timm entry: kwargs are VimConfig fields plus the DyVMConfig options (and token_keep_ratio)."""
    dyvm_names = {f.name for f in fields(DyVMConfig)} | {"token_keep_ratio"}
    dyvm_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in dyvm_names}
    return DyVM(build_config(base, kwargs), make_dyvm_config(**dyvm_kwargs))
