"""Sentence embeddings from a BERT checkpoint, as sentence-transformers' all-MiniLM-L6-v2 gives them."""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrules.models.bert import BertEncoder
from dynrules.models.bert_checkpoint import read_checkpoint
from dynrules.models.pooling import pool
from dynrules.models.tokenizer import bucket_for, length_buckets, pad_batch


class SentenceEmbedder:
    """Sentence-transformers-style embeddings: mean over real tokens, then L2 normalisation.

    Holds the model on the default device; one compiled function per (batch, bucket) shape.
    """

    def __init__(self, path: str | Path | None = None):
        loaded = read_checkpoint(path)
        self.tokenizer = loaded.tokenizer
        abstract = nnx.eval_shape(lambda: BertEncoder(loaded.config, rngs=nnx.Rngs(0)))
        self._graphdef, _ = nnx.split(abstract)
        self._params = jax.device_put(loaded.params)
        self.max_positions = loaded.config.max_position_embeddings
        self.hidden_size = loaded.config.hidden_size
        self.last_truncated = 0

        @jax.jit
        def embed(params, ids, lengths):
            hidden = nnx.merge(self._graphdef, params)(ids, lengths)
            pooled = pool(hidden, lengths, "mean")
            return pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)

        self._embed = embed

    def __call__(
        self, texts: list[str], *, batch_size: int = 64, max_length: int = 256
    ) -> np.ndarray:
        max_length = min(max_length, self.max_positions)
        tokens = self.tokenizer.encode(texts, max_length)
        self.last_truncated = tokens.truncated
        buckets = length_buckets(max_length)
        lengths = tokens.lengths
        order = np.argsort(lengths, kind="stable")  # similar lengths share a batch and a bucket
        out = np.zeros((len(texts), self.hidden_size), np.float32)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            time = bucket_for(int(lengths[chunk].max()), buckets)
            ids, lens = pad_batch(
                [tokens.ids[i] for i in chunk], time, batch_size, self.tokenizer.pad_id
            )
            out[chunk] = np.asarray(self._embed(self._params, ids, lens))[: len(chunk)]
        return out


@functools.lru_cache(maxsize=4)
def sentence_embedder(path: str | None = None) -> SentenceEmbedder:
    """A cached :class:`SentenceEmbedder` per checkpoint path (None = default MiniLM)."""
    return SentenceEmbedder(path)


def embed_texts(
    texts: list[str],
    *,
    batch_size: int = 64,
    max_length: int = 256,
    checkpoint: str | None = None,
) -> np.ndarray:
    """Embed texts with the MiniLM encoder, as sentence-transformers' all-MiniLM-L6-v2 does.

    Args:
        texts: the strings to embed (any number, any order).
        batch_size: texts per forward pass (the last batch is padded, not recompiled).
        max_length: tokens per text including [CLS]/[SEP]; longer texts keep their END
            (truncated from the start). 256 is the model's own training length.
        checkpoint: another checkpoint directory in the same layout; None = MiniLM.

    Returns:
        float32 array [len(texts), hidden] (hidden = 384 for MiniLM): mean of the last
        hidden states over real tokens, L2-normalised, in input order. Results do not depend
        on batch composition. The model is loaded once per process and reused; texts are
        grouped by length into power-of-two buckets so only a few shapes are compiled.
    """
    embedder = sentence_embedder(None if checkpoint is None else str(checkpoint))
    return embedder(list(texts), batch_size=batch_size, max_length=max_length)
