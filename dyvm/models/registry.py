"""The model factory: every model name, its defaults, and "is this a DyVM name", in one table.

A backbone family is one row of FAMILIES: its CLI prefix (the authors' names, "Vim-Small"), its timm prefix
("vim_small" dense, "dyvm_vim_small" DyVM), its sizes (size -> base config) and the functions that build a
dense model and a DyVM from a base config and keyword overrides. Every name of every row is registered with
timm on import, and every entry point (main.py, python -m dyvm.flops / dyvm.benchmark, the teacher and the
dense timing twin) builds models through `create_model` here. A new backbone is a new row: VideoMamba
and MambaReg are rows of the Vim classes with other options (dyvm/models/backbones.py), which gives
VideoMamba-Tiny (DyVM), dyvm_videomamba_tiny and videomamba_tiny, and main.py, dyvm.flops and dyvm.benchmark
accept them with no other change.

Name rules (`resolve`):
  Vim-Small        the authors' name: the DyVM student (its dense teacher is vim_small); likewise
                   VideoMamba-Small, MambaReg-Base, ...
  dyvm_vim_small   the DyVM student
  vim_small        the plain dense model
Defaults (the authors' main.py): token keep ratio 0.7 (stages keep r, r^2, r^3 of the patches), block keep
ratio 0.7 (the target mean of the gates), pruning before layers 6, 12, 18 (the same quarters of the depth
when a model is made shallower than 24 layers, as the demo is).
Ratio rule, for every entry point (check_keep_ratios): a token keep ratio is in (0, 1] (a stage keeps at least
one token), a block keep ratio in [0, 1] (0: the loss drives every scan direction off).
"""
import difflib
from dataclasses import dataclass, field, fields
from typing import Callable, Dict, Mapping, Optional, Sequence

import torch.nn as nn
from timm.models import register_model

from dyvm.models.backbones import (MAMBAREG_BASE, MAMBAREG_LARGE, MAMBAREG_SMALL, MAMBAREG_TINY, VIDEOMAMBA_BASE,
                                   VIDEOMAMBA_MIDDLE, VIDEOMAMBA_SMALL, VIDEOMAMBA_TINY)
from dyvm.models.dyvm import (DEFAULT_BLOCK_KEEP_RATIO, DEFAULT_PRUNING_LOC, DEFAULT_TOKEN_KEEP_RATIO, DyVM,
                              DyVMConfig, create_dyvm)
from dyvm.models.vim import VIM_BASE, VIM_SMALL, VIM_TINY, Vim, create_vim

__all__ = ["DEFAULT_TOKEN_KEEP_RATIO", "DEFAULT_BLOCK_KEEP_RATIO", "DYVM_OPTIONS", "FAMILIES", "BackboneFamily",
           "ModelName", "ModelOptionError", "UnknownModelError", "check_keep_ratios", "create_model",
           "default_pruning_loc", "dense_twin", "describe_names", "model_names", "resolve"]

# The options a DyVM takes on top of its backbone's (DyVMConfig's fields, and r for r, r^2, r^3).
DYVM_OPTIONS = frozenset({f.name for f in fields(DyVMConfig)} | {"token_keep_ratio"})
DYVM_PREFIX = "dyvm_"


class ModelOptionError(ValueError):
    """Model options that do not make a model (unknown name, inconsistent pruning settings, ...)."""


class UnknownModelError(ModelOptionError):
    """A model name that no family knows; the message lists the names and the closest one."""


@dataclass(frozen=True)
class BackboneFamily:
    """One backbone, all its sizes, dense and DyVM. create_dense / create_dyvm: (base config, **overrides) ->
    model, the timm entry functions; dense_cls(cfg) builds the dense twin of a DyVM of this family (teacher,
    timing baseline) from the student's own config; dyvm_cls tells which DyVMs belong to the family."""
    name: str  # "Vim"
    cli_prefix: str  # "Vim-": CLI names are cli_prefix + Size ("Vim-Small")
    timm_prefix: str  # "vim_": timm names vim_small (dense) and dyvm_vim_small (DyVM)
    sizes: Mapping[str, object]  # size -> base config
    create_dense: Callable[..., nn.Module]
    create_dyvm: Callable[..., nn.Module]
    dense_cls: type
    dyvm_cls: type
    descriptions: Mapping[str, str] = field(default_factory=dict)  # timm name -> docstring (parameter counts)

    def cli_name(self, size: str) -> str:
        return self.cli_prefix + size.capitalize()


