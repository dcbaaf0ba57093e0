"""MACs of a segmentation model for one input of its crop size, in the two conventions of dyvm.flops.

Backbone: dyvm.flops.count_macs on what the backbone ran (per-layer sequence lengths, no class token; the
directions each layer's gates ran; the tokens each predictor scored): 'paper' counts the SSM part of one scan
direction per layer (the published convention), 'full' every direction that ran plus the gate heads.
Neck and decode head (UPerHead; the auxiliary head only runs in training): every Conv2d / ConvTranspose2d counted
once from a forward at the model's size (kernel area x input channels / groups per output element; a transposed
conv: per input element). Pooling, norms, activations and resizing are not counted, as in dyvm.flops.
"""
import torch
import torch.nn as nn

from dyvm.flops import count_macs
from dyvm.seg.backbone import SegBackboneOutput
from dyvm.seg.segmentor import Segmentor


def _conv_macs(module: nn.Module, inputs, output) -> int:
    if isinstance(module, nn.ConvTranspose2d):
        x = inputs[0]
        return x[0].numel() * module.out_channels * module.kernel_size[0] * module.kernel_size[1] // module.groups
    k = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
    return output[0].numel() * k


@torch.no_grad()
def decode_macs(model: Segmentor) -> int:
    """MACs per image of the neck and the decode head at the model's input size (independent of pruning)."""
    b = model.backbone
    g, d = b.cfg.grid_size, b.cfg.embed_dim
    total = [0]
    hooks = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + _conv_macs(mod, i, o)))
             for m in list(model.neck.modules()) + list(model.decode_head.modules())
             if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        model.decode([torch.zeros(1, d, g, g, device=device)] * len(b.out_indices), (b.cfg.img_size,) * 2)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return total[0]


def backbone_macs(backbone, out: SegBackboneOutput) -> tuple:
    """MACs per image of what an eval-mode backbone forward ran -> (paper (B,), full (B,)) float64 tensors."""
    batch = out.features[0].shape[0]
    depth = len(out.seq_lens)
    if out.gates is None:
        directions = torch.full((depth, batch), 2.0, dtype=torch.float64, device=out.features[0].device)
    else:
        directions = (out.gates.detach() > 0.5).sum(-1).to(torch.float64)
    predictor_tokens = []
    if backbone.score_predictors is not None:  # the predictor before layer p scores what layer p-1 processed
        predictor_tokens = [out.seq_lens[p - 1] for p in backbone.dyvm_cfg.pruning_loc[:backbone.dyvm_cfg.num_stages]]
    return count_macs(backbone, out.seq_lens, directions, predictor_tokens)


def nominal_backbone_macs(backbone, block_keep_ratio=None) -> tuple:
    """(paper, full) MACs per image at the nominal keep counts int(r_s * M), 2 * block_keep_ratio directions per
    layer (all when None)."""
    cfg, dyvm_cfg = backbone.cfg, backbone.dyvm_cfg
    lens, predictor_tokens = [cfg.num_patches] * cfg.depth, []
    tokens = cfg.num_patches
    for loc, k in zip(dyvm_cfg.pruning_loc[:dyvm_cfg.num_stages], backbone.keep_counts()):
        predictor_tokens.append(tokens)
        tokens = k
        lens[loc:] = [k] * (cfg.depth - loc)
    ratio = 1.0 if block_keep_ratio is None else block_keep_ratio
    directions = torch.full((cfg.depth, 1), 2.0 * ratio, dtype=torch.float64)
    paper, full = count_macs(backbone, lens, directions,
                             predictor_tokens if backbone.score_predictors is not None else [])
    return float(paper[0]), float(full[0])
