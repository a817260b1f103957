"""Pooling hidden states into one vector per text, at explicit lengths."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dynrules.errors import DynrulesError

POOLING_MODES = ("mean", "last", "cls")


def pool(hidden: jax.Array, lengths: jax.Array, mode: str) -> jax.Array:
    """One vector per text from hidden states, using explicit lengths (never the padding).

    - ``mean``: average over the ``length`` real tokens ([CLS] and [SEP] included), as
      sentence-transformers does; the default, and how MiniLM was trained.
    - ``last``: the hidden state at index ``length - 1`` (the final [SEP]).
    - ``cls``: the hidden state at index 0.
    """
    hidden = hidden.astype(jnp.float32)
    if mode == "mean":
        mask = (jnp.arange(hidden.shape[1])[None, :] < lengths[:, None]).astype(jnp.float32)
        return (hidden * mask[..., None]).sum(1) / jnp.maximum(lengths, 1)[:, None].astype(
            jnp.float32
        )
    if mode == "last":
        return jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    if mode == "cls":
        return hidden[:, 0]
    raise DynrulesError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")


def pool_segments(
    hidden: jax.Array, segments: jax.Array, positions: jax.Array, slots: int, mode: str
) -> jax.Array:
    """One vector per segment of packed rows: [rows, slots, hidden] (slot s = segment s + 1).

    The same vectors :func:`pool` gives each text alone: ``mean`` averages the segment's
    tokens, ``last`` takes its last token, ``cls`` its first. Empty slots give zeros. A 0/1
    selection matrix picks the tokens (at full float32 precision, so a hidden state passes
    through exactly); cheap next to the model (slots × hidden multiply-adds a token).
    """
    if mode not in POOLING_MODES:
        raise DynrulesError(f"unknown pooling {mode!r}; choose one of {POOLING_MODES}")
    member = segments[..., None] == jnp.arange(1, slots + 1)  # [rows, time, slots]
    lengths = member.sum(1)  # [rows, slots]
    if mode == "last":
        member = member & (positions[..., None] == lengths[:, None, :] - 1)
    elif mode == "cls":
        member = member & (positions[..., None] == 0)
    pooled = jnp.einsum(
        "rtd,rts->rsd",
        hidden.astype(jnp.float32),
        member.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    if mode == "mean":
        pooled = pooled / jnp.maximum(lengths, 1)[..., None].astype(jnp.float32)
    return pooled
