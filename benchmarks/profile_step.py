"""Where one reward-model training step spends its time on the CPU (issue 15's profile).

Builds the first step of HH harmless pairs (packed or one text a row), compiles and warms the
step, traces two steps with ``jax.profiler`` (a Perfetto trace), and sums the time of every
XLA operation by what it computes, read from the compiled HLO: attention scores and softmax
(tensors with two sequence axes, or the segment_cpu kernel's custom calls), dense matmuls
inside the layers, the other per-token work inside the layers (norms, activations, residuals,
copies), and everything outside the layers (embedding lookup and its gradient, pooling, loss,
AdamW). Also prints how many of the computed tokens are real.

Run: ``dynrules bench profile-step --backbone encoder [--no-packing] [--pairs-per-step 8] --json``;
one JSON object on stdout.
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from dynrules.benchmarks.rewardmodel import hh_pairs
from dynrules.models import classifier as mdl
from dynrules.train import sharding as shd
from dynrules.train.config import Backbone, TrainConfig
from dynrules.train.trainer import ExampleBatches, TokenizedExamples, Trainable, pair_examples

CONTAINERS = ("while", "call", "conditional")  # their events span the operations inside them


def _instructions(hlo: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """HLO instruction name → (output shape, JAX op_name)."""
    found = {}
    for line in hlo.splitlines():
        match = re.match(r"\s*(?:ROOT )?%(\S+) = \(?\w+\[([\d,]*)\]", line)
        if match:
            op_name = re.search(r'op_name="([^"]*)"', line)
            shape = tuple(int(d) for d in match.group(2).split(",") if d)
            found[match.group(1)] = (shape, op_name.group(1) if op_name else "")
    return found


def _category(shape: tuple[int, ...], op_name: str, width: int) -> str:
    if len(shape) >= 2 and shape[-1] == width and shape[-2] == width:
        return "attention scores and softmax"
    if op_name.endswith("ffi_call"):  # the segment_cpu kernel, forward or backward
        return "attention scores and softmax"
    if "while/body" not in op_name:
        return "outside the layers (embeddings, pooling, loss, AdamW)"
    if "dot_general" in op_name:
        return "dense matmuls in the layers"
    return "other per-token work in the layers"


def profile(backbone: Backbone, packing: bool, pairs_per_step: int, max_length: int, data) -> dict:
    model = mdl.pretrained(backbone, None, num_outputs=1, max_length=max_length, seed=0)
    pairs = hh_pairs(data)
    pairs = [pairs[i] for i in np.random.default_rng(0).permutation(len(pairs))[:pairs_per_step]]
    config = TrainConfig(
        steps=1000,
        batch_size=pairs_per_step,
        max_length=max_length,
        backbone=backbone,
        packing=packing,
    )
    tokens = TokenizedExamples.build(
        pair_examples(pairs, model.render), model.tokenizer, model.spec.max_length, 2
    )
    trainable = Trainable.build(model.spec, config, shd.make_mesh("", jax.devices()[:1]))
    batches = ExampleBatches(
        tokens,
        seed=0,
        batch_size=pairs_per_step,
        grad_accum=1,
        max_length=model.spec.max_length,
        pad_id=model.tokenizer.pad_id,
        packing=trainable.row_layout() if packing else None,
    )
    host = batches.batch(0)
    width = host["ids"].shape[-1]
    batch = trainable.global_batch(host)
    state = trainable.initial_state(model.params)
    step = trainable.train_step(config)
    hlo = step.lower(state, batch).compile().as_text()
    for _ in range(2):
        state, sums = step(state, batch)
        sums["loss"].block_until_ready()
    started = time.perf_counter()
    for _ in range(3):
        state, sums = step(state, batch)
        sums["loss"].block_until_ready()
    step_seconds = (time.perf_counter() - started) / 3
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        for _ in range(2):
            state, sums = step(state, batch)
            sums["loss"].block_until_ready()
        jax.profiler.stop_trace()
        trace = next(Path(trace_dir).rglob("perfetto_trace.json.gz"))
        events = json.load(gzip.open(trace))["traceEvents"]
    instructions = _instructions(hlo)
    busy: collections.Counter[str] = collections.Counter()
    for event in events:
        name = event.get("name", "")
        if event.get("ph") != "X" or name not in instructions or name.startswith(CONTAINERS):
            continue
        busy[_category(*instructions[name], width)] += event.get("dur", 0)
    total = sum(busy.values())
    real = int(tokens.texts.lengths[: 2 * pairs_per_step].sum())
    return {
        "backbone": backbone,
        "packing": packing,
        "batch_shape": list(host["ids"].shape),
        "real_tokens": real,
        "real_over_computed_tokens": real / int(np.prod(host["ids"].shape)),
        "step_seconds": step_seconds,
        "share_of_operation_time": {k: round(v / total, 3) for k, v in busy.most_common()},
    }
