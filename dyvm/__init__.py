"""DyVM: Dynamic Vision Mamba. Importing the package registers the timm model names.

It also picks thread settings that do not spin, before torch is imported: torch's OpenMP workers busy-wait
between parallel regions by default, which on a small or shared CPU makes training 10-20x slower (measured on
the 2-core demo machine). The OpenMP runtime reads OMP_WAIT_POLICY once, when torch loads it, so every entry
point (main.py, python -m dyvm.flops / dyvm.benchmark / dyvm.report, the scripts) imports dyvm before torch.
A value already in the environment wins (OMP_WAIT_POLICY=ACTIVE for a dedicated machine).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from dyvm import models  # noqa: E402,F401

__version__ = "0.1.0"
