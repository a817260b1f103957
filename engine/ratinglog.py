"""A rating store's rating state: the done mask, the commit logs, failures and the writers' locks.

``dynrules rate`` writes through this module and ``dynrules select`` reads through it, so the
protocol lives in one place. Besides the usual arrays and pairs.parquet, a rated store holds::

    done/            zarr3 [N, R] uint8: 1 where the cell (pair, rule) is rated
    ratings.log      committed cells not yet folded into the arrays (binary records)
    ratings.I-of-N.log   the same for worker I of N of a sharded run (``rate --shard I/N``)
    failures.jsonl   one line per cell that could not be rated: pair id, rule id, reason
    .rating.lock     byte-range locks (fcntl): a writer holds the bytes of its rows

Commit protocol. A cell is committed the moment its result arrives, by appending one fixed-size
record (row, rule, s(A), s(B), relevance) to ``ratings.log`` with a single ``write``; kill -9
loses at most a torn last record, which replay drops. Every ``fold_every`` records and at the
end, the log is folded: its cells are written into scores_a / scores_b / relevance, then into
``done``, and only then is the log emptied. Folding is idempotent (a cell's value is fixed once
committed), so a kill inside a fold is repaired by folding the same log again on restart. A
restarted run therefore starts from exactly the committed cells, asks only for the others, and
ends with the same arrays as an uninterrupted run. Cells that fail stay not-done (and are asked
again by the next run); their reasons go to ``failures.jsonl``, never a 0 into the arrays.

Several workers. ``rate --shard I/N`` rates the rows [lo, hi) of its chunk-aligned share only:
it holds the lock on those rows (bytes lo…hi of the lock file), commits to its own log and folds
only that log, so no two workers ever write one chunk. A shard log that has been folded stays,
empty, as a mark that the manifest's done count does not include it yet. The final fold —
every log into the arrays, the count into the manifest, the shard logs removed — needs the
whole store's lock: the last worker to finish takes it (any worker still rating holds its rows,
so the lock fails for all but the last), and an unsharded ``rate`` does it too.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from dynrules.engine.store import RatingStore, quantize
from dynrules.errors import DynrulesError

DONE = "done"
LOG = "ratings.log"
SHARD_LOGS = "ratings.*-of-*.log"
FAILURES = "failures.jsonl"
LOCK = ".rating.lock"
RECORD = np.dtype(
    [("row", "<i8"), ("rule", "<i4"), ("a", "<f4"), ("b", "<f4"), ("relevance", "<f4")]
)
FOLD_EVERY = 1 << 18  # records (6 MiB of log) between folds into the arrays


class Locked(DynrulesError):
    """Another process holds rows this one wants to write."""


@contextmanager
def locked(path: Path, rows: tuple[int, int] | None = None):
    """Hold the store's rows [lo, hi) (None: the whole store) for writing, or raise Locked.

    POSIX record locks: they cover ranges, work across hosts on file systems with lock support
    (NFS with lockd, Lustre, GPFS) and are released when the process dies, even by kill -9.
    """
    handle = open(path / LOCK, "a")
    start, length = (0, 0) if rows is None else (rows[0], rows[1] - rows[0])
    try:
        try:
            if rows is None or length > 0:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
        except OSError:
            held = "rows of" if rows is None else f"rows {rows[0]}–{rows[1]} of"
            raise Locked(f"another process is rating {held} {path}") from None
        yield
    finally:
        handle.close()


def log_path(store: RatingStore, shard: tuple[int, int] | None = None) -> Path:
    """The commit log of the whole store, or of worker I of N."""
    return store.path / (LOG if shard is None else f"ratings.{shard[0]}-of-{shard[1]}.log")


def shard_logs(store: RatingStore) -> list[Path]:
    """Logs of sharded workers that no final fold has taken in yet."""
    return sorted(store.path.glob(SHARD_LOGS))


def open_log(store: RatingStore, shard: tuple[int, int] | None = None) -> int:
    """A file descriptor appending to a commit log (close it with ``os.close``)."""
    return os.open(log_path(store, shard), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def commit(log: int, row: int, rules, a, b, relevance) -> None:
    """Commit the cells (row, rules) with one ``write``: a kill tears at most the last record."""
    block = np.empty(len(rules), RECORD)
    block["row"], block["rule"] = row, rules
    block["a"], block["b"], block["relevance"] = a, b, relevance
    os.write(log, block.tobytes())


def read_log(store: RatingStore, shard: tuple[int, int] | None | str = "all") -> np.ndarray:
    """Committed, not yet folded records of every log (default), of the whole store's log
    (None) or of one worker's; a torn last record from a kill is dropped."""
    if isinstance(shard, str):
        if shard != "all":
            raise ValueError(f"shard must be (I, N), None or 'all', got {shard!r}")
        paths = [log_path(store), *shard_logs(store)]
    else:
        paths = [log_path(store, shard)]
    blocks = [np.empty(0, RECORD)]
    for path in paths:
        if path.exists():
            raw = path.read_bytes()
            whole = len(raw) - len(raw) % RECORD.itemsize
            blocks.append(np.frombuffer(raw[:whole], RECORD))
    return np.concatenate(blocks)


