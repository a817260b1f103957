"""One-word answer distributions of a decoder LM: P(Yes), P(No), P(Irrelevant) per question.

A judge asks a question that ends where the answer's first token goes; the model's next-token
distribution there, summed over every vocabulary token that spells each answer ("Yes", " Yes",
"yes", "▁Yes", " Ir" for Irrelevant, …: ``classes``), is the answer distribution. Summing the
whole vocabulary is exact; an OpenAI-compatible server shows only its top log-probabilities,
of which this is the limit.

Two layouts, the same numbers (a test holds them to 1e-4 in float32):

- :func:`shared_prefix_masses`: each conversation (the prefix its questions share) is encoded
  once, and rows of questions continue it: each question a segment that sees the prefix and
  itself, its positions continuing after the prefix (:meth:`LlamaDecoder.after_prefixes`).
- :func:`per_question_masses`: one whole question a row (the reference, and the baseline that
  ``dynrules bench judge-local`` measures against).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dynrules.errors import DynrulesError
from dynrules.models.llama import LlamaDecoder, with_params

ANSWERS = 3  # yes, no, irrelevant: columns of the masses


def class_matrix(classes: np.ndarray) -> np.ndarray:
    """[vocab, 3] one-hot float32 from a [vocab] array of 0 (yes), 1 (no), 2 (irrelevant), -1."""
    onehot = np.zeros((len(classes), ANSWERS), np.float32)
    known = classes >= 0
    onehot[np.flatnonzero(known), classes[known]] = 1.0
    return onehot


def _masses(model: LlamaDecoder, hidden: jax.Array, classes: jax.Array) -> jax.Array:
    """Answer masses [..., 3] from the hidden states [..., hidden] at answer positions."""
    probs = jax.nn.softmax(model.logits(hidden), axis=-1)  # float32 over the whole vocabulary
    return probs @ classes


def shared_prefix_forward(model: LlamaDecoder, batch: dict, classes: jax.Array) -> jax.Array:
    """[rows, questions, 3] from packed question rows that continue shared prefixes:
    ``prefix_ids`` [prefixes, P] and ``prefix_lengths``; ``ids``, ``segments``, ``positions``
    [rows, time]; ``prefix_of_row`` [rows]; ``answer_at`` [rows, questions] (each question's last
    token; unused slots point anywhere and are dropped by the caller)."""
    hidden = model.after_prefixes(
        batch["prefix_ids"],
        batch["prefix_lengths"],
        batch["ids"],
        batch["segments"],
        batch["positions"],
        batch["prefix_of_row"],
    )
    picked = jnp.take_along_axis(hidden, batch["answer_at"][..., None], axis=1)
    return _masses(model, picked, classes)


shared_prefix_masses = nnx.jit(shared_prefix_forward)


@nnx.jit
def per_question_masses(
    model: LlamaDecoder, ids: jax.Array, lengths: jax.Array, classes: jax.Array
) -> jax.Array:
    """[rows, 3] from one question a row (right-padded ``ids`` [rows, time], ``lengths``)."""
    hidden = model(ids, lengths)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return _masses(model, last, classes)


class AnswerModel:
    """A decoder checkpoint (GGUF file or Hugging Face directory) with its LM head, ready to read
    answer distributions: weights on the device in ``dtype``, tokenizer, chat template, and the
    [vocab] answer class of every token (``classes``, from ``classify(token) -> int | None``).

    ``layout`` spreads the model over a device mesh: an object with ``constrain(x, logical_axes)``
    for activations and ``place(host_params, abstract_state)`` for the weights (each device
    reading only its shard); train.sharding makes one. Without it the model sits on one device.
    """

    def __init__(self, path: str | Path, classify, *, dtype: str = "float32", layout=None):
        from dynrules.models import decoder_io
        from dynrules.models.classifier import COMPUTE_DTYPES

        if dtype not in COMPUTE_DTYPES:
            raise DynrulesError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {dtype!r}")
        compute = COMPUTE_DTYPES[dtype]
        loaded = decoder_io.read_decoder(path, lm_head=True, dtype=np.dtype(jnp.dtype(compute)))
        self.path, self.config = Path(path), loaded.config
        self.tokenizer, self.chat_template = loaded.tokenizer, loaded.chat_template
        options = {"dtype": compute, "param_dtype": compute, "lm_head": True}
        if layout is None:
            params = jax.tree.map(np.asarray, loaded.params)
        else:
            options["constrain"] = layout.constrain
            abstract = nnx.eval_shape(
                lambda: LlamaDecoder(loaded.config, rngs=nnx.Rngs(0), **options)
            )
            params = layout.place(loaded.params, nnx.split(abstract)[1])
        self.model = with_params(loaded.config, params, **options)
        classes = np.full(loaded.config.vocab_size, -1, np.int32)
        for token_id in range(loaded.config.vocab_size):
            token = self.tokenizer.id_to_token(token_id)
            kind = None if token is None else classify(token)
            if kind is not None:
                classes[token_id] = kind
        if not (classes >= 0).any():
            raise DynrulesError(f"{path}: no token of the vocabulary spells an answer")
        self.classes = jnp.asarray(class_matrix(classes))

    def shared_prefix(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        return np.asarray(shared_prefix_masses(self.model, batch, self.classes))

    def per_question(self, ids: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        masses = per_question_masses(
            self.model, jnp.asarray(ids), jnp.asarray(lengths), self.classes
        )
        return np.asarray(masses)
