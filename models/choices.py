"""The names of model options, without importing JAX: what a configuration may choose from.

The modules that implement them (llama.REMAT_POLICIES, classifier.COMPUTE_DTYPES,
pooling.POOLING_MODES) are keyed by these names; tests/test_settings.py keeps them equal.

Each is a ``Literal`` type (for the configuration's fields) and the tuple of its values.
"""

from __future__ import annotations

from typing import Literal, get_args

Dtype = Literal["float32", "bfloat16"]  # compute (and parameter) dtypes
Remat = Literal["none", "full", "dots"]  # none; whole layers; keep matmul outputs
Pooling = Literal["mean", "last", "cls"]
Attention = Literal[
    "auto", "xla", "splash", "pallas_gpu", "cudnn", "segment_cpu"
]  # models.attention's implementations

DTYPES: tuple[Dtype, ...] = get_args(Dtype)
REMAT: tuple[Remat, ...] = get_args(Remat)
POOLINGS: tuple[Pooling, ...] = get_args(Pooling)
ATTENTION: tuple[Attention, ...] = get_args(Attention)
