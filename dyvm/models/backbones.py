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

timm names (registered by dyvm.models.registry, one row per family): videomamba_{tiny,small,middle,base},
mambareg_{tiny,small,base,large}, the DyVM students with the prefix dyvm_, and the authors' --model names
VideoMamba-Small, MambaReg-Base, ... (the students).
"""
from dyvm.models.vim import VimConfig

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
