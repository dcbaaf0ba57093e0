"""main.py's options (dyvm/config.py): YAML configs with `base:` inheritance, every table-row / ablation / demo
config, --help, and the precedence of defaults, config and command line."""
import os

import pytest
import torch

from dyvm.config import ConfigError, build_parser, parse_args, read_config
from dyvm.engine import build_model

def test_config_file_defaults_and_overrides(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: Vim-Small\ntoken_keep_ratio: 0.8\nblock-keep-ratio: 0.6\nepochs: 3\n")
    args = parse_args(["--config", str(cfg), "--epochs", "5"])
    assert (args.model, args.token_keep_ratio, args.block_keep_ratio, args.epochs) == ("Vim-Small", 0.8, 0.6, 5)
    cfg.write_text("tokn_keep_ratio: 0.8\n")
    with pytest.raises(ConfigError, match="unknown option.*tokn_keep_ratio"):
        parse_args(["--config", str(cfg)])


CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
CONFIGS = sorted(os.path.relpath(os.path.join(d, f), CONFIG_DIR) for d, _, files in os.walk(CONFIG_DIR)
                 for f in files if f.endswith(".yaml") and not os.path.relpath(d, CONFIG_DIR).startswith("seg"))
# (configs/seg/ holds `main.py seg` configs: tests/seg/test_main.py builds those)


def test_configs_cover_every_table_row_and_ablation():
    assert {"vim-t.yaml", "vim-s.yaml", "vim-b.yaml", "demo-dense.yaml", "demo-dyvm.yaml"} <= set(CONFIGS)
    assert {"videomamba-t.yaml", "videomamba-s.yaml", "mambareg-s.yaml", "mambareg-b.yaml"} <= set(CONFIGS)
    assert {f"ablations/{a}.yaml" for a in ("token-only", "block-only", "random", "static", "predictor-b",
                                            "predictor-delta")} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_its_model(name):
    """Each table-row / ablation / demo config parses and builds the intended model (on the meta device)."""
    args = parse_args(["--config", os.path.join(CONFIG_DIR, name)])
    with torch.device("meta"):
        model = build_model(args, 1000 if args.data_set == "IMNET" else 10)
    dyvm_cfg = getattr(model, "dyvm_cfg", None)
    if "ablations" in name:
        stem = name.split("/")[1][:-5]
        expect = {"token-only": ("learned", False), "block-only": ("none", True), "random": ("random", False),
                  "static": ("static", False), "predictor-b": ("learned", False),
                  "predictor-delta": ("learned", False)}[stem]
        assert (dyvm_cfg.pruning, dyvm_cfg.block_selection) == expect
    params = {"vim-t.yaml": 7_367_086, "vim-s.yaml": 26_594_110, "vim-b.yaml": 100_631_134,
              "videomamba-t.yaml": 7_367_086, "videomamba-s.yaml": 26_594_110, "mambareg-s.yaml": 28_598_590,
              "mambareg-b.yaml": 102_333_790}
    if name in params:
        assert sum(p.numel() for p in model.parameters()) == params[name]
        assert dyvm_cfg.pruning_loc == (6, 12, 18)
        family = {"vim": "Vim", "videomamba": "VideoMamba", "mambareg": "MambaReg"}[name.split("-")[0]]
        assert model.cfg.family == family


@pytest.mark.parametrize("name", [c for c in CONFIGS if c.startswith("ablations/")])
def test_ablation_configs_apply_to_every_backbone(name):
    """An ablation is its options: with --model VideoMamba-Small or MambaReg-Small it builds that backbone."""
    base = parse_args(["--config", os.path.join(CONFIG_DIR, name)])
    with torch.device("meta"):
        reference = build_model(base, 1000)
        for model_name, family in (("VideoMamba-Small", "VideoMamba"), ("MambaReg-Small", "MambaReg")):
            args = parse_args(["--config", os.path.join(CONFIG_DIR, name), "--model", model_name])
            model = build_model(args, 1000)
            assert model.cfg.family == family and model.dyvm_cfg == reference.dyvm_cfg


def test_help_shows_defaults_and_every_flag_has_help():
    parser = build_parser()
    undocumented = [a.option_strings[0] for a in parser._actions
                    if a.option_strings and a.help is None]
    assert not undocumented, undocumented
    text = parser.format_help()
    assert "--token-keep-ratio TOKEN_KEEP_RATIO" in text and "(default: 0.7)" in text and "(default: 64)" in text


def test_base_inheritance_resolves_relative_to_the_file(tmp_path):
    (tmp_path / "rows").mkdir()
    (tmp_path / "common.yaml").write_text("epochs: 30\nlr: 1.0e-4\nbatch_size: 64\n")
    (tmp_path / "rows" / "a.yaml").write_text("base: ../common.yaml\nlr: 2.0e-4\n")
    (tmp_path / "rows" / "b.yaml").write_text("base: a.yaml\nbatch_size: 8\n")
    assert read_config(str(tmp_path / "rows" / "b.yaml")) == {"epochs": 30, "lr": 2.0e-4, "batch_size": 8}
    args = parse_args(["--config", str(tmp_path / "rows" / "b.yaml"), "--epochs", "3"])
    assert (args.epochs, args.lr, args.batch_size) == (3, 2.0e-4, 8)


def test_base_cycles_and_missing_bases_are_one_line(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"'base:' goes round in a circle \(a.yaml -> b.yaml -> a.yaml\)"):
        parse_args(["--config", str(tmp_path / "a.yaml")])
    (tmp_path / "c.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"gone.yaml does not exist \(the base of .*c.yaml\)"):
        parse_args(["--config", str(tmp_path / "c.yaml")])
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("epohcs: 3\n")  # a typo in a base is named like one in the file itself
    with pytest.raises(ConfigError, match="unknown option.*epohcs"):
        parse_args(["--config", str(tmp_path / "d.yaml")])


def test_ablation_and_row_configs_hold_only_what_differs():
    """Every ablation inherits a table row (or another ablation), every row the shared ImageNet recipe."""
    for name in CONFIGS:
        keys = read_config(os.path.join(CONFIG_DIR, name))
        with open(os.path.join(CONFIG_DIR, name)) as f:
            own = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        if name.startswith("ablations/") or name in ("vim-t.yaml", "vim-s.yaml", "vim-b.yaml", "demo-dyvm.yaml"):
            assert own[0].startswith("base:"), name
            assert len(own) <= 12, (name, len(own))
        assert "base" not in keys


def test_progress_bars_follow_the_terminal_unless_asked(monkeypatch):
    """--progress unset: bars only when stderr is a terminal (a log file gets the epoch lines without the bars'
    carriage-return updates); --progress / --no-progress force it either way."""
    import io

    from dyvm.config import parse_args, show_progress

    assert parse_args([]).progress is None
    monkeypatch.setattr("sys.stderr", io.StringIO())  # not a terminal
    assert show_progress(None) is False
    monkeypatch.setattr("sys.stderr", type("Tty", (io.StringIO,), {"isatty": lambda self: True})())
    assert show_progress(None) is True
    assert show_progress(parse_args(["--no-progress"]).progress) is False
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert show_progress(parse_args(["--progress"]).progress) is True
