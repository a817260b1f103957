"""Selection policies, labels and margins over a rating store, streamed chunk by chunk.

Policies (``SelectionConfig.policy``):
    adaptive   the k rules of largest criterion per pair (see kernels.selection for criteria)
    all        every rule of the pool
    random     k random rules per pair, reproducible per pair from (seed, pair index)
    fixed      the same k rules for every pair (``rules``: rule ids)
The label is sign(Σ_{i∈S} d_i): A preferred when positive, B when negative, an exact zero is a
tie. Ties are dropped from the training output by default (``ties="drop"``); ``"a"`` or ``"b"``
give them to A or B (``"b"`` reproduces the published code, which did so silently).
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from dynrules.atomic import atomic_path
from dynrules.engine import ratinglog
from dynrules.engine.store import (
    Chunk,
    RatingStore,
    open_or_create_array,
    shard_range,
    to_kernel_dtype,
)
from dynrules.errors import DynrulesError
from dynrules.kernels import selection as K
from dynrules.output import progress_bar
from dynrules.settings import option, section

Policy = Literal["adaptive", "all", "random", "fixed"]
Ties = Literal["drop", "a", "b"]


@section(frozen=True)
class SelectionConfig:
    """How pairs are labelled: the ``selection`` section of the configuration tree."""

    policy: Policy = option(
        "adaptive",
        "Selection policy (the ablation-only policies zscore and greedy are `dynrules ablate`'s).",
    )
    k: int = option(5, "Rules selected per pair.")
    criterion: K.Criterion | None = option(
        None, "Adaptive criterion [default: additive with relevance, else absolute]."
    )
    alpha: float = option(0.5, "Weight of |d| in the additive criterion.")
    seed: int = option(0, "Seed of the random policy.")
    rules: tuple[str, ...] = option((), "Comma-separated rule ids for the fixed policy.")
    ties: Ties = option(
        "drop", "Exact ties: leave out, or give to A or to B (the published behaviour)."
    )

    def resolved(self, store: RatingStore) -> SelectionConfig:
        """Checked against the store, with defaults filled in (the policy, ties and criterion
        names were checked against their types when the section was built)."""
        criterion = self.criterion or ("additive" if store.has_relevance else "absolute")
        if criterion != "absolute" and not store.has_relevance:
            raise DynrulesError(
                f"criterion {criterion!r} needs relevance, and this store has none; use 'absolute'"
            )
        if self.policy == "adaptive" and criterion == "additive" and store.dtype == "int8":
            try:
                K.alpha_fraction(self.alpha)  # int8 criteria are exact integers q·ρ + p·|d|
            except ValueError as exc:
                raise DynrulesError(f"alpha {self.alpha}: {exc}") from None
        k = (
            store.n_rules
            if self.policy == "all"
            else (len(self.rules) if self.policy == "fixed" else self.k)
        )
        if self.policy == "fixed":
            if not self.rules:
                raise DynrulesError("the fixed policy needs rule ids (--rules ID,ID,…)")
            unknown = [r for r in self.rules if r not in store.rule_ids]
            if unknown:
                raise DynrulesError(f"unknown rule ids for this store's pool: {', '.join(unknown)}")
        if not 1 <= k <= store.n_rules:
            raise DynrulesError(f"k must be between 1 and R = {store.n_rules}, got {k}")
        return SelectionConfig(
            self.policy, k, criterion, self.alpha, self.seed, tuple(self.rules), self.ties
        )

    @property
    def name(self) -> str:
        """Name of this selection's arrays inside the store."""
        if self.policy == "adaptive":
            return f"adaptive-{self.criterion}-k{self.k}"
        if self.policy == "random":
            return f"random-k{self.k}-seed{self.seed}"
        return self.policy if self.policy == "all" else f"fixed-k{self.k}"


