"""A rating store's rating state: the done mask, the commit log, failures and the writer's lock.

``dynrules rate`` writes through this module and ``dynrules select`` reads through it, so the
protocol lives in one place. Besides the usual arrays and pairs.parquet, a rated store holds::

    done/            zarr3 [N, R] uint8: 1 where the cell (pair, rule) is rated
    ratings.log      committed cells not yet folded into the arrays (binary records)
    failures.jsonl   one line per cell that could not be rated: pair id, rule id, reason
    .rating.lock     held (flock) by the one process rating this store

Commit protocol. A cell is committed the moment its result arrives, by appending one fixed-size
record (row, rule, s(A), s(B), relevance) to ``ratings.log`` with a single ``write``; kill -9
loses at most a torn last record, which replay drops. Every ``fold_every`` records and at the
end, the log is folded: its cells are written into scores_a / scores_b / relevance, then into
``done``, and only then is the log emptied. Folding is idempotent (a cell's value is fixed once
committed), so a kill inside a fold is repaired by folding the same log again on restart. A
restarted run therefore starts from exactly the committed cells, asks only for the others, and
ends with the same arrays as an uninterrupted run. Cells that fail stay not-done (and are asked
again by the next run); their reasons go to ``failures.jsonl``, never a 0 into the arrays.
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
FAILURES = "failures.jsonl"
LOCK = ".rating.lock"
RECORD = np.dtype(
    [("row", "<i8"), ("rule", "<i4"), ("a", "<f4"), ("b", "<f4"), ("relevance", "<f4")]
)
FOLD_EVERY = 1 << 18  # records (6 MiB of log) between folds into the arrays


@contextmanager
def locked(path: Path):
    handle = open(path / LOCK, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DynrulesError(f"another process is rating into {path}") from None
        yield
    finally:
        handle.close()


def open_log(store: RatingStore) -> int:
    """A file descriptor appending to the store's commit log (close it with ``os.close``)."""
    return os.open(store.path / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)


def commit(log: int, row: int, rules, a, b, relevance) -> None:
    """Commit the cells (row, rules) with one ``write``: a kill tears at most the last record."""
    block = np.empty(len(rules), RECORD)
    block["row"], block["rule"] = row, rules
    block["a"], block["b"], block["relevance"] = a, b, relevance
    os.write(log, block.tobytes())


def read_log(store: RatingStore) -> np.ndarray:
    """The committed, not yet folded records (a torn last record from a kill is dropped)."""
    path = store.path / LOG
    if not path.exists():
        return np.empty(0, RECORD)
    raw = path.read_bytes()
    whole = len(raw) - len(raw) % RECORD.itemsize
    return np.frombuffer(raw[:whole], RECORD)


def fold(store: RatingStore) -> int:
    """Write the log's cells into the arrays and the done mask, then empty the log."""
    records = read_log(store)
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
    done_cells = count_done(store)
    if store.manifest["rating"].get("done") != done_cells:
        store.manifest["rating"]["done"] = done_cells
        store.write_manifest()
    if (store.path / LOG).exists():
        os.truncate(store.path / LOG, 0)
    return len(records)


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
