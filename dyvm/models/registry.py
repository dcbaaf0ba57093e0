"""timm registration of the model names, and the authors' CLI names (Vim-Tiny, ...) mapped onto them."""
from timm.models import register_model

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


# The authors' --model names; main.py and dyvm.flops accept either form.
CLI_NAMES = {"Vim-Tiny": "tiny", "Vim-Small": "small", "Vim-Base": "base"}


def resolve_model_name(name: str, dynamic: bool) -> str:
    """'Vim-Small' or 'vim_small' or 'dyvm_vim_small' -> the timm name of the dense or DyVM model."""
    if name in CLI_NAMES:
        size = CLI_NAMES[name]
    elif name.startswith("dyvm_vim_"):
        size = name[len("dyvm_vim_"):]
    elif name.startswith("vim_"):
        size = name[len("vim_"):]
    else:
        raise ValueError(f"unknown model {name!r}: use one of {sorted(CLI_NAMES)} or a timm name such as "
                         "vim_small / dyvm_vim_small")
    return f"dyvm_vim_{size}" if dynamic else f"vim_{size}"
