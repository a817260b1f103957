"""Rating pairs into a rating store with a judge, resumably (``dynrules rate``).

The store's rating state (done mask, commit log, failures, lock) and its commit protocol are
:mod:`dynrules.engine.ratinglog`'s.

Unrated cells hold 0 in the score arrays and 0 in ``done``; with a plan (rule ids per pair,
for example from the rule adapter) only the planned cells are rated.

The manifest records the judge and template; a store is only ever continued with the same
judge, template, rule pool and pairs.

Several workers (``shard=(I, N)``, ``dynrules rate --shard I/N``), each with its own judge
server, fill one store: worker I rates only its chunk-aligned rows (the split ``select --shard``
uses), commits and folds through its own log under its own row lock, and the last worker to
finish folds the store (:mod:`dynrules.engine.ratinglog`). The store is then the one a single
worker makes. Workers may start together: the first creates the store, the others continue it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dynrules.atomic import atomic_path
from dynrules.engine import ratinglog
from dynrules.engine.judges.base import Job, Judge, pair_cells
from dynrules.engine.pairs import TEXT_FIELDS, extra_fields, iter_raw_records, load_pairs
from dynrules.engine.pool import RulePool
from dynrules.engine.store import (
    CHUNK_ROWS,
    PairTableWriter,
    RatingStore,
    create_array,
    shard_range,
)
from dynrules.errors import DynrulesError, InputError
from dynrules.output import progress_bar


@dataclass(frozen=True)
class RatingSummary:
    """What one ``rate_pairs`` run did (``dynrules rate``). Counts are cells (pair × rule).

    ``rated``, ``skipped_done`` and ``failed`` count this run's wanted cells: rated now, found
    already done, and left unrated by the judge (reasons in ``failures_file``, one JSON line
    each). ``seconds`` is this run's wall time. ``pairs`` and ``rules`` give the store's shape,
    ``rows`` the rows [lo, hi) this run was responsible for, and ``done`` the cells done in the
    whole store after it (None while other workers of a sharded run are unfinished).
    """

    rated: int
    skipped_done: int
    failed: int
    seconds: float
    pairs: int
    rules: int
    rows: tuple[int, int]
    done: int | None
    failures_file: str

    def to_json(self) -> dict:
        """The ``dynrules rate --json`` object."""
        return {
            "rated": self.rated,
            "skipped_done": self.skipped_done,
            "failed": self.failed,
            "seconds": self.seconds,
        }


def rate_pairs(
    pairs: str | os.PathLike | Sequence[dict],
    out: str | os.PathLike,
    *,
    pool: RulePool,
    judge: Judge,
    plan: str | os.PathLike | Mapping[str, Sequence[str]] | None = None,
    dtype: str = "float32",
    progress: bool = True,
    fold_every: int = ratinglog.FOLD_EVERY,
    shard: tuple[int, int] | None = None,
    chunk_rows: int = CHUNK_ROWS,
) -> RatingSummary:
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
        shard: (I, N) to rate only worker I's share of the rows, beside N − 1 other workers.
        chunk_rows: rows per stored chunk of a new store (the unit of reads and of shards).
    """
    started = time.perf_counter()
    shard = None if shard is None or shard[1] == 1 else shard
    if judge.pool.content_hash != pool.content_hash:
        raise DynrulesError("the judge was built for a different rule pool than --pool")
    source: str | None = None
    if isinstance(pairs, (str, os.PathLike)):
        source, records = str(pairs), load_pairs(pairs)
    else:
        records = list(pairs)
    if not records:
        raise InputError("no pairs to rate", path=source)
    out = Path(out)
    store = _open_or_create(
        out, records, pool=pool, judge=judge, dtype=dtype, source=source, chunk_rows=chunk_rows
    )
    lo, hi = (
        (0, len(records)) if shard is None else shard_range(len(records), shard, store.chunk_rows)
    )
    with ratinglog.locked(out, None if shard is None else (lo, hi)):
        ratinglog.fold(store, shard)
        done = _done_rows(store, lo, hi)
        wanted = _wanted_cells(plan, records, pool)
        wanted[:lo] = wanted[hi:] = False
        rated, failed = _rate_cells(
            store,
            records,
            pool,
            judge,
            wanted & ~done,
            shard=shard,
            fold_every=fold_every,
            progress=progress,
        )
    return RatingSummary(
        rated=rated,
        skipped_done=int((wanted & done).sum()),
        failed=failed,
        seconds=round(time.perf_counter() - started, 3),
        pairs=len(records),
        rules=len(pool),
        rows=(lo, hi),
        done=_done_cells(store, shard),
        failures_file=str(store.path / ratinglog.FAILURES),
    )