FAMILIES = (
    BackboneFamily("Vim", "Vim-", "vim_", {"tiny": VIM_TINY, "small": VIM_SMALL, "base": VIM_BASE},
                   create_vim, create_dyvm, Vim, DyVM, descriptions={
                       "vim_tiny": "Vim-Tiny: D=192, depth 24, 7,148,008 parameters.",
                       "vim_small": "Vim-Small: D=384, depth 24, 25,796,584 parameters.",
                       "vim_base": "Vim-Base: D=768, depth 24, 97,598,440 parameters.",
                       "dyvm_vim_tiny": "DyVM on Vim-Tiny: + 3 token-score predictors + 24 gate heads, "
                                        "7,367,086 parameters.",
                       "dyvm_vim_small": "DyVM on Vim-Small: 26,594,110 parameters.",
                       "dyvm_vim_base": "DyVM on Vim-Base: 100,631,134 parameters."}),
    # Both other families are Vim with other options (dyvm/models/backbones.py): one code path for all three.
    BackboneFamily("VideoMamba", "VideoMamba-", "videomamba_",
                   {"tiny": VIDEOMAMBA_TINY, "small": VIDEOMAMBA_SMALL, "middle": VIDEOMAMBA_MIDDLE,
                    "base": VIDEOMAMBA_BASE},
                   create_vim, create_dyvm, Vim, DyVM, descriptions={
                       "videomamba_tiny": "VideoMamba-Tiny: D=192, depth 24, class token first, directions summed; "
                                          "7,148,008 parameters.",
                       "videomamba_small": "VideoMamba-Small: D=384, depth 24; 25,796,584 parameters.",
                       "videomamba_middle": "VideoMamba-Middle: D=576, depth 32; 74,217,448 parameters.",
                       "videomamba_base": "VideoMamba-Base: D=768, depth 24; 97,598,440 parameters.",
                       "dyvm_videomamba_tiny": "DyVM on VideoMamba-Tiny: 7,367,086 parameters.",
                       "dyvm_videomamba_small": "DyVM on VideoMamba-Small: 26,594,110 parameters.",
                       "dyvm_videomamba_middle": "DyVM on VideoMamba-Middle (pruning before layers 6, 12, 18 of 32, "
                                                 "as the authors): 75,989,726 parameters.",
                       "dyvm_videomamba_base": "DyVM on VideoMamba-Base: 100,631,134 parameters."}),
    BackboneFamily("MambaReg", "MambaReg-", "mambareg_",
                   {"tiny": MAMBAREG_TINY, "small": MAMBAREG_SMALL, "base": MAMBAREG_BASE, "large": MAMBAREG_LARGE},
                   create_vim, create_dyvm, Vim, DyVM, descriptions={
                       "mambareg_tiny": "MambaReg-Tiny: D=192, depth 24, 12 registers, no neck; 9,264,232 parameters.",
                       "mambareg_small": "MambaReg-Small: D=384, depth 24, 12 registers, neck 384 -> 192; "
                                         "27,801,064 parameters.",
                       "mambareg_base": "MambaReg-Base: D=768, depth 24, 12 registers, neck 768 -> 192; "
                                        "99,301,096 parameters.",
                       "mambareg_large": "MambaReg-Large: D=1024, depth 48, 16 registers, neck 1024 -> 128; "
                                         "341,222,376 parameters.",
                       "dyvm_mambareg_tiny": "DyVM on MambaReg-Tiny: 9,483,310 parameters.",
                       "dyvm_mambareg_small": "DyVM on MambaReg-Small: 28,598,590 parameters.",
                       "dyvm_mambareg_base": "DyVM on MambaReg-Base: 102,333,790 parameters.",
                       "dyvm_mambareg_large": "DyVM on MambaReg-Large (pruning before layers 6, 12, 18 of 48, as "
                                              "the authors): 346,740,558 parameters."}),
)


@dataclass(frozen=True)
class ModelName:
    """A resolved model name: family, size, and whether it names the DyVM student."""
    family: BackboneFamily
    size: str
    dynamic: bool
    cli: bool = False  # given as the authors' name (Vim-Small), which stands for student and teacher

    @property
    def dense_name(self) -> str:
        return self.family.timm_prefix + self.size

    @property
    def dyvm_name(self) -> str:
        return DYVM_PREFIX + self.dense_name

    @property
    def timm_name(self) -> str:
        return self.dyvm_name if self.dynamic else self.dense_name


def _table() -> Dict[str, ModelName]:
    names = {}
    for fam in FAMILIES:
        for size in fam.sizes:
            names[fam.cli_name(size)] = ModelName(fam, size, dynamic=True, cli=True)
            names[DYVM_PREFIX + fam.timm_prefix + size] = ModelName(fam, size, dynamic=True)
            names[fam.timm_prefix + size] = ModelName(fam, size, dynamic=False)
    return names


def model_names() -> list:
    """Every accepted name: CLI names first, then the timm names."""
    return sorted(_table(), key=lambda n: (n[0].islower(), n))


def describe_names() -> str:
    """The accepted names in one short line (every family's follow Vim's pattern)."""
    sizes = "; ".join(f"{fam.name} {'/'.join(fam.sizes)}" for fam in FAMILIES)
    return f"Vim-Small (DyVM), dyvm_vim_small, vim_small (dense), likewise for {sizes}"


