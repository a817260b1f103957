"""What a train step computes: the tasks' objectives, their metrics, and the Optax optimizer.

An objective turns the model's outputs for a micro-batch of training examples into a loss and
metric sums (train.trainer runs it; :class:`Objective` says what it must provide):

- :class:`BradleyTerry` (the reward model): loss per pair −log σ(r_c − r_r − m), computed in
  float32, with m an optional margin (``margin_scale`` × the pair's rule margin from
  ``dynrules select``), optionally with soft labels from the same margin (``label_confidence``,
  see :func:`bradley_terry`), and an optional reward centering term
  ``center_coef · mean((r_c + r_r)²)`` that keeps rewards near zero mean (TRL's
  ``center_rewards_coefficient``).
- :class:`MultiLabelBCE` (the rule adapter): binary cross-entropy of one logit per rule against
  the oracle's multi-hot top-k set, and precision@k of the k largest logits.

Metrics are returned as sums over examples, so micro-batches and hosts combine exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

import jax
import jax.numpy as jnp
import optax

if TYPE_CHECKING:
    from dynrules.train.config import TrainConfig


class Objective(Protocol):
    """A task's loss over model outputs, and the metrics it logs."""

    texts_per_example: int  # texts one training example reads (a pair: chosen, rejected)
    label_dims: Mapping[str, int]  # a batch's label arrays → their dimensions per example
    headline: str  # the metric the progress bar shows beside the loss

    def loss(
        self, outputs: jax.Array, labels: dict[str, jax.Array], config: TrainConfig
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """(mean loss, metric sums) of a micro-batch; ``outputs`` [model outputs, examples,
        texts_per_example]. The sums hold ``pairs`` (examples) and ``loss``."""
        ...

    def summarize(self, sums: dict) -> dict[str, float]:
        """Metric sums (of any number of micro-batches) → the logged metrics."""
        ...


class BradleyTerry:
    """The reward model's objective: a pair's chosen and rejected rewards, its rule margin."""

    texts_per_example = 2
    label_dims: Mapping[str, int] = {"margins": 0}
    headline = "accuracy"

    def loss(self, outputs, labels, config):
        return bradley_terry(
            outputs[0][:, 0],
            outputs[0][:, 1],
            labels["margins"],
            margin_scale=config.margin_scale,
            label_confidence=config.label_confidence,
            center_coef=config.center_coef,
        )

    def summarize(self, sums: dict) -> dict[str, float]:
        return summarize(sums)


class MultiLabelBCE:
    """The rule adapter's objective: one logit per rule against the oracle's top-k set."""

    texts_per_example = 1
    label_dims: Mapping[str, int] = {"targets": 1}  # multi-hot [examples, rules]
    headline = "precision_at_k"

    def __init__(self, k: int):
        self.k = k

    def loss(self, outputs, labels, config):
        logits = outputs[:, :, 0].T.astype(jnp.float32)  # [examples, rules]
        targets = labels["targets"]
        pairs = logits.shape[0]
        # The mean over every cell equals the mean of the rows' means: micro-batches of equal
        # size accumulate to the full batch's gradient.
        loss = optax.sigmoid_binary_cross_entropy(logits, targets).mean()
        _, top = jax.lax.top_k(logits, self.k)
        sums = {
            "pairs": jnp.asarray(pairs, jnp.float32),
            "loss": loss * pairs,
            "hits": jnp.take_along_axis(targets, top, axis=1).sum(),
        }
        return loss, sums

    def summarize(self, sums: dict) -> dict[str, float]:
        pairs = float(sums["pairs"])
        return {
            "loss": float(sums["loss"]) / pairs,
            "precision_at_k": float(sums["hits"]) / (pairs * self.k),
        }


def bradley_terry(
    chosen: jax.Array,
    rejected: jax.Array,
    margins: jax.Array,
    *,
    margin_scale: float = 0.0,
    label_confidence: float = 0.0,
    center_coef: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean loss over the pairs and metric sums (ties count as wrong).

    ``margins`` are the pairs' rule margins (0: no margin, a label taken as certain). With
    ``label_confidence`` β > 0 a pair with a margin m is a soft label, P(chosen ≻ rejected) =
    σ(β·|m|): the posterior of the true preference under the logistic vote model that
    justifies max-discrepancy selection (README, method), so near-ties teach little.
    """
    chosen = chosen.astype(jnp.float32)
    rejected = rejected.astype(jnp.float32)
    margins = margins.astype(jnp.float32)
    difference = chosen - rejected
    logits = difference - margin_scale * margins
    certain = (margins == 0) | (label_confidence == 0)
    target = jnp.where(certain, 1.0, jax.nn.sigmoid(label_confidence * jnp.abs(margins)))
    loss = -(target * jax.nn.log_sigmoid(logits) + (1 - target) * jax.nn.log_sigmoid(-logits))
    loss = loss.mean()
    if center_coef:
        loss = loss + center_coef * jnp.mean(jnp.square(chosen + rejected))
    both = jnp.concatenate([chosen, rejected])
    sums = {
        "pairs": jnp.asarray(chosen.shape[0], jnp.float32),
        "loss": loss * chosen.shape[0],
        "correct": (difference > 0).sum().astype(jnp.float32),
        "margin": difference.sum(),
        "reward": both.sum(),
        "reward_sq": jnp.square(both).sum(),
    }
    return loss, sums


def summarize(sums: dict) -> dict[str, float]:
    """Metric sums → loss, accuracy, margin (mean r_c − r_r), reward mean and std."""
    pairs = float(sums["pairs"])
    mean = float(sums["reward"]) / (2 * pairs)
    variance = max(float(sums["reward_sq"]) / (2 * pairs) - mean * mean, 0.0)
    return {
        "loss": float(sums["loss"]) / pairs,
        "accuracy": float(sums["correct"]) / pairs,
        "margin": float(sums["margin"]) / pairs,
        "reward_mean": mean,
        "reward_std": variance**0.5,
    }


def _decays(path, _value) -> bool:
    # Decay matrices and embeddings; not biases or LayerNorm scales (the usual AdamW practice).
    name = str(getattr(path[-1], "key", path[-1]))
    return name.endswith("_kernel") or name.endswith("embeddings")


def make_schedule(*, learning_rate: float, steps: int, warmup_ratio: float) -> optax.Schedule:
    """Linear warmup over ``warmup_ratio · steps``, then cosine decay to 0 at ``steps``."""
    warmup = min(int(round(warmup_ratio * steps)), steps - 1)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0 if warmup else learning_rate,
        peak_value=learning_rate,
        warmup_steps=warmup,
        decay_steps=steps,
        end_value=0.0,
    )


def make_optimizer(
    schedule: optax.Schedule,
    *,
    weight_decay: float,
    clip_norm: float,
    head_scale: float = 1.0,
    frozen_layers: int = 0,
) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW (no decay on biases and LayerNorm parameters), with
    the head's updates ``head_scale`` times the backbone's: Adam moves each weight by about the
    learning rate a step, far too little for a fresh head at a rate that suits a pretrained
    backbone. ``frozen_layers`` > 0 zeroes the updates of the embeddings and the first
    ``frozen_layers`` layers, weight decay included (models.layers: they get no gradient).
    (At 1 and 0 the chain is the plain one, so runs saved before these existed resume.)"""
    chain = [
        optax.clip_by_global_norm(clip_norm),
        optax.adamw(
            schedule,
            weight_decay=weight_decay,
            mask=lambda params: jax.tree_util.tree_map_with_path(_decays, params),
        ),
    ]
    if head_scale != 1.0:
        chain.append(optax.stateless(lambda updates, _: _scale_head(updates, head_scale)))
    if frozen_layers:
        chain.append(optax.stateless(lambda updates, _: _freeze(updates, frozen_layers)))
    return optax.chain(*chain)


def _scale_head(updates: dict, scale: float) -> dict:
    return {
        k: jax.tree.map(lambda u: u * scale, v) if k.startswith("head_") else v
        for k, v in updates.items()
    }


# Backbone parameters after the last layer (the decoder's final norm): never frozen.
_AFTER_LAYERS = frozenset({"final_norm"})


def _freeze(updates: dict, frozen: int) -> dict:
    return {
        k: v if k.startswith("head_") else _freeze_backbone(v, frozen) for k, v in updates.items()
    }


def _freeze_backbone(updates: dict, frozen: int) -> dict:
    """The backbone's updates with the embeddings' and the first ``frozen`` layers' zeroed."""
    layers = jax.tree.leaves(updates["layers"])[0].shape[0]
    trained = (jnp.arange(layers) >= frozen).astype(jnp.float32)

    def by_layer(u):
        return u * trained.reshape((layers,) + (1,) * (u.ndim - 1)).astype(u.dtype)

    frozen_updates = {}
    for key, value in updates.items():
        if key == "layers":
            frozen_updates[key] = jax.tree.map(by_layer, value)
        elif key in _AFTER_LAYERS:
            frozen_updates[key] = value
        else:  # the embeddings, below every layer
            frozen_updates[key] = jax.tree.map(jnp.zeros_like, value)
    return frozen_updates
