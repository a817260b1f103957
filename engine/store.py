"""The rating store: TensorStore zarr3 arrays of rule ratings, streamed out of core.

Layout of a store directory::

    manifest.json      format, version, pool (name, hash, ids), dtype, rules R, pairs N,
                       relevance present, source, judge, template
    scores_a/          zarr3 [N, R]: s_i(x, A) per pair and rule
    scores_b/          zarr3 [N, R]: s_i(x, B)
    relevance/         zarr3 [N, R], optional: relevance_i(x) in [0, 1]
    pairs.parquet      pair metadata: id, prompt, response_a, response_b and any extra
                       scalar fields (a human label such as ``truth``); one row group per chunk
    selections/NAME/   outputs of ``dynrules select``: index [N, k] int16, margin [N] float32

Arrays are chunked along N only (a row of all R rules is the unit every kernel reads) and kept
in few files by the sharding_indexed codec. Stored dtype is float32, float16 or int8; int8 holds
round(127·s), so ``scale`` turns stored units back into [-1, 1]. Reads never load the whole array:
:meth:`RatingStore.iter_chunks` issues the next chunk's read before yielding the current one, so
I/O overlaps with compute, and can read into two sets of buffers taken in turn (no allocation per
chunk). Slices past the end are clamped (TensorStore raises on them).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorstore as ts

from dynrules.engine.pool import RulePool
from dynrules.errors import DynrulesError, InputError

FORMAT = "dynrules-rating-store"
VERSION = 1
DTYPES = {"float32": np.float32, "float16": np.float16, "int8": np.int8}
INT8_UNITS = 127.0
SCORE_ARRAYS = ("scores_a", "scores_b")
RELEVANCE = "relevance"
PAIRS_FILE = "pairs.parquet"
MANIFEST = "manifest.json"

# Rows per stored chunk (the unit of reads) and per shard file (the unit of files on disk).
CHUNK_ROWS = 8192
SHARD_ROWS = 8 * CHUNK_ROWS

_CONTEXT = None


def _context() -> ts.Context:
    # One shared context: bounded copy concurrency, no cache (we stream each chunk once), and
    # files read through memory maps: one copy out of the page cache instead of two (pread,
    # then decode), a quarter less CPU per float32 pair read.
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = ts.Context(
            {
                "cache_pool": {"total_bytes_limit": 0},
                "data_copy_concurrency": {"limit": os.cpu_count() or 1},
                "file_io_mode": {"mode": "memmap"},
            }
        )
    return _CONTEXT


def _spec(path: Path, shape, dtype: str, chunk_rows: int) -> dict:
    # A shard file holds whole chunks: SHARD_ROWS rounded down to a multiple of chunk_rows.
    shard_rows = max(chunk_rows, (SHARD_ROWS // chunk_rows) * chunk_rows)
    inner = [chunk_rows, *shape[1:]]
    outer = [shard_rows, *shape[1:]]
    return {
        "driver": "zarr3",
        "kvstore": {"driver": "file", "path": str(path)},
        "metadata": {
            "shape": list(shape),
            "data_type": dtype,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": outer}},
            "codecs": [
                {
                    "name": "sharding_indexed",
                    "configuration": {
                        "chunk_shape": inner,
                        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
                        "index_codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {"name": "crc32c"},
                        ],
                    },
                }
            ],
        },
    }


def create_array(path: Path, shape, dtype: str, *, chunk_rows: int = CHUNK_ROWS) -> ts.TensorStore:
    """Create (or replace) a zarr3 array chunked along its first axis."""
    return ts.open(
        _spec(path, shape, dtype, chunk_rows),
        create=True,
        delete_existing=True,
        context=_context(),
    ).result()


def open_or_create_array(
    path: Path, shape, dtype: str, *, chunk_rows: int = CHUNK_ROWS
) -> ts.TensorStore:
    """Open an existing array of this shape or create it; several shard writers may race here."""
    spec = _spec(path, shape, dtype, chunk_rows)
    return ts.open(spec, create=True, open=True, context=_context()).result()


def open_array(path: Path) -> ts.TensorStore:
    return ts.open(
        {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}, context=_context()
    ).result()


def quantize(values: np.ndarray, dtype: str) -> np.ndarray:
    """Scores in [-1, 1] (or relevance in [0, 1]) to the stored dtype; int8 = round(127·s)."""
    if dtype == "int8":
        return np.rint(np.asarray(values, np.float32) * INT8_UNITS).astype(np.int8)
    return np.asarray(values, DTYPES[dtype])


def to_kernel_dtype(stored: np.ndarray) -> np.ndarray:
    """Kernels take float32 or int8; float16 is widened per chunk (Numba has no CPU float16)."""
    return stored.astype(np.float32) if stored.dtype == np.float16 else stored


def shard_range(n_pairs: int, shard: tuple[int, int], align: int) -> tuple[int, int]:
    """Rows [start, stop) of shard i of n, cut at multiples of ``align`` (the store's chunk)."""
    i, count = shard
    if not (count >= 1 and 0 <= i < count):
        raise DynrulesError(f"bad shard {i}/{count}: need 0 <= I < N")
    n_chunks = -(-n_pairs // align)
    lo, hi = (n_chunks * i) // count, (n_chunks * (i + 1)) // count
    return min(lo * align, n_pairs), min(hi * align, n_pairs)


@dataclass
class Chunk:
    start: int
    scores_a: np.ndarray
    scores_b: np.ndarray
    relevance: np.ndarray | None

    @property
    def stop(self) -> int:
        return self.start + self.scores_a.shape[0]


class RatingStore:
    """A rating store on disk. Create with :meth:`create`, open with :meth:`open`."""

    def __init__(self, path: Path, manifest: dict):
        self.path = Path(path)
        self.manifest = manifest
        self._arrays: dict[str, ts.TensorStore] = {}

    # -- creation and opening ------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        path,
        *,
        pool: RulePool,
        dtype: str = "float32",
        has_relevance: bool = False,
        n_pairs: int = 0,
        source: str | None = None,
        judge: str | None = None,
        template: str | None = None,
        chunk_rows: int = CHUNK_ROWS,
    ) -> RatingStore:
        if dtype not in DTYPES:
            raise DynrulesError(f"unknown store dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "format": FORMAT,
            "version": VERSION,
            "pool": pool.to_dict(),
            "dtype": dtype,
            "rules": len(pool),
            "pairs": int(n_pairs),
            "relevance": bool(has_relevance),
            "chunk_rows": int(chunk_rows),
            "source": source,
            "judge": judge,
            "template": template,
        }
        store = cls(path, manifest)
        names = SCORE_ARRAYS + ((RELEVANCE,) if has_relevance else ())
        for name in names:
            store._arrays[name] = create_array(
                path / name, [n_pairs, len(pool)], dtype, chunk_rows=chunk_rows
            )
        store.write_manifest()
        return store

    @classmethod
    def open(cls, path, *, pool: RulePool | None = None) -> RatingStore:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise InputError("not a rating store (no manifest.json)", path=path)
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"unreadable manifest: {exc}", path=manifest_path) from None
        if manifest.get("format") != FORMAT:
            raise InputError(
                f"not a rating store (format {manifest.get('format')!r})", path=manifest_path
            )
        store = cls(path, manifest)
        if pool is not None:
            store.check_pool(pool)
        return store

    def check_pool(self, pool: RulePool) -> None:
        stored = self.manifest["pool"]
        if stored["hash"] != pool.content_hash:
            raise InputError(
                f"store was written with rule pool {stored['name']!r} (hash {stored['hash'][:12]}), "
                f"not with {pool.name!r} (hash {pool.content_hash[:12]})",
                path=self.path,
                field="pool",
            )

    def write_manifest(self) -> None:
        tmp = self.path / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(self.manifest, indent=2) + "\n")
        os.replace(tmp, self.path / MANIFEST)

    # -- properties -----------------------------------------------------------------------------

    @property
    def n_pairs(self) -> int:
        return int(self.manifest["pairs"])

    @property
    def n_rules(self) -> int:
        return int(self.manifest["rules"])

    @property
    def dtype(self) -> str:
        return self.manifest["dtype"]

    @property
    def has_relevance(self) -> bool:
        return bool(self.manifest["relevance"])

    @property
    def rule_ids(self) -> list[str]:
        return list(self.manifest["pool"]["ids"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest.get("chunk_rows", CHUNK_ROWS))

    @property
    def scale(self) -> float:
        """Multiply stored values by this to get scores in [-1, 1] / relevance in [0, 1]."""
        return 1.0 / INT8_UNITS if self.dtype == "int8" else 1.0

    def array(self, name: str) -> ts.TensorStore:
        if name not in self._arrays:
            if not (self.path / name).exists():
                raise InputError(f"store has no array {name!r}", path=self.path)
            self._arrays[name] = open_array(self.path / name)
        return self._arrays[name]

    # -- writing --------------------------------------------------------------------------------

    def append(
        self, scores_a: np.ndarray, scores_b: np.ndarray, relevance: np.ndarray | None = None
    ) -> None:
        """Append rows (given in score units) at the end, growing the arrays."""
        start = self.n_pairs
        stop = start + scores_a.shape[0]
        for name in self._present():
            self._arrays[name] = (
                self.array(name).resize(exclusive_max=[stop, None], expand_only=True).result()
            )
        self.manifest["pairs"] = stop
        self.write_rows(start, scores_a, scores_b, relevance)

    def write_rows(self, start: int, scores_a, scores_b, relevance=None) -> None:
        """Write rows [start, start + n) in score units; quantised to the stored dtype."""
        stop = start + scores_a.shape[0]
        futures = [
            self.array("scores_a")[start:stop].write(quantize(scores_a, self.dtype)),
            self.array("scores_b")[start:stop].write(quantize(scores_b, self.dtype)),
        ]
        if self.has_relevance:
            if relevance is None:
                raise DynrulesError("this store holds relevance: rows must come with relevance")
            futures.append(self.array(RELEVANCE)[start:stop].write(quantize(relevance, self.dtype)))
        for future in futures:
            future.result()

    def _present(self) -> tuple[str, ...]:
        return SCORE_ARRAYS + ((RELEVANCE,) if self.has_relevance else ())

    # -- reading --------------------------------------------------------------------------------

    def clamp(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.n_pairs if stop is None else min(stop, self.n_pairs)
        return min(max(start, 0), stop), stop

    def _read_futures(self, start: int, stop: int):
        return [self.array(name)[start:stop, :].read() for name in self._present()]

    def read(self, start: int = 0, stop: int | None = None) -> Chunk:
        """Rows [start, stop) in the stored dtype (clamped to the store)."""
        start, stop = self.clamp(start, stop)
        arrays = [f.result() for f in self._read_futures(start, stop)]
        return Chunk(start, arrays[0], arrays[1], arrays[2] if self.has_relevance else None)

    def iter_chunks(
        self,
        start: int = 0,
        stop: int | None = None,
        rows: int | None = None,
        *,
        reuse_buffers: bool = False,
    ) -> Iterator[Chunk]:
        """Stream rows [start, stop) chunk by chunk, the next read in flight while one is used.

        With ``reuse_buffers`` chunks are read into two sets of arrays taken in turn, so nothing
        is allocated per chunk (fresh pages cost TensorStore's float32 reads a third of their
        CPU); a chunk's arrays are then overwritten once the next chunk is asked for: use each
        chunk before asking for the next, and keep nothing of it.
        """
        start, stop = self.clamp(start, stop)
        rows = rows or self.chunk_rows
        bounds = [(lo, min(lo + rows, stop)) for lo in range(start, stop, rows)]
        names = self._present()
        if reuse_buffers and bounds:
            shape = (bounds[0][1] - bounds[0][0], self.n_rules)
            buffers = [[np.empty(shape, DTYPES[self.dtype]) for _ in names] for _ in range(2)]
            targets = [
                [ts.array(b, copy=False, write=True, context=_context()) for b in turn]
                for turn in buffers
            ]

        def issue(i):
            lo, hi = bounds[i]
            if not reuse_buffers:
                return self._read_futures(lo, hi)
            return [
                target[: hi - lo].write(self.array(name)[lo:hi])
                for target, name in zip(targets[i % 2], names, strict=True)
            ]

        def arrays(i, futures):
            results = [f.result() for f in futures]
            if not reuse_buffers:
                return results
            lo, hi = bounds[i]
            return [b[: hi - lo] for b in buffers[i % 2]]

        pending = issue(0) if bounds else None
        for index, (lo, _hi) in enumerate(bounds):
            current = pending
            pending = issue(index + 1) if index + 1 < len(bounds) else None
            got = arrays(index, current)
            yield Chunk(lo, got[0], got[1], got[2] if self.has_relevance else None)

    # -- pair metadata --------------------------------------------------------------------------

    @property
    def pairs_path(self) -> Path:
        return self.path / PAIRS_FILE

    def pair_columns(self) -> list[str]:
        if not self.pairs_path.exists():
            return []
        return pq.read_schema(self.pairs_path).names

    def read_pairs(
        self, start: int = 0, stop: int | None = None, columns: list[str] | None = None
    ) -> pa.Table:
        """Pair metadata rows [start, stop), reading only the row groups that cover them."""
        start, stop = self.clamp(start, stop)
        if not self.pairs_path.exists():
            raise InputError("store has no pair metadata (pairs.parquet)", path=self.path)
        pf = pq.ParquetFile(self.pairs_path)
        groups, first, offset = [], None, 0
        for g in range(pf.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset + n > start and offset < stop:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        if first is None:  # no row group covers [start, stop)
            return (
                pf.schema_arrow.empty_table().select(columns)
                if columns
                else pf.schema_arrow.empty_table()
            )
        table = pf.read_row_groups(groups, columns=columns)
        return table.slice(start - first, stop - start)

    def read_field(self, name: str) -> np.ndarray:
        """One scalar pair field for all pairs (for example the human label ``truth``)."""
        if name not in self.pair_columns():
            raise InputError(
                f"store has no pair field {name!r} (fields: {', '.join(self.pair_columns()) or 'none'})",
                path=self.path,
                field=name,
            )
        return (
            pq.read_table(self.pairs_path, columns=[name])
            .column(name)
            .to_numpy(zero_copy_only=False)
        )


class PairTableWriter:
    """Streams pair metadata into a store's pairs.parquet, one row group per written batch."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._writer: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def write(self, records: dict[str, list]) -> None:
        table = (
            pa.table(records) if self._schema is None else pa.table(records, schema=self._schema)
        )
        if self._writer is None:
            self._schema = table.schema
            self._writer = pq.ParquetWriter(self.path, self._schema)
        self._writer.write_table(table)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