def _open_or_create(
    out: Path,
    records: Sequence[dict],
    *,
    pool: RulePool,
    judge: Judge,
    dtype: str,
    source,
    chunk_rows: int,
) -> RatingStore:
    """The store at ``out``, created first when missing, checked to be the one to continue."""
    if out.exists() and not (out / "manifest.json").exists():
        raise InputError("exists and is not a rating store; choose a new --out", path=out)
    if not out.exists():
        try:
            _create(
                out,
                records,
                pool=pool,
                judge=judge,
                dtype=dtype,
                source=source,
                chunk_rows=chunk_rows,
            )
        except FileExistsError:
            pass  # another worker created it first: continued below like any store
    store = RatingStore.open(out, pool=pool)
    _check_continuable(store, records, judge)
    return store


def _rate_cells(
    store: RatingStore,
    records: Sequence[dict],
    pool: RulePool,
    judge: Judge,
    todo: np.ndarray,
    *,
    shard,
    fold_every: int,
    progress: bool,
) -> tuple[int, int]:
    """Rate the ``todo`` cells [N, R]: each pair's ratings are committed to the log as they come
    and the log is folded every ``fold_every`` cells and at the end. Returns (rated, failed)."""
    rated = failed = pending = 0
    log = ratinglog.open_log(store, shard)
    try:
        with (
            open(store.path / ratinglog.FAILURES, "a", encoding="utf-8") as failures,
            progress_bar(
                total=int(todo.sum()),
                unit="cell",
                desc="rate",
                progress=progress,
                smoothing=0.05,
            ) as bar,
        ):
            for result in judge.rate_jobs(pair_jobs(records, todo, judge)):
                rules, a, b, relevance = pair_cells(result)
                ratinglog.commit(log, result.job.row, rules, a, b, relevance)
                _write_failures(failures, result, records[result.job.row]["id"], pool)
                n_failed = len(result.errors) - len(rules)
                rated, failed, pending = rated + len(rules), failed + n_failed, pending + len(rules)
                bar.update(len(result.errors))
                if n_failed:
                    bar.set_postfix(failed=failed)
                if pending >= fold_every:
                    ratinglog.fold(store, shard)
                    pending = 0
    finally:
        os.close(log)
        ratinglog.fold(store, shard)
    return rated, failed


def _write_failures(handle, result, pair_id, pool: RulePool) -> None:
    """One JSON line per cell of ``result`` the judge failed to rate, with its reason."""
    for column, reason in enumerate(result.errors):
        if reason is not None:
            rule_id = pool.ids[result.job.rules[column]]
            handle.write(json.dumps({"id": pair_id, "rule_id": rule_id, "reason": reason}) + "\n")
    handle.flush()


def _done_cells(store: RatingStore, shard) -> int | None:
    """Cells done in the whole store; a sharded worker folds it only when it is the last out,
    and otherwise leaves that (and the count) to the last one."""
    if shard is None:
        return int(store.manifest["rating"]["done"])
    if ratinglog.fold_if_last(store):
        return int(RatingStore.open(store.path).manifest["rating"]["done"])
    return None


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
    out: Path,
    records: Sequence[dict],
    *,
    pool: RulePool,
    judge: Judge,
    dtype: str,
    source,
    chunk_rows: int = CHUNK_ROWS,
) -> None:
    """A new, empty store with pairs.parquet and the done mask, appearing all at once.

    FileExistsError if another process made ``out`` meanwhile (never replaced).
    """
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
            chunk_rows=chunk_rows,
        )
        create_array(
            tmp / ratinglog.DONE, [len(records), len(pool)], "uint8", chunk_rows=store.chunk_rows
        )
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
    if rating is None or not (store.path / ratinglog.DONE).exists():
        raise InputError(
            "this store was not made by `dynrules rate` (no done mask); rate into a new --out",
            path=store.path,
        )
    identity = judge.identity
    for field in ("judge", "template"):
        if store.manifest.get(field) != identity[field]:
            hint = (
                " (stores rated with the default template before 2026-12 continue with "
                "--template question-last)"
                if field == "template"
                else ""
            )
            raise InputError(
                f"store was rated with {field} {store.manifest.get(field)!r}, not {identity[field]!r}; "
                f"rate into a new --out{hint}",
                path=store.path,
                field=field,
            )
    if rating["pairs_sha256"] != pairs_fingerprint(records):
        raise InputError(
            "store was created for different pairs (ids or texts differ); rate into a new --out",
            path=store.path,
            field="pairs",
        )


# -- the work ---------------------------------------------------------------------------------


def _done_rows(store: RatingStore, lo: int, hi: int) -> np.ndarray:
    """[N, R] done mask, valid for rows [lo, hi): the arrays' and cells committed in any log
    (a log left by an earlier run with other shards, folded by the final fold)."""
    done = np.zeros((store.n_pairs, store.n_rules), bool)
    if hi > lo:
        done[lo:hi] = store.array(ratinglog.DONE)[lo:hi].read().result().astype(bool)
    records = ratinglog.read_log(store)
    done[records["row"], records["rule"]] = True
    return done


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
    entries: list[tuple[int | None, dict[str, Any]]]
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
