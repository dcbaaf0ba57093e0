"""The model factory (dyvm.models.registry): names, defaults, the keep-ratio rule, dense twins, one factory."""
import os
import re

import pytest
import timm
import torch

import dyvm  # noqa: F401  (registers the names)
from dyvm.config import parse_args
from dyvm.models.dyvm import DyVM, DyVMConfig
from dyvm.models.registry import (DEFAULT_BLOCK_KEEP_RATIO, DEFAULT_TOKEN_KEEP_RATIO, FAMILIES, ModelOptionError,
                                  UnknownModelError, check_keep_ratios, create_model, default_pruning_loc, dense_twin,
                                  model_names, resolve)
from dyvm.models.vim import Vim

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(img_size=32, patch_size=8, depth=4, embed_dim=32, num_classes=10)


def test_every_name_of_the_table_is_registered_with_timm_and_resolves():
    names = model_names()
    assert {"Vim-Tiny", "Vim-Small", "Vim-Base", "vim_small", "dyvm_vim_small"} <= set(names)
    for name in names:
        spec = resolve(name)
        assert spec.dense_name in timm.list_models() and spec.dyvm_name in timm.list_models()
        assert spec.dynamic == (not name.startswith(spec.family.timm_prefix))  # CLI and dyvm_* names: DyVM
    assert resolve("Vim-Small").cli and resolve("Vim-Small").timm_name == "dyvm_vim_small"
    assert resolve("vim_small").timm_name == "vim_small" and resolve("vim_small").dyvm_name == "dyvm_vim_small"
    assert [f.cli_name(s) for f in FAMILIES for s in f.sizes][:3] == ["Vim-Tiny", "Vim-Small", "Vim-Base"]


@pytest.mark.parametrize("typo,hint", [("vim_smal", "vim_small"), ("Vim-small", "Vim-Small"),
                                       ("dyvm_vim_tiy", "dyvm_vim_tiny"), ("resnet50", None)])
def test_unknown_names_are_one_line_with_the_closest_name(typo, hint):
    with pytest.raises(UnknownModelError) as err:
        resolve(typo)
    msg = str(err.value)
    assert "\n" not in msg and f"unknown model {typo!r}" in msg and len(msg) < 200
    assert (f"did you mean {hint!r}" in msg) if hint else "did you mean" not in msg


def test_one_set_of_defaults_for_flags_config_and_python():
    """The CLI's defaults, DyVMConfig's and a model built from Python agree (the authors' main.py: 0.7, 0.7)."""
    args = parse_args([])
    assert args.token_keep_ratio == DEFAULT_TOKEN_KEEP_RATIO == 0.7
    assert args.block_keep_ratio == DEFAULT_BLOCK_KEEP_RATIO == DyVMConfig().block_keep_ratio == 0.7
    model = create_model("Vim-Tiny", **TINY)
    assert model.dyvm_cfg.block_keep_ratio == DEFAULT_BLOCK_KEEP_RATIO
    assert model.dyvm_cfg.token_keep_ratios == pytest.approx([0.7, 0.49, 0.343])
    assert model.dyvm_cfg.token_keep_ratios == pytest.approx(DyVMConfig().token_keep_ratios)


def test_default_pruning_locations():
    assert default_pruning_loc(24) == default_pruning_loc(32) == (6, 12, 18)  # the authors', every full size
    assert default_pruning_loc(6) == (2, 3, 4) and default_pruning_loc(4) == (1, 2, 3)  # quarters of a shallow one
    assert timm.create_model("dyvm_vim_tiny", **TINY).dyvm_cfg.pruning_loc == (1, 2, 3)  # timm path: same rule


def test_dense_names_ignore_dyvm_options_and_dyvm_names_refuse_bad_ones():
    dense = create_model("vim_tiny", token_keep_ratio=0.5, block_keep_ratio=0.2, pruning="random", **TINY)
    assert type(dense) is Vim
    with pytest.raises(ModelOptionError, match="unknown Vim option"):
        create_model("vim_tiny", embed_dimm=8)
    with pytest.raises(ModelOptionError, match="pruning_loc"):
        create_model("dyvm_vim_tiny", pruning_loc=(3, 1, 2), **TINY)
    assert type(create_model("Vim-Tiny", dynamic=False, **TINY)) is Vim  # the dense twin of an authors' name


def test_dense_twin_has_the_students_configuration():
    student = create_model("dyvm_vim_tiny", **TINY)
    twin = dense_twin(student)
    assert type(twin) is Vim and not isinstance(twin, DyVM) and twin.cfg == student.cfg
    assert set(twin.state_dict()) < set(student.state_dict())  # the student's keys minus its DyVM heads


@pytest.mark.parametrize("kwargs,message", [
    (dict(token_keep_ratio=0.0), "token_keep_ratio must be in (0, 1], got 0.0"),
    (dict(token_keep_ratio=1.5), "token_keep_ratio must be in (0, 1], got 1.5"),
    (dict(token_keep_ratios=(0.5, 0.7)), "token_keep_ratios must be non-increasing values in (0, 1]"),
    (dict(block_keep_ratio=-0.1), "block_keep_ratio must be in [0, 1], got -0.1"),
    (dict(block_keep_ratio=1.5), "block_keep_ratio must be in [0, 1], got 1.5"),
])
def test_one_keep_ratio_rule(kwargs, message):
    with pytest.raises(ModelOptionError) as err:
        check_keep_ratios(**kwargs)
    assert message in str(err.value)
    with pytest.raises(ModelOptionError):
        create_model("dyvm_vim_tiny", **kwargs, **TINY)
    check_keep_ratios(token_keep_ratio=1.0, block_keep_ratio=0.0)  # both ends that the rule allows
    check_keep_ratios(block_keep_ratio=1.0)


def test_only_the_registry_calls_timm_create_model():
    """One factory: no module of the package or entry point builds a model by name except the registry."""
    offenders = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".")]  # .git, .venv, ignored work folders
        if any(part in folder for part in ("tests", "mamba-1p1p1", "causal_conv1d", "output")):
            continue
        for f in files:
            path = os.path.join(folder, f)
            if f.endswith(".py") and not path.endswith(os.path.join("models", "registry.py")):
                if re.search(r"timm\.create_model\(", open(path).read()):
                    offenders.append(os.path.relpath(path, ROOT))
    assert not offenders, offenders


def test_meta_device_builds_are_free():
    with torch.device("meta"):
        model = create_model("Vim-Base")
    assert sum(p.numel() for p in model.parameters()) == 100_631_134