def fold(store: RatingStore, shard: tuple[int, int] | None = None) -> int:
    """Write committed cells into the arrays and the done mask, then empty the log(s).

    Without ``shard`` (the caller holds the whole store): every log, then the manifest's done
    count; the shard logs are removed. With ``shard`` (the caller holds its rows): that worker's
    own log only, and the manifest is left to the final fold.
    """
    records = read_log(store, "all" if shard is None else shard)
    if len(records):
        records = records[np.argsort(records["row"], kind="stable")]
        rows, rules = records["row"], records["rule"].astype(np.int64)
        window = store.chunk_rows
        bounds = np.flatnonzero(np.diff(rows // window)) + 1
        for part in np.split(np.arange(len(records)), bounds):
            lo, hi = int(rows[part[0]]), int(rows[part[-1]]) + 1
            local = (rows[part] - lo, rules[part])
            for name, field in (("scores_a", "a"), ("scores_b", "b"), ("relevance", "relevance")):
                block = store.array(name)[lo:hi].read().result()
                block[local] = quantize(records[field][part], store.dtype)
                store.array(name)[lo:hi].write(block).result()
            # The done mask last: a cell marked done always has its values written.
            done = store.array(DONE)[lo:hi].read().result()
            done[local] = 1
            store.array(DONE)[lo:hi].write(done).result()
    if shard is not None:
        if log_path(store, shard).exists():
            os.truncate(log_path(store, shard), 0)
        return len(records)
    done_cells = count_done(store)
    if store.manifest["rating"].get("done") != done_cells:
        store.manifest["rating"]["done"] = done_cells
        store.write_manifest()
    if log_path(store).exists():
        os.truncate(log_path(store), 0)
    for path in shard_logs(store):
        path.unlink()
    return len(records)


def fold_if_last(store: RatingStore) -> bool:
    """The final fold, if no other process holds any rows of the store; True if it was done."""
    try:
        with locked(store.path):
            fold(RatingStore.open(store.path))  # a fresh manifest: others' folds may be newer
    except Locked:
        return False
    return True


def count_done(store: RatingStore) -> int:
    total, done = 0, store.array(DONE)
    for lo in range(0, store.n_pairs, store.chunk_rows):
        hi = min(lo + store.chunk_rows, store.n_pairs)  # TensorStore raises on slices past the end
        total += int(np.count_nonzero(done[lo:hi].read().result()))
    return total


def read_done(store_path) -> np.ndarray:
    """The done mask [N, R] (bool) of a store, including committed cells not yet folded."""
    store = RatingStore.open(store_path)
    done = store.array(DONE)[...].read().result().astype(bool)
    records = read_log(store)
    done[records["row"], records["rule"]] = True
    return done
