"""`dynrules ingest`: scored pairs (JSONL or Parquet) into a rating store, streaming.

Scores must be finite and within [-1, 1], relevance within [0, 1], each row exactly R long
(R = the pool's size). The first bad value stops the ingest with an error naming the file,
the line (JSONL) or row (Parquet) and the field; the store is written under a temporary name
and renamed only when complete, so a failed or killed ingest leaves nothing behind.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dynrules.atomic import atomic_path
from dynrules.engine.pairs import (
    PUBLISHED_NAMES,
    TEXT_FIELDS,
    extra_fields,
    is_parquet,
    iter_raw_records,
    normalize,
)
from dynrules.engine.pool import RulePool
from dynrules.engine.store import CHUNK_ROWS, PairTableWriter, RatingStore
from dynrules.errors import InputError
from dynrules.output import progress_bar

BOUNDS = {"scores_a": (-1.0, 1.0), "scores_b": (-1.0, 1.0), "relevance": (0.0, 1.0)}


@dataclass
class Batch:
    lines: np.ndarray  # line (JSONL) or row (Parquet) number of each record, from 1
    pairs: dict[str, list | pa.Array]  # id, prompt, response_a, response_b and extra fields
    scores: dict[str, np.ndarray]  # scores_a, scores_b [, relevance], each [n, R] float


@dataclass(frozen=True)
class IngestSummary:
    """What ``dynrules ingest`` did."""

    pairs: int
    rules: int
    dtype: str
    relevance: bool
    seconds: float


def ingest(
    input_path, out, *, pool: RulePool, dtype: str = "float32", progress: bool = True
) -> IngestSummary:
    """Ingest scored pairs into a new store at ``out``; returns a summary."""
    input_path, started = Path(input_path), time.perf_counter()
    batches = (
        _parquet_batches(input_path, len(pool))
        if is_parquet(input_path)
        else _jsonl_batches(input_path, len(pool))
    )
    first = next(batches)
    has_relevance = "relevance" in first.scores
    total = pq.ParquetFile(input_path).metadata.num_rows if is_parquet(input_path) else None
    with atomic_path(out) as tmp:
        store = RatingStore.create(
            tmp, pool=pool, dtype=dtype, has_relevance=has_relevance, source=str(input_path)
        )
        writer = PairTableWriter(store.pairs_path)
        with progress_bar(total=total, unit="pair", desc="ingest", progress=progress) as bar:
            for batch in itertools.chain([first], batches):
                _validate(batch, input_path, has_relevance)
                store.append(
                    batch.scores["scores_a"],
                    batch.scores["scores_b"],
                    batch.scores.get("relevance"),
                )
                writer.write(batch.pairs)
                bar.update(len(batch.lines))
        writer.close()
        store.write_manifest()
        n_pairs = store.n_pairs
    return IngestSummary(
        pairs=n_pairs,
        rules=len(pool),
        dtype=dtype,
        relevance=has_relevance,
        seconds=round(time.perf_counter() - started, 3),
    )


def _validate(batch: Batch, path: Path, has_relevance: bool) -> None:
    if has_relevance != ("relevance" in batch.scores):
        line = int(batch.lines[0])
        raise InputError(
            "relevance must be given for every pair or for none",
            path=path,
            line=line,
            field="relevance",
        )
    for field, values in batch.scores.items():
        low, high = BOUNDS[field]
        bad = ~np.isfinite(values).all(axis=1)
        what = "is not finite (NaN or infinity)"
        if not bad.any():
            bad = ((values < low) | (values > high)).any(axis=1)
            what = f"is outside [{low:g}, {high:g}]"
        if bad.any():
            row = int(np.argmax(bad))
            column = int(
                np.argmax(~np.isfinite(values[row]) | (values[row] < low) | (values[row] > high))
            )
            raise InputError(
                f"value {values[row, column]!r} at rule index {column} {what}",
                path=path,
                line=int(batch.lines[row]),
                field=field,
            )


def _jsonl_batches(path: Path, n_rules: int) -> Iterator[Batch]:
    lines: list[int] = []
    pairs: list[dict] = []
    scores: dict[str, list[np.ndarray]] = {}
    fields: list[str] | None = None
    for position, (line, raw) in enumerate(iter_raw_records(path)):
        record = normalize(raw, position, path, line)
        row_fields = [f for f in ("scores_a", "scores_b", "relevance") if record.get(f) is not None]
        for required in ("scores_a", "scores_b"):
            if required not in row_fields:
                raise InputError("missing field", path=path, line=line, field=required)
        if fields is None:
            fields = row_fields
        elif row_fields != fields:
            raise InputError(
                "relevance must be given for every pair or for none",
                path=path,
                line=line,
                field="relevance",
            )
        for field in fields:
            value = record[field]
            if not isinstance(value, list) or len(value) != n_rules:
                size = len(value) if isinstance(value, list) else type(value).__name__
                raise InputError(
                    f"expected a list of {n_rules} numbers (the pool's size), got {size}",
                    path=path,
                    line=line,
                    field=field,
                )
            try:
                scores.setdefault(field, []).append(np.asarray(value, np.float64))
            except (TypeError, ValueError):
                raise InputError(
                    "scores must be numbers", path=path, line=line, field=field
                ) from None
        lines.append(line)
        pairs.append(
            {"id": record["id"], **{t: record[t] for t in TEXT_FIELDS}, **extra_fields(record)}
        )
        if len(lines) == CHUNK_ROWS:
            yield _jsonl_batch(lines, pairs, scores, path)
            lines, pairs, scores = [], [], {}
    if lines:
        yield _jsonl_batch(lines, pairs, scores, path)


def _jsonl_batch(lines, pairs, scores, path) -> Batch:
    columns = list(pairs[0])
    for line, record in zip(lines, pairs, strict=True):
        if list(record) != columns:
            raise InputError(
                f"fields differ from the first record's ({', '.join(columns)})",
                path=path,
                line=line,
            )
    return Batch(
        np.asarray(lines),
        {c: [r[c] for r in pairs] for c in columns},
        {f: np.stack(v) for f, v in scores.items()},
    )


def _parquet_batches(path: Path, n_rules: int) -> Iterator[Batch]:
    pf = pq.ParquetFile(path)
    if pf.metadata.num_rows == 0:
        raise InputError("empty file: no records", path=path)
    offset = 0
    for record_batch in pf.iter_batches(batch_size=CHUNK_ROWS):
        table = pa.Table.from_batches([record_batch])
        table = table.rename_columns([PUBLISHED_NAMES.get(c, c) for c in table.column_names])
        n = table.num_rows
        lines = np.arange(offset + 1, offset + n + 1)
        for required in (*TEXT_FIELDS, "scores_a", "scores_b"):
            if required not in table.column_names:
                raise InputError("missing column", path=path, field=required)
        scores = {
            f: _list_column(table.column(f), n_rules, path, f, offset)
            for f in ("scores_a", "scores_b", "relevance")
            if f in table.column_names
        }
        ids = (
            table.column("id").cast(pa.string())
            if "id" in table.column_names
            else pa.array([str(i) for i in range(offset, offset + n)])
        )
        pairs = {"id": ids, **{t: table.column(t) for t in TEXT_FIELDS}}
        for name in table.column_names:
            if (
                name not in pairs
                and name not in scores
                and not pa.types.is_nested(table.schema.field(name).type)
            ):
                pairs[name] = table.column(name)
        offset += n
        yield Batch(lines, pairs, scores)


def _list_column(
    column: pa.ChunkedArray, n_rules: int, path, field: str, offset: int
) -> np.ndarray:
    array = column.combine_chunks()
    if not (
        pa.types.is_list(array.type)
        or pa.types.is_large_list(array.type)
        or pa.types.is_fixed_size_list(array.type)
    ):
        raise InputError(f"expected a list column, got {array.type}", path=path, field=field)
    lengths = pc.list_value_length(array).fill_null(-1).to_numpy(zero_copy_only=False)
    wrong = lengths != n_rules
    if wrong.any():
        row = int(np.argmax(wrong))
        raise InputError(
            f"expected {n_rules} numbers (the pool's size), got {lengths[row]}",
            path=path,
            line=offset + row + 1,
            field=field,
        )
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False)
    return values.astype(np.float64, copy=False).reshape(len(array), n_rules)
