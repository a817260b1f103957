"""The layer scan both backbones run, with the bottom layers optionally frozen.

``frozen`` > 0 runs the first ``frozen`` layers as a scan of their own and stops the gradient
at its output: the embeddings and those layers get no gradient, so XLA drops their backward
pass and keeps none of their activations (partial fine-tuning; the optimizer leaves them as
they are, train.objective.make_optimizer).
"""

from __future__ import annotations

from collections.abc import Callable

import jax

from dynrules.errors import DynrulesError


def check_frozen(frozen: int, layers: int) -> int:
    """``frozen`` if it leaves a layer of ``layers`` to train (a backbone's constructor asks);
    0 always passes (dynrules plan probes models of no layers)."""
    if frozen < 0 or (frozen and frozen >= layers):
        raise DynrulesError(
            f"frozen_layers must be at least 0 and leave at least one of the model's {layers} "
            f"layers to train, got {frozen}"
        )
    return frozen


def scan_layers(step: Callable, hidden, layer_params: dict, frozen: int = 0, *, unroll=False):
    """``hidden`` through every stacked layer: ``step(hidden, params) → (hidden, _)``.

    ``unroll`` writes the trained layers out as straight-line code instead of a loop: the trainer
    asks for it on a CPU, where a differentiated loop stacks every layer's saved activations
    into buffers it zeroes and updates a layer at a time (the training step is 1.1–1.2 × faster
    unrolled, docs/performance.md). A forward alone stacks nothing, and elsewhere the loop
    compiles much faster (a TPU plan of 32 layers)."""
    if frozen:
        bottom = jax.tree.map(lambda p: p[:frozen], layer_params)
        hidden, _ = jax.lax.scan(step, hidden, bottom)
        hidden = jax.lax.stop_gradient(hidden)
        layer_params = jax.tree.map(lambda p: p[frozen:], layer_params)
    hidden, _ = jax.lax.scan(step, hidden, layer_params, unroll=unroll)
    return hidden