def select_chunk(
    chunk: Chunk, config: SelectionConfig, scale: float, rule_index: np.ndarray | None = None
):
    """(index [n, k] int16 or None for 'all', margin [n] float64, label [n] int8) for one chunk.

    ``config`` must be resolved; ``rule_index`` holds the fixed policy's rule indices.
    """
    a, b = to_kernel_dtype(chunk.scores_a), to_kernel_dtype(chunk.scores_b)
    n, n_rules = a.shape
    margin = np.empty(n, np.float64)
    index = None
    if config.policy == "adaptive":
        index = np.empty((n, config.k), np.int16)
        assert config.criterion is not None, "select_chunk needs a resolved config"
        criterion = K.CRITERIA[config.criterion]
        relevance = a if chunk.relevance is None else to_kernel_dtype(chunk.relevance)
        K.select_top_k(
            a, b, relevance, config.k, criterion, config.alpha, scale, scale, index, margin
        )
    elif config.policy == "random":
        index = np.empty((n, config.k), np.int16)
        K.random_rules(n, n_rules, config.k, config.seed, chunk.start, index)
        K.margins_of_rows(a, b, index, scale, margin)
    elif config.policy == "fixed":
        if rule_index is None:
            raise ValueError("the fixed policy needs rule_index")
        index = np.broadcast_to(rule_index.astype(np.int16), (n, config.k))
        K.margins_of_fixed(a, b, rule_index, scale, margin)
    else:
        K.margins_of_fixed(a, b, np.arange(n_rules), scale, margin)
    label = np.empty(n, np.int8)
    K.labels_of_margins(margin, label)
    return index, margin, label


@dataclass(frozen=True)
class SelectionSummary:
    """What ``run_selection`` did (``dynrules select``); counts are pairs of this shard.

    ``labelled`` pairs went to the output (all but dropped ties), ``ties`` had a margin of
    exactly zero, ``preferred_a`` / ``preferred_b`` a positive / negative one. ``seconds`` is
    the wall time; ``selection`` names the selection's arrays in the store. ``rated_cells`` of
    the store's ``cells`` (pairs × rules) hold a rating: fewer under a plan or after failures.
    """

    pairs: int
    labelled: int
    ties: int
    seconds: float
    preferred_a: int
    preferred_b: int
    selection: str
    rated_cells: int
    cells: int

    def to_json(self) -> dict:
        """The ``dynrules select --json`` object."""
        return {
            "pairs": self.pairs,
            "labelled": self.labelled,
            "ties": self.ties,
            "seconds": self.seconds,
        }


def run_selection(
    store: RatingStore,
    config: SelectionConfig,
    out: str | Path | None,
    *,
    shard: tuple[int, int] = (0, 1),
    write_arrays: bool = True,
    progress: bool = True,
) -> SelectionSummary:
    """Select, label and write labelled pairs (JSONL at ``out``) and arrays into the store."""
    config = config.resolved(store)
    rated_cells = _rated_cells(store)
    started = time.perf_counter()
    start, stop = shard_range(store.n_pairs, shard, store.chunk_rows)
    rule_ids = np.asarray(store.rule_ids, dtype=object)
    rule_index = (
        np.asarray([store.rule_ids.index(r) for r in config.rules], np.int64)
        if config.policy == "fixed"
        else None
    )
    arrays = _selection_arrays(store, config) if write_arrays else None
    counts = {"pairs": 0, "labelled": 0, "ties": 0, "a": 0, "b": 0}
    with (
        _maybe_atomic(out) as tmp,
        progress_bar(total=stop - start, unit="pair", desc="select", progress=progress) as bar,
    ):
        handle = open(tmp, "w", encoding="utf-8") if tmp is not None else None
        try:
            for chunk in store.iter_chunks(start, stop, reuse_buffers=True):
                index, margin, label = select_chunk(chunk, config, store.scale, rule_index)
                if arrays is not None:
                    _write_arrays(arrays, chunk.start, index, margin, label)
                counts["pairs"] += len(label)
                counts["ties"] += int(np.count_nonzero(label == 0))
                counts["a"] += int(np.count_nonzero(label > 0))
                counts["b"] += int(np.count_nonzero(label < 0))
                if handle is not None:
                    pairs = store.read_pairs(
                        chunk.start, chunk.stop, ["id", "prompt", "response_a", "response_b"]
                    )
                    counts["labelled"] += _write_labelled(
                        handle, pairs.to_pydict(), index, margin, label, rule_ids, config
                    )
                bar.update(len(label))
        finally:
            if handle is not None:
                handle.close()
    if handle is None:
        counts["labelled"] = counts["pairs"] - (counts["ties"] if config.ties == "drop" else 0)
    return SelectionSummary(
        pairs=counts["pairs"],
        labelled=counts["labelled"],
        ties=counts["ties"],
        seconds=round(time.perf_counter() - started, 3),
        preferred_a=counts["a"],
        preferred_b=counts["b"],
        selection=config.name,
        rated_cells=rated_cells,
        cells=store.n_pairs * store.n_rules,
    )


