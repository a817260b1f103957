"""Rating pairs into a rating store with a judge, resumably (``dynrules rate``).

A store made by this module holds, besides the usual arrays and pairs.parquet (with every
scalar field of the input, such as ``truth``)::

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

Unrated cells hold 0 in the score arrays and 0 in ``done``; with a plan (rule ids per pair,
for example from the rule adapter) only the planned cells are rated.

The manifest records the judge and template; a store is only ever continued with the same
judge, template, rule pool and pairs.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dynrules.engine.atomic import atomic_path
from dynrules.engine.judges.base import Job, Judge, pair_cells
from dynrules.engine.pairs import TEXT_FIELDS, extra_fields, iter_raw_records, load_pairs
from dynrules.engine.pool import RulePool
from dynrules.engine.store import CHUNK_ROWS, PairTableWriter, RatingStore, create_array, quantize
from dynrules.errors import DynrulesError, InputError

DONE = "done"
LOG = "ratings.log"
FAILURES = "failures.jsonl"
LOCK = ".rating.lock"
RECORD = np.dtype(
    [("row", "<i8"), ("rule", "<i4"), ("a", "<f4"), ("b", "<f4"), ("relevance", "<f4")]
)
FOLD_EVERY = 1 << 18  # records (6 MiB of log) between folds into the arrays


def rate_pairs(
    pairs: str | os.PathLike | Sequence[dict],
    out: str | os.PathLike,
    *,
    pool: RulePool,
    judge: Judge,
    plan: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
    dtype: str = "float32",
    progress: bool = True,
    fold_every: int = FOLD_EVERY,
) -> dict:
    """Rate every (pair, rule) cell — or the planned ones — not yet done in the store at ``out``.

    Args:
        pairs: a JSONL/Parquet file of pairs (any shape :mod:`dynrules.engine.pairs` reads) or
            normalised records (``id``, ``prompt``, ``response_a``, ``response_b``, extra fields).
        out: the store; created when missing, continued when it exists.
        pool: the rule pool (the judge's pool).
        judge: any :class:`~dynrules.engine.judges.base.Judge`.
        plan: rule ids per pair id, as a JSONL file of ``{"id", "rule_ids"}`` or a mapping;
            pairs absent from the plan are not rated. None rates all rules of all pairs.
        dtype: stored dtype of a new store (float32, float16, int8).

    Returns:
        ``{"rated", "skipped_done", "failed", "seconds"}`` counted in cells (pair × rule) of
        this run, plus ``"pairs"``, ``"rules"``, ``"done"`` (cells done in the store) and
        ``"failures_file"``.
    """
    started = time.perf_counter()
    if judge.pool.content_hash != pool.content_hash:
        raise DynrulesError("the judge was built for a different rule pool than --pool")
    source = str(pairs) if isinstance(pairs, (str, os.PathLike)) else None
    records = load_pairs(pairs) if source is not None else list(pairs)
    if not records:
        raise InputError("no pairs to rate", path=source)
    out = Path(out)
    if out.exists() and not (out / "manifest.json").exists():
        raise InputError("exists and is not a rating store; choose a new --out", path=out)
    if not out.exists():
        _create(out, records, pool=pool, judge=judge, dtype=dtype, source=source)
    with _locked(out):
        store = RatingStore.open(out, pool=pool)
        _check_continuable(store, records, judge)
        fold(store)
        done = store.array(DONE)[...].read().result().astype(bool)
        wanted = _wanted_cells(plan, records, pool)
        todo_count = int((wanted & ~done).sum())
        skipped = int((wanted & done).sum())
        rated = failed = 0
        log = os.open(store.path / LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            with (
                open(store.path / FAILURES, "a", encoding="utf-8") as failures,
                tqdm(
                    total=todo_count, unit="cell", desc="rate", disable=not progress, smoothing=0.05
                ) as bar,
            ):
                pending = 0
                for result in judge.rate_jobs(pair_jobs(records, wanted & ~done, judge)):
                    rules, a, b, relevance = pair_cells(result)
                    block = np.empty(len(rules), RECORD)
                    block["row"], block["rule"] = result.job.row, rules
                    block["a"], block["b"], block["relevance"] = a, b, relevance
                    os.write(log, block.tobytes())
                    for column, reason in enumerate(result.errors):
                        if reason is not None:
                            rule_id = pool.ids[result.job.rules[column]]
                            failures.write(
                                json.dumps(
                                    {
                                        "id": records[result.job.row]["id"],
                                        "rule_id": rule_id,
                                        "reason": reason,
                                    }
                                )
                                + "\n"
                            )
                    failures.flush()
                    n_failed = len(result.errors) - len(rules)
                    rated, failed, pending = (
                        rated + len(rules),
                        failed + n_failed,
                        pending + len(rules),
                    )
                    bar.update(len(result.errors))
                    if n_failed:
                        bar.set_postfix(failed=failed)
                    if pending >= fold_every:
                        fold(store)
                        pending = 0
        finally:
            os.close(log)
            fold(store)
        done_cells = int(store.manifest["rating"]["done"])
    return {
        "rated": rated,
        "skipped_done": skipped,
        "failed": failed,
        "seconds": round(time.perf_counter() - started, 3),
        "pairs": len(records),
        "rules": len(pool),
        "done": done_cells,
        "failures_file": str(store.path / FAILURES),
    }


# -- the store's extra parts ------------------------------------------------------------------


def pairs_fingerprint(records: Sequence[dict]) -> str:
    """SHA-256 over the pairs' ids and texts, in order: a store continues only the same pairs."""
    digest = hashlib.sha256()
    for record in records:
        for field in ("id", *TEXT_FIELDS):
            value = str(record[field]).encode()
            digest.update(len(value).to_bytes(8, "little") + value)
    return digest.hexdigest()


def _create(
    out: Path, records: Sequence[dict], *, pool: RulePool, judge: Judge, dtype: str, source
) -> None:
    """A new, empty store with pairs.parquet and the done mask, appearing all at once."""
    with atomic_path(out, overwrite=False) as tmp:
        identity = judge.identity
        store = RatingStore.create(
            tmp,
            pool=pool,
            dtype=dtype,
            has_relevance=True,
            n_pairs=len(records),
            source=source,
            judge=identity["judge"],
            template=identity["template"],
        )
        create_array(tmp / DONE, [len(records), len(pool)], "uint8", chunk_rows=store.chunk_rows)
        _write_pair_table(store, records)
        store.manifest["rating"] = {"pairs_sha256": pairs_fingerprint(records), "done": 0}
        store.write_manifest()


def _write_pair_table(store: RatingStore, records: Sequence[dict]) -> None:
    extras = [extra_fields(r) for r in records]
    names = list(dict.fromkeys(name for fields in extras for name in fields))
    writer = PairTableWriter(store.pairs_path)
    for start in range(0, len(records), CHUNK_ROWS):
        chunk = range(start, min(start + CHUNK_ROWS, len(records)))
        columns = {"id": [str(records[i]["id"]) for i in chunk]}
        columns.update({f: [records[i][f] for i in chunk] for f in TEXT_FIELDS})
        columns.update({n: [extras[i].get(n) for i in chunk] for n in names})
        writer.write(columns)
    writer.close()


def _check_continuable(store: RatingStore, records: Sequence[dict], judge: Judge) -> None:
    rating = store.manifest.get("rating")
    if rating is None or not (store.path / DONE).exists():
        raise InputError(
            "this store was not made by `dynrules rate` (no done mask); rate into a new --out",
            path=store.path,
        )
    identity = judge.identity
    for field in ("judge", "template"):
        if store.manifest.get(field) != identity[field]:
            raise InputError(
                f"store was rated with {field} {store.manifest.get(field)!r}, not {identity[field]!r}; "
                "rate into a new --out",
                path=store.path,
                field=field,
            )
    if rating["pairs_sha256"] != pairs_fingerprint(records):
        raise InputError(
            "store was created for different pairs (ids or texts differ); rate into a new --out",
            path=store.path,
            field="pairs",
        )


@contextmanager
def _locked(path: Path):
    handle = open(path / LOCK, "a")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DynrulesError(f"another process is rating into {path}") from None
        yield
    finally:
        handle.close()


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
    done_cells = _count_done(store)
    if store.manifest["rating"].get("done") != done_cells:
        store.manifest["rating"]["done"] = done_cells
        store.write_manifest()
    if (store.path / LOG).exists():
        os.truncate(store.path / LOG, 0)
    return len(records)


def _count_done(store: RatingStore) -> int:
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


# -- the work ---------------------------------------------------------------------------------


def _wanted_cells(plan, records: Sequence[dict], pool: RulePool) -> np.ndarray:
    wanted = np.zeros((len(records), len(pool)), bool)
    if plan is None:
        wanted[:] = True
        return wanted
    for row, rules in load_plan(plan, records, pool).items():
        wanted[row, rules] = True
    return wanted


def load_plan(plan, records: Sequence[dict], pool: RulePool) -> dict[int, np.ndarray]:
    """{store row: rule indices} from a plan file (JSONL ``{"id", "rule_ids"}``) or a mapping."""
    row_of: dict[str, int] = {}
    duplicated = set()
    for row, record in enumerate(records):
        key = str(record["id"])
        if key in row_of:
            duplicated.add(key)
        row_of[key] = row
    if isinstance(plan, Mapping):
        entries = [(None, {"id": k, "rule_ids": v}) for k, v in plan.items()]
        path = None
    else:
        path = Path(plan)
        entries = list(iter_raw_records(path))
    out: dict[int, np.ndarray] = {}
    for line, entry in entries:
        pair_id = entry.get("id")
        if pair_id is None:
            raise InputError("missing field", path=path, line=line, field="id")
        pair_id = str(pair_id)
        if pair_id not in row_of:
            raise InputError(
                f"no pair with id {pair_id!r} in the pairs", path=path, line=line, field="id"
            )
        if pair_id in duplicated:
            raise InputError(
                f"pair id {pair_id!r} is not unique in the pairs, so a plan can not name it",
                path=path,
                line=line,
                field="id",
            )
        rule_ids = entry.get("rule_ids")
        if not isinstance(rule_ids, list) or not all(isinstance(r, str) for r in rule_ids):
            raise InputError(
                "expected a list of rule id strings", path=path, line=line, field="rule_ids"
            )
        unknown = [r for r in rule_ids if r not in pool.ids]
        if unknown:
            raise InputError(
                f"unknown rule ids for pool {pool.name!r}: {', '.join(unknown[:5])}",
                path=path,
                line=line,
                field="rule_ids",
            )
        row = row_of[pair_id]
        if row in out:
            raise InputError(
                f"pair id {pair_id!r} is planned twice", path=path, line=line, field="id"
            )
        out[row] = np.array(sorted({pool.index_of(r) for r in rule_ids}), np.int64)
    return out


def pair_jobs(records: Sequence[dict], todo: np.ndarray, judge: Judge) -> Iterator[Job]:
    """Jobs for the ``todo`` cells [N, R], a pair at a time, each of at most the judge's
    ``rules_per_job`` rules (read per pair: a judge may change it once it knows its server)."""
    for row in np.flatnonzero(todo.any(axis=1)).tolist():
        rules = np.flatnonzero(todo[row])
        record = records[row]
        size = judge.rules_per_job
        for start in range(0, len(rules), size):
            yield Job(
                row,
                record["prompt"],
                (record["response_a"], record["response_b"]),
                rules[start : start + size],
            )
