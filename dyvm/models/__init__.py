"""Models: the Vim backbone (and its VideoMamba / MambaReg presets), DyVM, and (registered on import) the timm names
vim_*, videomamba_*, mambareg_* and their DyVM students dyvm_*."""
from dyvm.models import registry  # noqa: F401  (registers the timm names)
from dyvm.models.dyvm import DyVM, DyVMConfig
from dyvm.models.output import ForwardOutput
from dyvm.models.vim import VIM_BASE, VIM_SMALL, VIM_TINY, Block, Vim, VimConfig, count_parameters

__all__ = ["Vim", "VimConfig", "Block", "VIM_TINY", "VIM_SMALL", "VIM_BASE", "count_parameters", "DyVM",
           "DyVMConfig", "ForwardOutput"]
