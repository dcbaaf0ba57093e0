"""FLOPs of Vim and DyVM (and of VideoMamba / MambaReg), counted from what the model actually ran (docs/flops.md has
the convention).

All counts are multiply-accumulates (MACs, no factor 2), analytical, per image. Two conventions:
  paper: the published one. The SSM part (conv, x_proj, dt_proj, scan) of only ONE scan direction per layer,
         scaled for DyVM by the fraction of that layer's directions that ran for the image. Dense Vim-T/S/B at
         224x224: 1.449 / 5.077 / 18.868 G (VideoMamba-T/S/M/B 1.449 / 5.077 / 14.481 / 18.868 G, MambaReg-S/B/L
         5.360 / 19.918 / 70.642 G).
  full:  every direction that actually ran, plus the gate heads: what the hardware did.
Per layer of sequence length L (class tokens / registers included), width D, d_inner Di, dt_rank R, d_state N,
conv width K:
  in_proj L*D*2Di, out_proj L*Di*D                                         (always run)
  per direction: conv (L+K-1)*Di*K, x_proj L*Di*(R+2N), dt_proj L*R*Di, scan 9*L*Di*N + 2*L*Di
Outside the layers: patch embedding conv, head (its input width * classes), MambaReg's neck (a Linear on each
register), token-score predictors (every Linear, times the tokens the predictor saw). Norms, activations, gathers
and the head bias are not counted.

CLI: python -m dyvm.flops --model vim_small | dyvm_vim_small | Vim-Small (both) [--block-keep-ratio 0.8]
     (also videomamba_* / mambareg_* / VideoMamba-Small / MambaReg-Base ...)
"""
import sys
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor


@dataclass(frozen=True)
class LayerMacs:
    shared: int  # in_proj + out_proj: run whatever the gates say
    per_direction: int  # conv + x_proj + dt_proj + scan of one direction


def layer_macs(L: int, embed_dim: int, d_inner: int, dt_rank: int, d_state: int, d_conv: int) -> LayerMacs:
    D, Di, R, N, K = embed_dim, d_inner, dt_rank, d_state, d_conv
    shared = L * D * 2 * Di + L * Di * D
    conv = (L + K - 1) * Di * K
    x_proj = L * Di * (R + 2 * N)
    dt_proj = L * R * Di
    scan = 9 * L * Di * N + 2 * L * Di  # mamba issue #110's count for the selective scan
    return LayerMacs(shared, conv + x_proj + dt_proj + scan)


