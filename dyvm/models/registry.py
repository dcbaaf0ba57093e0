"""timm registration of the Vim model names, and the authors' CLI names (Vim-Tiny, VideoMamba-Small, ...) mapped
onto timm names. VideoMamba and MambaReg register themselves in dyvm.models.backbones."""
from timm.models import is_model, register_model

from dyvm.models import backbones  # also registers videomamba_* / mambareg_* and their DyVM students
from dyvm.models.dyvm import create_dyvm
from dyvm.models.vim import VIM_BASE, VIM_SMALL, VIM_TINY, create_vim


@register_model
def vim_tiny(**kwargs):
    """Vim-Tiny: D=192, depth 24, 7,148,008 parameters."""
    return create_vim(VIM_TINY, **kwargs)


@register_model
def vim_small(**kwargs):
    """Vim-Small: D=384, depth 24, 25,796,584 parameters."""
    return create_vim(VIM_SMALL, **kwargs)


@register_model
def vim_base(**kwargs):
    """Vim-Base: D=768, depth 24, 97,598,440 parameters."""
    return create_vim(VIM_BASE, **kwargs)


@register_model
def dyvm_vim_tiny(**kwargs):
    """DyVM on Vim-Tiny: + 3 token-score predictors + 24 gate heads, 7,367,086 parameters."""
    return create_dyvm(VIM_TINY, **kwargs)


@register_model
def dyvm_vim_small(**kwargs):
    """DyVM on Vim-Small: 26,594,110 parameters."""
    return create_dyvm(VIM_SMALL, **kwargs)


@register_model
def dyvm_vim_base(**kwargs):
    """DyVM on Vim-Base: 100,631,134 parameters."""
    return create_dyvm(VIM_BASE, **kwargs)


# ---- backbone families and the authors' --model names (issue 12: VideoMamba and MambaReg) ----------------------
# The authors' --model names -> the dense timm name; the DyVM student of a family is "dyvm_" + the dense name.
# main.py and dyvm.flops accept either form.
CLI_NAMES = {"Vim-Tiny": "vim_tiny", "Vim-Small": "vim_small", "Vim-Base": "vim_base", **backbones.CLI_NAMES}
FAMILIES = ("vim",) + backbones.FAMILIES


def resolve_model_name(name: str, dynamic: bool) -> str:
    """'Vim-Small' or 'vim_small' or 'dyvm_vim_small' (or the VideoMamba / MambaReg equivalents) -> the timm
    name of the dense or DyVM model."""
    dense = CLI_NAMES.get(name, name[len("dyvm_"):] if name.startswith("dyvm_") else name)
    resolved = f"dyvm_{dense}" if dynamic else dense
    if not any(dense.startswith(f + "_") for f in FAMILIES) or not is_model(resolved):
        raise ValueError(f"unknown model {name!r}: use one of {sorted(CLI_NAMES)} or a timm name such as "
                         "vim_small / dyvm_vim_small / videomamba_small / mambareg_small")
    return resolved