def _rated_cells(store: RatingStore) -> int:
    """Cells holding a rating: all of them for an ingested store; for a store a judge fills,
    the done count — after refusing one whose interrupted rating left cells outside the arrays."""
    if "rating" not in store.manifest:
        return store.n_pairs * store.n_rules

    pending = len(ratinglog.read_log(store))
    if pending:
        raise DynrulesError(
            f"{store.path}: {pending} rated cells are not yet in the arrays (an interrupted "
            "`dynrules rate`); run the same `dynrules rate` command again to finish it"
        )
    unfinished = ratinglog.shard_logs(store)
    if unfinished:
        raise DynrulesError(
            f"{store.path}: a sharded `dynrules rate` is unfinished ({unfinished[0].name}: "
            "a worker still running, or killed); run the missing workers, or `dynrules rate` "
            "without --shard, to finish it"
        )
    return int(store.manifest["rating"].get("done", 0))


def _maybe_atomic(out):
    return atomic_path(out) if out is not None else contextlib.nullcontext()


def _selection_arrays(store: RatingStore, config: SelectionConfig) -> dict:
    base = store.path / "selections" / config.name
    rows = store.chunk_rows
    arrays = {
        "margin": open_or_create_array(
            base / "margin", [store.n_pairs], "float32", chunk_rows=rows
        ),
        "label": open_or_create_array(base / "label", [store.n_pairs], "int8", chunk_rows=rows),
    }
    if config.policy != "all":
        arrays["index"] = open_or_create_array(
            base / "index", [store.n_pairs, config.k], "int16", chunk_rows=rows
        )
    return arrays


def _write_arrays(arrays: dict, start: int, index, margin, label) -> None:
    stop = start + len(label)
    futures = [
        arrays["margin"][start:stop].write(margin.astype(np.float32)),
        arrays["label"][start:stop].write(label),
    ]
    if "index" in arrays:
        futures.append(arrays["index"][start:stop].write(np.ascontiguousarray(index)))
    for future in futures:
        future.result()


def _write_labelled(
    handle, pairs: dict, index, margin, label, rule_ids, config: SelectionConfig
) -> int:
    """Write one JSONL record per labelled pair (TRL / OpenRLHF: prompt, chosen, rejected, margin)."""
    all_ids = list(rule_ids) if index is None else None
    written = 0
    for row, value in enumerate(label.tolist()):
        if value == 0:
            if config.ties == "drop":
                continue
            a_wins = config.ties == "a"
        else:
            a_wins = value > 0
        a, b = pairs["response_a"][row], pairs["response_b"][row]
        record = {
            "id": pairs["id"][row],
            "prompt": pairs["prompt"][row],
            "chosen": a if a_wins else b,
            "rejected": b if a_wins else a,
            "margin": abs(float(margin[row])),
            "preferred": "A" if a_wins else "B",
            "rule_ids": all_ids if index is None else rule_ids[index[row]].tolist(),
        }
        handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        written += 1
    return written