def _linear_macs_per_token(module: nn.Module) -> int:
    return sum(m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def _mixer_dims(model: nn.Module):
    mixer = model.layers[0].mixer
    return dict(embed_dim=mixer.d_model, d_inner=mixer.d_inner, dt_rank=mixer.dt_rank, d_state=mixer.d_state,
                d_conv=mixer.d_conv)


def count_macs(model: nn.Module, seq_lens: Sequence[int], directions: Tensor,
               predictor_tokens: Sequence[int] = ()) -> tuple:
    """MACs per image -> (paper (B,), full (B,)) float64 tensors.

    seq_lens: per layer, the length it processed (class tokens included); directions: (depth, B) how many of
    the two scans ran in each layer for each image (2 everywhere for a dense Vim); predictor_tokens: per
    pruning stage, how many patch tokens its predictor scored.
    """
    cfg = model.cfg
    dims = _mixer_dims(model)
    directions = directions.double()
    outside = cfg.num_patches * cfg.embed_dim * cfg.in_chans * cfg.patch_size ** 2
    if isinstance(model.head, nn.Linear):
        outside += model.head.in_features * model.head.out_features
    neck = getattr(model, "neck", None)
    if neck is not None:  # MambaReg: one Linear per register
        outside += cfg.num_cls_tokens * neck.in_features * neck.out_features
    predictors = getattr(model, "score_predictors", None)
    if predictors is not None:
        outside += sum(n * _linear_macs_per_token(p) for n, p in zip(predictor_tokens, predictors))
    paper = torch.full((directions.shape[1],), float(outside), dtype=torch.float64, device=directions.device)
    full = paper.clone()
    for i, L in enumerate(seq_lens):
        m = layer_macs(int(L), **dims)
        paper += m.shared + m.per_direction * directions[i] / 2
        full += m.shared + m.per_direction * directions[i]
        head = getattr(model.layers[i].mixer, "block_head", None)
        if head is not None:
            full += head.in_features * head.out_features
    return paper, full


def macs_from_output(model: nn.Module, out) -> tuple:
    """MACs per image of what an eval-mode forward (a ForwardOutput) actually ran -> (paper (B,), full (B,))."""
    batch = out.logits.shape[0]
    depth = len(out.seq_lens)
    if out.gates is None:
        directions = torch.full((depth, batch), 2.0, device=out.logits.device)
    else:
        directions = (out.gates.detach() > 0.5).sum(-1).to(torch.float64)  # (depth, B)
    predictor_tokens = []
    dyvm_cfg = getattr(model, "dyvm_cfg", None)
    if dyvm_cfg is not None and getattr(model, "score_predictors", None) is not None:
        # the predictor before layer p scores the patch tokens of the sequence layer p-1 processed
        n = model.cfg.num_cls_tokens
        predictor_tokens = [out.seq_lens[p - 1] - n for p in dyvm_cfg.pruning_loc[:len(model.score_predictors)]]
    return count_macs(model, out.seq_lens, directions, predictor_tokens)


def nominal_macs(model: nn.Module, block_keep_ratio: Optional[float] = None) -> tuple:
    """MACs per image (paper, full) at the nominal keep counts int(r_s * M), with every layer running
    2 * block_keep_ratio directions (all directions when None). For tables and the CLI; training runs report
    the realised count from macs_from_output."""
    cfg = model.cfg
    dyvm_cfg = getattr(model, "dyvm_cfg", None)
    n = cfg.num_cls_tokens
    lens = [cfg.num_patches + n] * cfg.depth
    predictor_tokens = []
    if dyvm_cfg is not None and dyvm_cfg.num_stages:
        counts = model.keep_counts()
        tokens = cfg.num_patches
        for loc, k in zip(dyvm_cfg.pruning_loc, counts):
            predictor_tokens.append(tokens)
            tokens = k
            for i in range(loc, cfg.depth):
                lens[i] = k + n
    ratio = 1.0 if block_keep_ratio is None else block_keep_ratio
    directions = torch.full((cfg.depth, 1), 2.0 * ratio, dtype=torch.float64)
    paper, full = count_macs(model, lens, directions, predictor_tokens)
    return float(paper[0]), float(full[0])


def format_macs(paper: float, full: float) -> str:
    return f"{paper / 1e9:.3f} G (paper convention: one scan direction) | {full / 1e9:.3f} G (full: both directions)"


def _print_model(name: str, args) -> None:
    from dyvm.models.registry import create_model, resolve

    dynamic = resolve(name).dynamic
    with torch.device("meta"):  # shapes only: no memory, no init cost
        model = create_model(name, img_size=args.img_size, token_keep_ratio=args.token_keep_ratio)
    paper, full = nominal_macs(model, args.block_keep_ratio if dynamic else None)
    params = sum(p.numel() for p in model.parameters())
    detail = ""
    if dynamic:
        ratio = "all" if args.block_keep_ratio is None else f"{args.block_keep_ratio:g} of the"
        detail = f", tokens kept {model.keep_counts()} of {model.cfg.num_patches}, {ratio} scan directions run"
    print(f"{name} at {args.img_size}x{args.img_size}{detail}: {params:,} parameters")
    print(f"  MACs per image: {format_macs(paper, full)}")


def main(argv=None) -> int:
    from dyvm.cli import ArgumentParser, flag_name
    from dyvm.models.registry import (DEFAULT_TOKEN_KEEP_RATIO, ModelOptionError, check_keep_ratios,
                                      describe_names, resolve)

    p = ArgumentParser("python -m dyvm.flops", description="MACs of one image for a Vim or DyVM model")
    p.add_argument("--model", required=True,
                   help=f"{describe_names()}; the authors' name (Vim-Small) prints the dense model and the DyVM")
    p.add_argument("--img-size", type=int, default=224, help="input resolution (square)")
    p.add_argument("--token-keep-ratio", type=float, default=DEFAULT_TOKEN_KEEP_RATIO,
                   help="DyVM: r in (0, 1]; the stages keep r, r^2, r^3 of the patches")
    p.add_argument("--block-keep-ratio", type=float, default=None,
                   help="DyVM: fraction in [0, 1] of the scan directions run in every layer (default: all)")
    args = p.parse_args(argv)
    try:
        spec = resolve(args.model)
        check_keep_ratios(args.token_keep_ratio, None, args.block_keep_ratio,
                          spell=flag_name)
        # the authors' name covers the dense teacher and the DyVM student
        for name in [spec.dense_name, spec.dyvm_name] if spec.cli else [spec.timm_name]:
            _print_model(name, args)
    except ModelOptionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
