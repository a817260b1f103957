"""Batch scoring with static shapes: texts → model outputs, sharded over the mesh.

Texts are sorted by token length and cut into fixed-size batches, each padded to the
smallest power-of-two length bucket that fits (models.tokenizer.length_buckets). A scorer
therefore compiles once per bucket, never per batch. Batches are split over the mesh's
('data', 'fsdp') axes. In a multi-process job every process plans the same batches (the
texts are tokenized once across processes, train.tokens), supplies only its rows of each, and
receives every score back; process 0 writes the one output, in input order. Scores do not
depend on what else is in the batch: padding is masked by explicit lengths, and packed texts
(several a row, the default) see only themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from dynrules.engine.pairs import iter_raw_records
from dynrules.errors import DynrulesError, InputError
from dynrules.kernels import packing
from dynrules.models import classifier as mdl
from dynrules.models import tokenizer as tok
from dynrules.models.templates import format_text
from dynrules.train import sharding as shd
from dynrules.train.data import score_text
from dynrules.train.tokens import SharedTokens


@dataclasses.dataclass(frozen=True)
class ScoreBatch:
    """One model call: text ``texts[i]`` sits in row ``row[i]`` at ``offset[i]`` as segment
    ``segment[i]`` of a [rows, width] batch (unpacked: one text a row, offset 0, segment 1)."""

    texts: np.ndarray
    row: np.ndarray
    offset: np.ndarray
    segment: np.ndarray
    width: int
    rows: int


class Scorer:
    """Model outputs [n, outputs] for lists of texts; counts truncated texts in ``truncated``.

    A batch of width w holds ``min(batch_size, tokens_per_batch // w)`` rows (rounded to fill
    every device): short texts go in big batches, long ones in smaller batches whose
    attention scores ([rows, heads, w, w]) still fit in cache. With ``row_tiers`` = t > 1 a
    bucket also has programs for 1/2, 1/4, … 1/2^(t-1) of those rows, and a bucket's last,
    partial batch runs in the smallest that fits: a server scoring a few texts at a time then
    pads a handful of rows, not a whole batch (t programs per bucket, all compiled by
    :meth:`warm_up`).

    With ``packing`` a row holds several texts (kernels.packing, longest first): a row is as
    wide as the bucket of the text that opened it, at least ``PACKED_ROW_WIDTH``, and shorter
    texts fill its padding, so the same programs run fewer rows; each text scores as it does
    alone.
    """

    # Texts shorter than this share rows this wide: attention over 128 keys costs little next
    # to the dense layers, while a short text alone in its bucket can be a third padding.
    PACKED_ROW_WIDTH = 128

    spec: mdl.ModelSpec  # the model's, set by from_model_dir

    def __init__(
        self,
        graphdef,
        params,
        tokenizer,
        mesh,
        *,
        max_length: int,
        batch_size: int = 64,
        tokens_per_batch: int = 4096,
        row_tiers: int = 1,
        packing: bool = True,
    ):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.buckets = tok.length_buckets(max_length)
        self.packing = packing
        multiple = shd.batch_shards(mesh)

        def rows(width):  # rounded up to a multiple of the batch shards
            wanted = max(1, min(batch_size, tokens_per_batch // width))
            return -(-wanted // multiple) * multiple

        self.rows = {width: rows(width) for width in self.buckets}
        self.row_tiers = {
            width: sorted({-(-full // 2**tier // multiple) * multiple for tier in range(row_tiers)})
            for width, full in self.rows.items()
        }
        self.truncated = 0
        self.params = params
        # (prompt, response) → text; from_model_dir sets the model's
        self.render: Callable[[str, str], str] = format_text
        row_sharding = shd.batch_sharding(mesh, 2)
        self._rows_sharding, self._lengths_sharding = row_sharding, shd.batch_sharding(mesh, 1)
        param_shardings = jax.tree.map(lambda x: x.sharding, params)
        in_shardings: tuple[Any, ...]
        if packing:
            forward = functools.partial(mdl.apply_packed, graphdef, slots=tok.ROW_SEGMENTS)
            in_shardings = (param_shardings, row_sharding, row_sharding, row_sharding)
        else:
            forward = functools.partial(mdl.apply, graphdef)
            in_shardings = (param_shardings, row_sharding, self._lengths_sharding)
        self._forward = jax.jit(
            forward, in_shardings=in_shardings, out_shardings=shd.replicated(mesh)
        )  # every process reads all scores

    @classmethod
    def from_model_dir(
        cls,
        directory: str | Path,
        *,
        mesh_spec: str = "",
        batch_size: int = 64,
        dtype: str = "float32",
        row_tiers: int = 1,
        packing: bool = True,
    ) -> Scorer:
        """A scorer for a run or model directory, its weights laid out on ``mesh_spec``."""
        loaded = mdl.read_model(resolve_model_dir(directory))
        mesh = shd.make_mesh(mesh_spec)
        graphdef, abstract_state = mdl.abstract_model(
            loaded.spec, dtype=mdl.COMPUTE_DTYPES[dtype], constrain=shd.ActivationSharding(mesh)
        )
        params = shd.place(loaded.params, shd.abstract_params(abstract_state, mesh))
        scorer = cls(
            graphdef,
            params,
            loaded.tokenizer,
            mesh,
            max_length=loaded.spec.max_length,
            batch_size=batch_size,
            row_tiers=row_tiers,
            packing=packing,
        )
        scorer.spec = loaded.spec
        scorer.render = loaded.render
        return scorer

    def __call__(self, texts: list[str]) -> np.ndarray:
        tokens = SharedTokens(texts, self.tokenizer, self.max_length)
        self.truncated += tokens.truncated
        return self._score(tokens.lengths, tokens.ids)

    def encode(self, texts: list[str]) -> tok.TokenizedTexts:
        """Token ids of ``texts`` (one process), cut to the model's length by its truncation."""
        tokens = self.tokenizer.encode(texts, self.max_length)
        self.truncated += tokens.truncated
        return tokens

    def score_tokens(self, ids: list[np.ndarray]) -> np.ndarray:
        """Model outputs [n, outputs] for token ids made by :meth:`encode`."""
        lengths = np.array([len(x) for x in ids], np.int32)
        return self._score(lengths, lambda indices: [ids[i] for i in indices])

    def warm_up(self) -> int:
        """Compile every (bucket, rows) program now, not on first use; returns how many."""

        def one_token(indices):
            return [np.zeros(1, np.int32) for _ in indices]

        programs = [(w, rows) for w, tiers in self.row_tiers.items() for rows in tiers]
        first = np.zeros(1, np.int64)
        for width, rows in programs:
            self._run(ScoreBatch(first, first, first, first + 1, width, rows), one_token)
        return len(programs)

    def _score(self, lengths: np.ndarray, ids_of) -> np.ndarray:
        out = np.zeros((len(lengths), self.params["head_kernel"].shape[1]), np.float32)
        for batch in self.plan(lengths):
            out[batch.texts] = self._run(batch, ids_of)
        return out

    def _run(self, batch: ScoreBatch, ids_of) -> np.ndarray:
        """Outputs of ``batch.texts``; this process supplies only its rows of the batch
        (``ids_of`` gives their token ids)."""
        local = shd.local_rows(self._lengths_sharding, (batch.rows,))
        mine = np.flatnonzero(np.isin(batch.row, local))
        seqs = ids_of(batch.texts[mine].tolist())
        if self.packing:
            arrays = tok.pack_batch(
                seqs,
                np.searchsorted(local, batch.row[mine]),
                batch.offset[mine],
                batch.segment[mine],
                (len(local), batch.width),
                self.tokenizer.pad_id,
            )
            logits = self._forward(
                self.params,
                *(
                    shd.global_batch(arrays[key], self._rows_sharding, batch.rows)
                    for key in ("ids", "segments", "positions")
                ),
            )
            return np.asarray(logits)[batch.row, batch.segment - 1]
        # One text a row, rows in order: this process's texts fill its rows from the first.
        ids, lens = tok.pad_batch(seqs, batch.width, len(local), self.tokenizer.pad_id)
        logits = self._forward(
            self.params,
            shd.global_batch(ids, self._rows_sharding, batch.rows),
            shd.global_batch(lens, self._lengths_sharding, batch.rows),
        )
        return np.asarray(logits)[batch.row]

    def plan(self, lengths: np.ndarray) -> list[ScoreBatch]:
        """Batches, longest texts first.

        Texts are placed into rows longest first (one a row, or packed: kernels.packing), a row
        as wide as the bucket of its first text (packed: at least ``PACKED_ROW_WIDTH``). A batch is as wide as its first row; a
        bucket's last, partial batch takes the smallest row tier that holds its rows, and
        spare rows take the next, narrower rows: a padding row costs as much as a real one.
        """
        widths = np.array([tok.bucket_for(int(n), self.buckets) for n in lengths], np.int64)
        if self.packing:
            widths = np.maximum(widths, min(self.PACKED_ROW_WIDTH, self.max_length))
        placed = packing.pack(lengths, widths, tok.ROW_SEGMENTS if self.packing else 1)
        by_row = np.argsort(placed.row, kind="stable")
        first_text = np.searchsorted(placed.row[by_row], np.arange(placed.rows + 1))
        batches, start = [], 0
        while start < placed.rows:
            width = int(placed.widths[start])
            in_bucket = int(np.searchsorted(-placed.widths, -width, side="right")) - start
            rows = next(r for r in self.row_tiers[width] if r >= min(in_bucket, self.rows[width]))
            stop = min(start + rows, placed.rows)
            texts = by_row[first_text[start] : first_text[stop]]
            batches.append(
                ScoreBatch(
                    texts,
                    placed.row[texts] - start,
                    placed.offset[texts],
                    placed.segment[texts],
                    width,
                    rows,
                )
            )
            start = stop
        return batches

    def rewards(self, texts: list[str]) -> np.ndarray:
        """Scalar rewards [n] (the first output)."""
        return self(texts)[:, 0]