def resolve(name: str) -> ModelName:
    """'Vim-Small' / 'dyvm_vim_small' / 'vim_small' -> ModelName; UnknownModelError (one line) otherwise."""
    table = _table()
    if name in table:
        return table[name]
    close = difflib.get_close_matches(name, list(table), n=1, cutoff=0.6)
    if close:
        raise UnknownModelError(f"unknown model {name!r}; did you mean {close[0]!r}?")
    raise UnknownModelError(f"unknown model {name!r} (names: {describe_names()})")


def default_pruning_loc(depth: int) -> tuple:
    """The authors' layers 6, 12, 18 for a full-depth model (also the 32-layer VideoMamba-M and the 48-layer
    MambaReg-L, as the authors' main.py hard-codes); the same quarters of a shallower one."""
    if depth >= 24:
        return DEFAULT_PRUNING_LOC
    return tuple(max(1, round(depth * s / 4)) for s in (1, 2, 3))


def check_keep_ratios(token_keep_ratio: Optional[float] = None, token_keep_ratios: Optional[Sequence] = None,
                      block_keep_ratio: Optional[float] = None,
                      spell: Callable[[str], str] = lambda name: name) -> None:
    """The one rule for keep ratios, for every entry point; raises ModelOptionError naming the option as
    `spell` writes it (flags: spell = lambda n: '--' + n.replace('_', '-'))."""
    if token_keep_ratio is not None and not 0 < token_keep_ratio <= 1:
        raise ModelOptionError(f"{spell('token_keep_ratio')} must be in (0, 1], got {token_keep_ratio}")
    if token_keep_ratios is not None:
        r = list(token_keep_ratios)
        if not r or not all(0 < v <= 1 for v in r) or r != sorted(r, reverse=True):
            raise ModelOptionError(f"{spell('token_keep_ratios')} must be non-increasing values in (0, 1], got {r}")
    if block_keep_ratio is not None and not 0 <= block_keep_ratio <= 1:
        raise ModelOptionError(f"{spell('block_keep_ratio')} must be in [0, 1], got {block_keep_ratio}")


def _with_defaults(base, dynamic: bool, kwargs: dict) -> dict:
    if dynamic and kwargs.get("pruning_loc") is None:
        kwargs["pruning_loc"] = default_pruning_loc(kwargs.get("depth") or base.depth)
    return kwargs


def _entry(fam: BackboneFamily, size: str, dynamic: bool) -> Callable[..., nn.Module]:
    """The timm entry function of one name (timm registers a function under its __name__)."""
    base = fam.sizes[size]
    make = fam.create_dyvm if dynamic else fam.create_dense

    def entry(**kwargs):
        return make(base, **_with_defaults(base, dynamic, kwargs))

    entry.__name__ = entry.__qualname__ = (DYVM_PREFIX if dynamic else "") + fam.timm_prefix + size
    entry.__module__ = __name__
    entry.__doc__ = fam.descriptions.get(entry.__name__, f"{'DyVM on ' if dynamic else ''}{fam.cli_name(size)}.")
    return entry


for _fam in FAMILIES:
    for _size in _fam.sizes:
        for _dynamic in (False, True):
            _fn = _entry(_fam, _size, _dynamic)
            globals()[_fn.__name__] = register_model(_fn)


def create_model(name: str, *, dynamic: Optional[bool] = None, **kwargs) -> nn.Module:
    """The one factory: a model from any accepted name and options.

    kwargs: the backbone's config fields (img_size, num_classes, depth, drop_path_rate, ...) and, for a DyVM,
    DYVM_OPTIONS (token_keep_ratio or token_keep_ratios, block_keep_ratio, pruning_loc, pruning, ...). Options
    left None take the defaults. A dense model ignores the DyVM options, so one set of options serves the
    student and its dense teacher. dynamic: override the name's kind (True: the DyVM, False: its dense twin).
    Bad names and options raise ModelOptionError with one line.
    """
    import timm

    spec = resolve(name)
    if dynamic is not None:
        spec = ModelName(spec.family, spec.size, dynamic)
    kwargs = {k: v for k, v in kwargs.items() if v is not None and (spec.dynamic or k not in DYVM_OPTIONS)}
    try:
        check_keep_ratios(kwargs.get("token_keep_ratio"), kwargs.get("token_keep_ratios"),
                          kwargs.get("block_keep_ratio"))
        return timm.create_model(spec.timm_name, **kwargs)
    except ModelOptionError:
        raise
    except (TypeError, ValueError) as e:
        raise ModelOptionError(f"cannot build {spec.timm_name}: {e}") from None


def family_of(model: nn.Module) -> BackboneFamily:
    """The family of a built model, from its configuration (all three families share the Vim / DyVM classes)."""
    name = getattr(getattr(model, "cfg", None), "family", None)
    for fam in FAMILIES:
        if fam.name == name and (isinstance(model, fam.dyvm_cls) or type(model) is fam.dense_cls):
            return fam
    raise ModelOptionError(f"{type(model).__name__} belongs to no registered backbone family")


def dense_twin(model: nn.Module) -> nn.Module:
    """A dense model of the same family and configuration as `model` (fresh weights): the teacher's shape
    and the timing / FLOPs baseline of a DyVM."""
    return family_of(model).dense_cls(model.cfg)
