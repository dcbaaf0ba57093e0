"""Models: the Vim backbone, DyVM, and the model factory (dyvm.models.registry: every name, registered with timm
on import, and create_model)."""
from dyvm.models import registry  # noqa: F401  (registers the timm names)
from dyvm.models.dyvm import DyVM, DyVMConfig
from dyvm.models.output import ForwardOutput
from dyvm.models.vim import VIM_BASE, VIM_SMALL, VIM_TINY, Block, Vim, VimConfig, count_parameters

__all__ = ["Vim", "VimConfig", "Block", "VIM_TINY", "VIM_SMALL", "VIM_BASE", "count_parameters", "DyVM",
           "DyVMConfig", "ForwardOutput"]
