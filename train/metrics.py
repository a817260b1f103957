"""A run's metrics: one record per log/eval point to ``metrics.jsonl`` and to TensorBoard.

``RUN/metrics.jsonl`` holds ``{"split": ..., "step": ..., **values}`` per line; it is the
record (resume reads the last train metrics from it). ``RUN/tensorboard/`` holds the same
records as TensorBoard scalars (tensorboardX event files; ``tensorboard --logdir
RUN/tensorboard``): every number of a record, nested dicts flattened with ``/``, tagged
``<split>/<key>`` — ``train/loss``, ``eval/accuracy``, ``eval/sections/<section>/accuracy``,
``eval/subsets/<subset>/accuracy`` — at the record's step. Characters TensorBoard does not take
in a tag (anything but letters, digits, ``_ - . /``) become ``_``.

Only the writer process (process 0) writes. Each start of a run opens a new event file in the
same directory (TensorBoard reads them in name order, which is start order); a resumed run's
file begins with a session START at the step after its checkpoint, so TensorBoard drops the
points that a killed run logged past that checkpoint and that the resumed run logs again (its
default ``--purge_orphaned_data``).
An error of the TensorBoard writer is logged once and ends TensorBoard output for the run; it
never stops training (metrics.jsonl is the record).
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_BAD_TAG_CHARACTERS = re.compile(r"[^-/\w.]")


def scalars(prefix: str, values: dict) -> Iterator[tuple[str, float]]:
    """``(tag, value)`` for every number in ``values`` (nested dicts flattened with ``/``);
    strings, lists and None are left out."""
    for key, value in values.items():
        tag = _BAD_TAG_CHARACTERS.sub("_", f"{prefix}/{key}")
        if isinstance(value, dict):
            yield from scalars(tag, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            yield tag, float(value)


class MetricsLog:
    """Appends a run's metric records to metrics.jsonl and its TensorBoard event files.

    ``is_writer`` false (a process other than 0): records nothing. ``resumed_from``: the
    checkpoint step a resumed run starts after (see the module doc).
    """

    def __init__(self, run_dir: Path, *, is_writer: bool, resumed_from: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        self.tensorboard_dir = Path(run_dir) / TENSORBOARD_DIR
        self.is_writer = is_writer
        self._writer = None
        self._failed = False
        self._resumed_from = resumed_from

    def record(self, split: str, step: int, values: dict) -> None:
        """One line of metrics.jsonl and its scalars in TensorBoard (process 0 only)."""
        if not self.is_writer:
            return
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"split": split, "step": step, **values}) + "\n")
        self._tensorboard(split, step, values)

    def _tensorboard(self, split: str, step: int, values: dict) -> None:
        if self._failed:
            return
        try:
            writer = self._open()
            for tag, value in scalars(split, values):
                writer.add_scalar(tag, value, step)
            writer.flush()  # records are rare (log_every): each is on disk before the next step
        except Exception as exc:  # never stop training for TensorBoard; metrics.jsonl holds it
            self._failed = True
            log.warning(
                "TensorBoard output to %s stopped (metrics.jsonl goes on): %s",
                self.tensorboard_dir,
                exc,
            )

    def _open(self):
        if self._writer is None:
            SummaryWriter = _summary_writer()
            # purge_step: a session START there, which makes TensorBoard drop what an earlier
            # start of the run logged from that step on (see the module doc).
            purge = None if self._resumed_from is None else self._resumed_from + 1
            # tensorboardX names a file by the second and host only, and opens it with "wb": a
            # second start within that second would truncate the first. The suffix keeps every
            # start's file apart and in order (TensorBoard reads a directory's files sorted).
            self._writer = SummaryWriter(
                str(self.tensorboard_dir),
                flush_secs=30,
                purge_step=purge,
                filename_suffix=f".{time.time_ns()}.{os.getpid()}",
            )
        return self._writer

    def close(self) -> None:
        """Flushes and closes the event file (a later record opens a new one)."""
        if self._writer is not None:
            try:
                self._writer.close()
            except Exception as exc:
                log.warning("TensorBoard output to %s: %s", self.tensorboard_dir, exc)
            self._writer = None


def _summary_writer():
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch at the
    top of its writer module when it can (only to accept torch tensors, which this never
    passes), which would load PyTorch into a JAX process wherever both are installed. A
    process that imported torch already keeps it."""
    import sys

    shield = "torch" not in sys.modules
    if shield:
        sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        if shield:
            del sys.modules["torch"]
    return SummaryWriter
