"""DyVM: Dynamic Vision Mamba. Importing the package registers the timm model names."""
from dyvm import models  # noqa: F401

__version__ = "0.1.0"
