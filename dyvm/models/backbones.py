"""VideoMamba and MambaReg: the two other Mamba image backbones DyVM is applied to, as presets of the Vim class.

Both are Vim (dyvm.models.vim) with other options, so the same DyVM code prunes and gates them:
  VideoMamba (image models of OpenGVLab/VideoMamba): the class token first, where it stays after every pruning
      stage; the two scan directions summed without halving. Tiny / Small / Base have exactly Vim's parameters
      and state-dict shapes; Middle is D=576 with 32 layers.
  MambaReg (Mamba-R, wangf3014/Mamba-Reg): 12 registers (16 for Large) spread evenly among the patches and
      re-spread among the kept ones after every stage, each with its own position embedding (pos_embed_cls);
      the head reads all of them through a neck Linear(D, D / cls_reduce) and an RMSNorm. Tiny has no neck
      (cls_reduce 1): the registers are flattened into the head, as the official Mamba-R defines it.
Released files load unchanged with dyvm.checkpoint.load_checkpoint: videomamba_{t,s,m}16_in1k_res224.pth and
mambar_{small,base,large}_patch16_224.pth (weights under 'model').

timm names: videomamba_{tiny,small,middle,base}, mambareg_{tiny,small,base,large}, and the DyVM students with
the prefix dyvm_. The authors' --model names (VideoMamba-Small, MambaReg-Base, ...) are in CLI_NAMES.
"""
from timm.models import register_model

from dyvm.models.dyvm import create_dyvm
from dyvm.models.vim import VimConfig, create_vim

_VIDEOMAMBA = dict(cls_position="first", divide_out=False)
VIDEOMAMBA_TINY = VimConfig(embed_dim=192, **_VIDEOMAMBA)
VIDEOMAMBA_SMALL = VimConfig(embed_dim=384, **_VIDEOMAMBA)
VIDEOMAMBA_MIDDLE = VimConfig(embed_dim=576, depth=32, **_VIDEOMAMBA)
VIDEOMAMBA_BASE = VimConfig(embed_dim=768, **_VIDEOMAMBA)

_MAMBAREG = dict(cls_position="registers", cls_pos_embed=True, divide_out=True)
MAMBAREG_TINY = VimConfig(embed_dim=192, num_cls_tokens=12, cls_reduce=1, **_MAMBAREG)
MAMBAREG_SMALL = VimConfig(embed_dim=384, num_cls_tokens=12, cls_reduce=2, **_MAMBAREG)
MAMBAREG_BASE = VimConfig(embed_dim=768, num_cls_tokens=12, cls_reduce=4, **_MAMBAREG)
MAMBAREG_LARGE = VimConfig(embed_dim=1024, depth=48, num_cls_tokens=16, cls_reduce=8, **_MAMBAREG)

# The authors' --model names -> the dense timm name (their main.py builds the DyVM student of that size with the
# dense model as its teacher).
CLI_NAMES = {
    "VideoMamba-Tiny": "videomamba_tiny", "VideoMamba-Small": "videomamba_small",
    "VideoMamba-Middle": "videomamba_middle", "VideoMamba-Base": "videomamba_base",
    "MambaReg-Tiny": "mambareg_tiny", "MambaReg-Small": "mambareg_small", "MambaReg-Base": "mambareg_base",
    "MambaReg-Large": "mambareg_large",
}
FAMILIES = ("videomamba", "mambareg")


@register_model
def videomamba_tiny(**kwargs):
    """VideoMamba-Tiny: D=192, depth 24, class token first, directions summed; 7,148,008 parameters."""
    return create_vim(VIDEOMAMBA_TINY, **kwargs)


@register_model
def videomamba_small(**kwargs):
    """VideoMamba-Small: D=384, depth 24; 25,796,584 parameters."""
    return create_vim(VIDEOMAMBA_SMALL, **kwargs)


@register_model
def videomamba_middle(**kwargs):
    """VideoMamba-Middle: D=576, depth 32; 74,217,448 parameters."""
    return create_vim(VIDEOMAMBA_MIDDLE, **kwargs)


@register_model
def videomamba_base(**kwargs):
    """VideoMamba-Base: D=768, depth 24; 97,598,440 parameters."""
    return create_vim(VIDEOMAMBA_BASE, **kwargs)


@register_model
def mambareg_tiny(**kwargs):
    """MambaReg-Tiny: D=192, depth 24, 12 registers, no neck; 9,264,232 parameters."""
    return create_vim(MAMBAREG_TINY, **kwargs)


@register_model
def mambareg_small(**kwargs):
    """MambaReg-Small: D=384, depth 24, 12 registers, neck 384 -> 192; 27,801,064 parameters."""
    return create_vim(MAMBAREG_SMALL, **kwargs)


@register_model
def mambareg_base(**kwargs):
    """MambaReg-Base: D=768, depth 24, 12 registers, neck 768 -> 192; 99,301,096 parameters."""
    return create_vim(MAMBAREG_BASE, **kwargs)


@register_model
def mambareg_large(**kwargs):
    """MambaReg-Large: D=1024, depth 48, 16 registers, neck 1024 -> 128; 341,222,376 parameters."""
    return create_vim(MAMBAREG_LARGE, **kwargs)


@register_model
def dyvm_videomamba_tiny(**kwargs):
    """DyVM on VideoMamba-Tiny: + 3 token-score predictors + 24 gate heads; 7,367,086 parameters."""
    return create_dyvm(VIDEOMAMBA_TINY, **kwargs)


@register_model
def dyvm_videomamba_small(**kwargs):
    """DyVM on VideoMamba-Small: 26,594,110 parameters."""
    return create_dyvm(VIDEOMAMBA_SMALL, **kwargs)


@register_model
def dyvm_videomamba_middle(**kwargs):
    """DyVM on VideoMamba-Middle (pruning before layers 6, 12, 18 of 32, as the authors): 75,989,726 parameters."""
    return create_dyvm(VIDEOMAMBA_MIDDLE, **kwargs)


@register_model
def dyvm_videomamba_base(**kwargs):
    """DyVM on VideoMamba-Base: 100,631,134 parameters."""
    return create_dyvm(VIDEOMAMBA_BASE, **kwargs)


@register_model
def dyvm_mambareg_tiny(**kwargs):
    """DyVM on MambaReg-Tiny: 9,483,310 parameters."""
    return create_dyvm(MAMBAREG_TINY, **kwargs)


@register_model
def dyvm_mambareg_small(**kwargs):
    """DyVM on MambaReg-Small: 28,598,590 parameters."""
    return create_dyvm(MAMBAREG_SMALL, **kwargs)


@register_model
def dyvm_mambareg_base(**kwargs):
    """DyVM on MambaReg-Base: 102,333,790 parameters."""
    return create_dyvm(MAMBAREG_BASE, **kwargs)


@register_model
def dyvm_mambareg_large(**kwargs):
    """DyVM on MambaReg-Large (pruning before layers 6, 12, 18 of 48, as the authors): 346,740,558 parameters."""
    return create_dyvm(MAMBAREG_LARGE, **kwargs)
