"""Shared fixtures. Tests run on the CPU; nothing here imports JAX."""

import json
import os

import numpy as np
import pytest

from dynrules.engine.pool import Rule, RulePool

# The suite runs on the CPU whatever accelerator plugins are installed: with libtpu (the tpu
# extra) JAX would otherwise probe for a TPU in every process, and hold libtpu's lock file.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture
def small_pool():
    return RulePool("small", tuple(Rule(f"r{i}", "test", f"rule number {i}") for i in range(8)))


def write_jsonl(path, records):
    with open(path, "w") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record)) + "\n")
    return path


def scored_records(n, n_rules, seed=0, published=True, relevance=True):
    rng = np.random.default_rng(seed)
    names = (
        ("responseA", "responseB", "scoresA", "scoresB")
        if published
        else ("response_a", "response_b", "scores_a", "scores_b")
    )
    records = []
    for i in range(n):
        record = {
            "prompt": f"prompt {i}",
            names[0]: f"answer A{i}",
            names[1]: f"answer B{i}",
            names[2]: rng.uniform(-1, 1, n_rules).round(3).tolist(),
            names[3]: rng.uniform(-1, 1, n_rules).round(3).tolist(),
            "truth": int(i % 2),
        }
        if relevance:
            record["relevance"] = rng.uniform(0, 1, n_rules).round(3).tolist()
        records.append(record)
    return records


def tensorboard_scalars(logdir):
    """``[(tag, step, value)]`` of the scalar events under ``logdir`` as TensorBoard shows them:
    files in name order, and a session START at step s drops what came before it from step s
    on (TensorBoard's purge of orphaned data). Reads the TFRecord framing and tensorboardX's
    ``Event`` protobuf directly (no TensorBoard needed)."""
    import struct
    from pathlib import Path

    from dynrules.train.metrics import _summary_writer

    _summary_writer()  # tensorboardX imported without PyTorch, as the trainer imports it
    from tensorboardX.proto.event_pb2 import Event, SessionLog

    points = []
    for path in sorted(Path(logdir).glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4  # length, its CRC, the record, its CRC
            if event.HasField("session_log") and event.session_log.status == SessionLog.START:
                points = [p for p in points if p[1] < event.step]
            for value in event.summary.value:
                points.append((value.tag, event.step, value.simple_value))
    return points
