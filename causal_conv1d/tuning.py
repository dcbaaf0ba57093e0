"""Launch-parameter overrides shared by the Triton kernels of both packages: MAMBA_TRITON_TUNING=file.json
(written by benchmarks/kernels.py --sweep --save-tuning) replaces entries of the built-in tables."""
import json
import os


def apply_tuning_file(section: str, table: dict) -> None:
    """Update `table` in place from the file's `section` ("fwd", "bwd" or "conv"); a bad file or entry is a
    clear error naming the variable, the file and the entry."""
    path = os.environ.get("MAMBA_TRITON_TUNING")
    if not path:
        return
    try:
        saved = json.load(open(path)).get(section, {})
    except (OSError, ValueError) as e:
        raise RuntimeError(f"MAMBA_TRITON_TUNING={path}: cannot read the tuning file ({e})") from None
    for key, cfg in saved.items():  # entries may omit parameters added later (they keep the built-in value)
        if key not in table or not set(cfg) <= set(table[key]):
            raise RuntimeError(f"MAMBA_TRITON_TUNING={path}: unexpected {section} entry {key}: {cfg}")
        table[key] = {**table[key], **cfg}
