"""dynrules: data-adaptive safety rules for training reward models."""

__version__ = "0.1.0"
