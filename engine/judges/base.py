"""The judge interface: rate (prompt, response, rule) triples, a pair's rules at a time.

A judge answers, for a response y to a prompt x and a rule i of its pool, a score
s_i(x, y) = P(Yes) − P(No) ∈ [−1, 1] ("does the response follow the rule?") and a relevance
∈ [0, 1] (1 − P(Irrelevant)). The unit of work is a :class:`Job`: one prompt, its responses
(A and B of a pair, or a single response) and the rule indices to rate on each, so that a judge
can share work across the rules of one conversation (one HTTP request, one embedding).

Judges return results in any order (the LLM client answers as requests complete), and may
split a job's rules over several results (the LLM client hands on each cell of a long job as
soon as it is rated): each result's ``job`` is then that part of the job, with the same row and
texts and a subset of its rules; together the results cover every rule of every job once. A rule that
could not be rated carries the reason in ``JobResult.errors``; its score is NaN, never 0, so a
failure can not pass for a neutral rating. In a pair, the cell's relevance is the mean of the
two responses' relevance (the selection criterion takes one relevance per pair and rule).
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np

from dynrules.engine.pool import RulePool
from dynrules.errors import DynrulesError


class JudgeAborted(DynrulesError):
    """The judge can not go on (repeated failures, rejected credentials, unknown model)."""


@dataclass(frozen=True)
class Job:
    """Rate ``rules`` (indices into the judge's pool) on each of ``responses`` to ``prompt``."""

    row: int  # the caller's index of this prompt/pair (a store row)
    prompt: str
    responses: tuple[str, ...]
    rules: np.ndarray  # int64 rule indices


@dataclass
class JobResult:
    job: Job
    scores: np.ndarray  # float32 [n_responses, n_rules]; NaN where not rated
    relevance: np.ndarray  # float32 [n_responses, n_rules]; NaN where not rated
    errors: list[str | None]  # per rule: None when every response was rated, else why not

    @property
    def ok(self) -> np.ndarray:
        return np.array([e is None for e in self.errors], dtype=bool)


def pair_cells(result: JobResult) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(rule indices, s(A), s(B), relevance) of the rated cells of a pair job."""
    ok = result.ok
    relevance = result.relevance[:, ok].mean(axis=0, dtype=np.float32)
    return result.job.rules[ok], result.scores[0, ok], result.scores[1, ok], relevance


@dataclass(frozen=True)
class Rating:
    """One triple's answer: score and relevance, or the reason there is none."""

    score: float | None
    relevance: float | None
    error: str | None = None


class Judge(abc.ABC):
    """Rates jobs against a fixed rule pool. Subclasses implement :meth:`rate_jobs`."""

    pool: RulePool

    @property
    def rules_per_job(self) -> int:
        """The runner cuts a pair's outstanding rules into jobs of at most this many rules (by
        default all of them: one job a pair)."""
        return len(self.pool)

    @property
    @abc.abstractmethod
    def identity(self) -> dict:
        """``{"judge": str, "template": str | None}``: what the store's manifest records, so a
        store never mixes ratings of different judges or templates. Holds no secrets."""

    @abc.abstractmethod
    def rate_jobs(self, jobs: Iterable[Job]) -> Iterator[JobResult]:
        """Results covering every rule of every job once (a job's rules may be split over several
        results), in any order. Jobs are pulled lazily. Raises JudgeAborted."""

    def close(self) -> None:  # noqa: B027 - optional hook: most judges hold nothing to release
        """Release resources (connections, models)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def rate(self, triples: Sequence[tuple[str, str, str]]) -> list[Rating]:
        """Rate (prompt, response, rule id) triples; one :class:`Rating` per triple, in order."""
        groups: dict[tuple[str, str], list[int]] = {}
        for position, (prompt, response, _rule) in enumerate(triples):
            groups.setdefault((prompt, response), []).append(position)
        jobs: list[Job] = []
        positions_of: dict[tuple[int, int], list[int]] = {}  # (row, rule) -> triple positions
        for row, ((prompt, response), positions) in enumerate(groups.items()):
            rules = [self.pool.index_of(triples[p][2]) for p in positions]
            for position, rule in zip(positions, rules, strict=True):
                positions_of.setdefault((row, rule), []).append(position)
            jobs.append(Job(row, prompt, (response,), np.array(rules, np.int64)))
        out: list[Rating | None] = [None] * len(triples)
        for result in self.rate_jobs(jobs):
            for column, rule in enumerate(result.job.rules.tolist()):
                error = result.errors[column]
                rating = (
                    Rating(float(result.scores[0, column]), float(result.relevance[0, column]))
                    if error is None
                    else Rating(None, None, error)
                )
                for position in positions_of[(result.job.row, rule)]:
                    out[position] = rating
        return cast(list[Rating], out)  # every triple is a cell of one job: none is left None
