"""The names of model options, without importing JAX: what a configuration may choose from.

The modules that implement them (llama.REMAT_POLICIES, classifier.COMPUTE_DTYPES,
pooling.POOLING_MODES) are keyed by these names; tests/test_settings.py keeps them equal.
"""

from __future__ import annotations

DTYPES = ("float32", "bfloat16")  # compute (and parameter) dtypes
REMAT = ("none", "full", "dots")  # none; whole layers; keep matmul outputs
POOLINGS = ("mean", "last", "cls")
ATTENTION = ("auto", "xla", "splash", "pallas_gpu", "cudnn")  # models.attention's implementations
