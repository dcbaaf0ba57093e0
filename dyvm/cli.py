"""Command-line conventions shared by every entry point (main.py, python -m dyvm.flops / benchmark / report).

--help shows every flag's default; a bad flag or value is one line that names it (with the closest flag for a
typo), not the whole usage text followed by the error.
"""
import argparse
import difflib
import os
import sys
from typing import Callable


def flag_name(dest: str) -> str:
    """token_keep_ratio -> --token-keep-ratio (how a message names an option)."""
    return "--" + dest.replace("_", "-")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: ...)" to a flag's help unless there is nothing to show (None, '', False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or action.default in (None, "", False, argparse.SUPPRESS):
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the house conventions: defaults in --help, no abbreviations, one-line errors."""

    def __init__(self, prog=None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(prog, **kwargs)

    def _closest_flag(self, message: str) -> str:
        if "unrecognized arguments:" not in message:
            return ""
        flags = [s for a in self._actions for s in a.option_strings if s.startswith("--")]
        for token in message.split("unrecognized arguments:", 1)[1].split():
            if token.startswith("-"):
                close = difflib.get_close_matches(token.split("=")[0], flags, n=1, cutoff=0.6)
                if close:
                    return f"; did you mean {close[0]}?"
        return ""

    def error(self, message):
        """One line on stderr and exit status 2 (argparse's usual code), instead of usage + error."""
        hint = self._closest_flag(message)
        self.exit(2, f"error: {message}{hint} ({self.prog} --help lists every flag)\n")

    def exit(self, status=0, message=None):
        if message:
            sys.stderr.write(message)
        raise SystemExit(status)


def one_line(e: BaseException) -> str:
    """The last line of a message (DataLoader workers wrap errors in their traceback text)."""
    lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else type(e).__name__
    name = f"{type(e).__name__}: "
    if name in last and last.split(name, 1)[0].replace(".", "").replace("_", "").isalnum() or last.startswith(name):
        return last.split(name, 1)[1]  # "pkg.module.SomeError: message" -> "message"
    return last


def says_error(e: BaseException) -> bool:
    """Under torchrun every process meets the same bad option, file or data: rank 0 alone says it. A
    non-finite loss is said by the process that found it (the others know only that one did)."""
    from dyvm.engine import NonFiniteLossError

    if int(os.environ.get("RANK", "0")) == 0:
        return True
    return isinstance(e, NonFiniteLossError) and "in another process" not in str(e)


def check_kernel_settings() -> None:
    """The kernels' environment settings (MAMBA_SCAN_CKPT_CHUNK, MAMBA_TRITON_TUNING, MAMBA_REBUILD_SCAN_INPUTS), read
    when their module loads or at the first training call: checked before any work, so that a bad value is one line
    (a ConfigError) rather than a traceback at the first training step. Without Triton the PyTorch implementations
    run, which read only the last."""
    from dyvm.config import ConfigError
    from mamba_ssm.ops.bimamba_stacked import rebuild_from_env

    try:
        rebuild_from_env()
        from mamba_ssm.ops.triton.selective_scan import ckpt_chunk_from_env

        ckpt_chunk_from_env()  # (again: the module may have loaded before the variable was set)
    except ImportError:
        return
    except RuntimeError as e:
        raise ConfigError(str(e)) from None


def run_cli(work: Callable[[], object], user_errors: tuple) -> int:
    """An entry point's main: run `work`; a user error (one of user_errors) is one line on stderr, said once under
    torchrun (says_error), exit status 1; the process group is torn down either way."""
    import torch.distributed as dist

    try:
        work()
    except user_errors as e:
        if says_error(e):
            print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0