def resolve_model_dir(path: str | Path) -> Path:
    """A run directory (its exported ``model/``) or a model directory itself."""
    path = Path(path)
    if (path / "model" / "config.json").is_file():
        return path / "model"
    if (path / "config.json").is_file():
        return path
    if (path / "run.json").is_file():
        raise DynrulesError(
            f"{path}: the run has no exported model yet (interrupted?); finish it with "
            f"`dynrules train-rm PAIRS --out {path}`"
        )
    raise DynrulesError(f"{path}: neither a training run nor a model directory")


@dataclasses.dataclass(frozen=True)
class ScoreSummary:
    """What ``score_file`` did (``dynrules score``): ``records`` scored and written,
    ``truncated`` texts cut to the model's max_length (from the start), wall ``seconds``."""

    records: int
    truncated: int
    seconds: float


def score_file(
    model: str | Path,
    input_path: str | Path,
    out_path: str | Path,
    *,
    batch_size: int = 64,
    chunk_records: int = 4096,
    mesh: str = "",
    distributed: bool = False,
) -> ScoreSummary:
    """Stream JSONL records through the reward model; write each with its ``reward`` added.

    Records carry ``prompt`` (optional) and ``response``, or a ``text`` transcript. The output
    is written to a temporary name and renamed when complete (by process 0 only, in a
    multi-process job: see :func:`dynrules.train.sharding.join_job` for ``distributed``).
    """
    from dynrules.atomic import atomic_path

    shd.join_job(distributed)
    scorer = Scorer.from_model_dir(model, mesh_spec=mesh, batch_size=batch_size)
    if scorer.spec.num_outputs != 1:
        raise DynrulesError(
            f"{model}: {scorer.spec.num_outputs} outputs; scoring needs a reward model"
        )
    started, count = time.perf_counter(), 0
    batch: list[tuple[dict, str]] = []

    def flush(handle):
        rewards = scorer.rewards([text for _, text in batch])
        if handle is not None:
            for (record, _), reward in zip(batch, rewards, strict=True):
                handle.write(
                    json.dumps(record | {"reward": float(reward)}, ensure_ascii=False) + "\n"
                )
        batch.clear()

    def stream(handle):
        nonlocal count
        for line, record in iter_raw_records(input_path):
            batch.append(
                (record, score_text(record, path=input_path, line=line, render=scorer.render))
            )
            count += 1
            if len(batch) == chunk_records:
                flush(handle)
        if batch:
            flush(handle)
        if count == 0:
            raise InputError("no records to score (empty file)", path=input_path)

    if shd.is_writer():
        with atomic_path(out_path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
            stream(handle)
    else:  # every process computes its share of each batch; only process 0 writes
        stream(None)
    seconds = time.perf_counter() - started
    return ScoreSummary(records=count, truncated=scorer.truncated, seconds=seconds)
