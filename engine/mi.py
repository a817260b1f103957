"""Information diagnostics: how much a rule's vote, or a policy's label, tells about the truth.

Everything is computed from contingency tables (kernels.contingency), never from the data
again: a table of votes (−, 0, +) by truth (B, A) per rule, and one of labels by truth per
policy. From a table of counts c with N = Σ c (natural logs inside, reported in bits):

    plug-in MI      Î = Σ_xy (c_xy/N) · ln(c_xy·N / (c_x·c_y))
    Miller–Madow    Î_MM = Î + ((m_x − 1) + (m_y − 1) − (m_xy − 1)) / (2N), m = non-empty cells;
                    for independent variables this removes the plug-in's upward bias
                    (m_x − 1)(m_y − 1)/(2N). It can come out slightly negative: that means
                    "indistinguishable from zero", and is reported as is. The default.
    G-test          G = 2N·Î ~ χ²((m_x − 1)(m_y − 1)) under independence; p = P(χ² ≥ G)
    agreement       accuracy of the labelled pairs: (#(+, A) + #(−, B)) / #(label ≠ 0)
    coverage        #(label ≠ 0) / N;  ties = #(label = 0)
    interval        percentile interval of the estimator over multinomial resamples of the
                    table (Multinomial(N, c/N)): 1,000 resamples cost about one pass over the
                    table, not 1,000 passes over the data.

Redundancy of two rules is the sign correlation of their votes, |2·P(V_i = V_j | both ≠ 0) − 1|:
0 for independent noise, 1 for duplicates (or exact opposites), measured on an evenly spread
subsample of the pairs, without the truth.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, get_args

import numpy as np
from pydantic import Field

from dynrules.engine.store import RatingStore, to_kernel_dtype
from dynrules.errors import InputError
from dynrules.kernels import contingency as C
from dynrules.settings import option, section

if TYPE_CHECKING:
    from dynrules.engine.select import SelectionConfig

Estimator = Literal["miller-madow", "plug-in"]
ESTIMATORS: tuple[Estimator, ...] = get_args(Estimator)
LN2 = math.log(2.0)
REDUNDANCY_PAIRS = 20_000


@section(frozen=True)
class MIConfig:
    """How information is measured (``dynrules mi``, ``dynrules ablate``): the ``mi`` section."""

    estimator: Estimator = option(
        "miller-madow", "MI estimator: miller-madow (bias-corrected plug-in) or plug-in."
    )
    resamples: Annotated[int, Field(ge=10)] = option(
        1000, "Multinomial resamples of a label's table for its interval."
    )
    seed: int = option(0, "Seed of the resampling, and of the random policy's rules.")
    redundancy_pairs: Annotated[int, Field(ge=1)] = option(
        REDUNDANCY_PAIRS, "Pairs (evenly spread) on which the redundancy of two rules is measured."
    )
    top: Annotated[int, Field(ge=1)] = option(
        10, "Rules `dynrules mi` prints at the top and at the bottom (all with --json)."
    )


# -- estimators over tables [..., Kx, Ky] --------------------------------------------------------


def _tables(counts) -> tuple[np.ndarray, tuple]:
    """Counts [..., Kx, Ky] as contiguous float64 tables [T, Kx, Ky], and the leading shape."""
    counts = np.asarray(counts, np.float64)
    if counts.ndim < 2:
        raise ValueError(f"expected tables [..., Kx, Ky], got shape {counts.shape}")
    return np.ascontiguousarray(counts.reshape(-1, *counts.shape[-2:])), counts.shape[:-2]


def mutual_information(counts, estimator: str = "miller-madow") -> np.ndarray:
    """MI in bits of each table of counts [..., Kx, Ky] (a scalar array for one table)."""
    miller_madow = _miller_madow(estimator)
    tables, leading = _tables(counts)
    nats = np.empty(tables.shape[0])
    C.mutual_information_nats(tables, miller_madow, nats)
    return (nats / LN2).reshape(leading)


def _miller_madow(estimator: str) -> bool:
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    return estimator == "miller-madow"


def g_test_p_value(counts) -> np.ndarray:
    """P-value of the G-test of independence for each table [..., Kx, Ky]."""
    counts = np.asarray(counts, np.float64)
    n = counts.sum(axis=(-2, -1))
    g = 2.0 * n * mutual_information(counts, "plug-in") * LN2
    df = (np.count_nonzero(counts.sum(axis=-1), axis=-1) - 1) * (
        np.count_nonzero(counts.sum(axis=-2), axis=-1) - 1
    )
    flat = [chi2_sf(float(x), int(d)) for x, d in zip(np.ravel(g), np.ravel(df), strict=True)]
    return np.asarray(flat, np.float64).reshape(np.shape(g))


def chi2_sf(x: float, df: int) -> float:
    """P(χ²_df ≥ x): the regularised upper incomplete gamma Q(df/2, x/2). df ≤ 0 gives 1."""
    if df <= 0 or x <= 0:
        return 1.0
    return regularized_gamma_q(df / 2.0, x / 2.0)


def regularized_gamma_q(s: float, x: float) -> float:
    """Q(s, x) = Γ(s, x)/Γ(s) for s > 0, x ≥ 0, to about 1e−14 relative accuracy.

    Below x = s + 1 the power series of P = 1 − Q converges fast; above it, the continued
    fraction of Q (modified Lentz) does. Both are scaled by x^s e^−x / Γ(s), taken in logs.
    """
    if x <= 0:
        return 1.0
    log_prefactor = s * math.log(x) - x - math.lgamma(s)
    if x < s + 1.0:
        term = total = 1.0 / s
        a = s
        for _ in range(10_000):
            a += 1.0
            term *= x / a
            total += term
            if abs(term) < abs(total) * 1e-16:
                break
        return max(0.0, 1.0 - total * math.exp(log_prefactor))
    tiny = 1e-300
    b = x + 1.0 - s
    c = 1.0 / tiny
    d = 1.0 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - s)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            break
    return math.exp(log_prefactor) * h


def agreement(counts) -> np.ndarray:
    """Accuracy of the non-zero votes or labels of tables [..., 3, 2] (NaN where there are none)."""
    counts = np.asarray(counts, np.float64)
    correct = counts[..., C.POSITIVE, 1] + counts[..., C.NEGATIVE, 0]
    decided = correct + counts[..., C.POSITIVE, 0] + counts[..., C.NEGATIVE, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / decided


def ties(counts) -> np.ndarray:
    return np.asarray(counts)[..., C.TIE, :].sum(axis=-1)


def coverage(counts) -> np.ndarray:
    counts = np.asarray(counts, np.float64)
    return 1.0 - ties(counts) / counts.sum(axis=(-2, -1))


def bootstrap_interval(
    counts,
    *,
    resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    estimator: str = "miller-madow",
) -> tuple[np.ndarray, np.ndarray]:
    """Percentile interval (low, high) of the MI of each table [..., Kx, Ky], in bits, from
    ``resamples`` multinomial resamples of the table itself."""
    miller_madow = _miller_madow(estimator)
    tables, leading = _tables(counts)
    values = np.empty((resamples, tables.shape[0]))
    C.resampled_mutual_information(tables, resamples, seed, miller_madow, values)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(values / LN2, [tail, 1.0 - tail], axis=0)
    return low.reshape(leading), high.reshape(leading)


# -- streaming over a store ------------------------------------------------------------------------


def open_store(store) -> RatingStore:
    return store if isinstance(store, RatingStore) else RatingStore.open(Path(store))


def truth_labels(store: RatingStore, truth) -> np.ndarray:
    """The truth as int8 (1: A better, 0: B better) from a pair field name or an array."""
    where = store.path if isinstance(truth, str) else None
    values = store.read_field(truth) if isinstance(truth, str) else np.asarray(truth)
    if values.shape != (store.n_pairs,):
        raise InputError(
            f"truth has {values.shape[0] if values.ndim else 0} values for {store.n_pairs} pairs",
            path=where,
            field=truth if where else None,
        )
    try:
        numeric = values.astype(np.float64)
    except (TypeError, ValueError):
        raise InputError(
            "truth must be 1 (A better) or 0 (B better), got non-numbers",
            path=where,
            field=truth if where else None,
        ) from None
    bad = ~np.isin(numeric, (0.0, 1.0))
    if bad.any():
        row = int(np.argmax(bad))
        value = values[row].item() if isinstance(values[row], np.generic) else values[row]
        raise InputError(
            f"truth must be 1 (A better) or 0 (B better); pair {row} has {value!r}",
            path=where,
            field=truth if where else None,
        )
    return numeric.astype(np.int8)


@dataclass
class RuleStatistics:
    """What one pass over a store gives: per-rule vote tables, discrepancy moments, redundancy."""

    vote_counts: np.ndarray  # [R, 3, 2] int64
    discrepancy_sum: np.ndarray  # [R] float64
    discrepancy_sum_squares: np.ndarray  # [R] float64
    agree: np.ndarray  # [R, R] int64, over the redundancy subsample
    both: np.ndarray  # [R, R] int64
    pairs: int

    def mi_bits(self, estimator: str = "miller-madow") -> np.ndarray:
        return mutual_information(self.vote_counts, estimator)

    def discrepancy_std(self) -> np.ndarray:
        mean = self.discrepancy_sum / max(self.pairs, 1)
        return np.sqrt(
            np.maximum(self.discrepancy_sum_squares / max(self.pairs, 1) - mean * mean, 0.0)
        )

    def redundancy(self) -> np.ndarray:
        """|2·agreement − 1| of every rule pair (1 on the diagonal, 0 where never both voted)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            rate = self.agree / self.both
        return np.where(self.both > 0, np.abs(2.0 * rate - 1.0), 0.0)


def subsample_rows(start: int, stop: int, step: int) -> np.ndarray:
    """Rows of [start, stop), relative to start, whose global index is a multiple of step."""
    first = -(-start // step) * step
    return np.arange(first, stop, step) - start


def rule_statistics(
    store: RatingStore,
    truth: np.ndarray | None,
    *,
    redundancy_pairs: int = REDUNDANCY_PAIRS,
    on_chunk=None,
) -> RuleStatistics:
    """One pass over the store. ``on_chunk(chunk, truth_of_chunk)`` is called on each chunk, so
    that callers can count their own tables in the same pass."""
    n_rules = store.n_rules
    counts = np.zeros((n_rules, 3, 2), np.int64)
    sums, squares = np.zeros(n_rules), np.zeros(n_rules)
    agree, both = np.zeros((n_rules, n_rules), np.int64), np.zeros((n_rules, n_rules), np.int64)
    step = max(1, -(-store.n_pairs // max(redundancy_pairs, 1)))
    for chunk in store.iter_chunks(reuse_buffers=True):
        a, b = to_kernel_dtype(chunk.scores_a), to_kernel_dtype(chunk.scores_b)
        chunk_truth = None if truth is None else truth[chunk.start : chunk.stop]
        if chunk_truth is not None:
            C.vote_counts(a, b, chunk_truth, counts)
        C.discrepancy_moments(a, b, store.scale, sums, squares)
        rows = subsample_rows(chunk.start, chunk.stop, step)
        if len(rows):
            votes = np.empty((len(rows), n_rules), np.int8)
            C.votes_of(np.ascontiguousarray(a[rows]), np.ascontiguousarray(b[rows]), votes)
            C.vote_agreement(votes, agree, both)
        if on_chunk is not None:
            on_chunk(chunk, chunk_truth)
    return RuleStatistics(counts, sums, squares, agree, both, store.n_pairs)


@dataclass(frozen=True)
class RuleMI:
    """One rule's vote against the truth: ``mi_bits`` I(vote; truth) in bits, ``p_value`` of the
    G-test of independence, ``agreement`` the accuracy of its non-zero votes (None: all zero);
    ``index`` is the rule's position in the pool."""

    id: str
    index: int
    mi_bits: float
    p_value: float
    agreement: float | None


@dataclass(frozen=True)
class RedundantPair:
    """Rules ``a`` and ``b`` with their vote ``redundancy`` in [0, 1] (1: duplicates or exact
    opposites), measured on ``pairs`` subsampled pairs where both voted."""

    a: str
    b: str
    redundancy: float
    pairs: int


@dataclass(frozen=True)
class LabelMI:
    """What a label tells about the truth, from its label-by-truth table: ``mi_bits``
    I(label; truth) in bits within the resampling interval [``ci_low``, ``ci_high``];
    ``agreement`` the accuracy of the non-tie labels (None: all ties); ``ties`` the pairs
    labelled 0; ``coverage`` the share of pairs labelled (not tied)."""

    mi_bits: float
    ci_low: float
    ci_high: float
    agreement: float | None
    ties: int
    coverage: float


@dataclass(frozen=True)
class PolicyLabel:
    """The label of one selection ``policy`` with ``k`` rules per pair (``criterion``: that of
    the adaptive, zscore or greedy policies, else None) against the truth; the other fields as
    in :class:`LabelMI`."""

    policy: str
    criterion: str | None
    k: int
    mi_bits: float
    ci_low: float
    ci_high: float
    agreement: float | None
    ties: int
    coverage: float

    @classmethod
    def of(cls, policy: str, criterion: str | None, k: int, label: LabelMI) -> PolicyLabel:
        return cls(policy, criterion, k, **vars(label))


def rule_table(
    stats: RuleStatistics, rule_ids: list[str], estimator: str = "miller-madow"
) -> list[RuleMI]:
    """Per-rule MI, ranked (MI descending, index ascending)."""
    mi = stats.mi_bits(estimator)
    p = g_test_p_value(stats.vote_counts)
    accuracy = agreement(stats.vote_counts)
    order = sorted(range(len(rule_ids)), key=lambda i: (-mi[i], i))
    return [
        RuleMI(
            id=rule_ids[i],
            index=i,
            mi_bits=float(mi[i]),
            p_value=float(p[i]),
            agreement=_finite(accuracy[i]),
        )
        for i in order
    ]


def redundant_pairs(
    stats: RuleStatistics, rule_ids: list[str], top: int = 10
) -> list[RedundantPair]:
    """The ``top`` most redundant distinct rule pairs."""
    redundancy = stats.redundancy()
    upper = np.triu_indices(len(rule_ids), k=1)
    order = np.lexsort((upper[1], upper[0], -redundancy[upper]))[:top]
    return [
        RedundantPair(
            a=rule_ids[upper[0][o]],
            b=rule_ids[upper[1][o]],
            redundancy=float(redundancy[upper][o]),
            pairs=int(stats.both[upper[0][o], upper[1][o]]),
        )
        for o in order
    ]


def label_summary(
    counts, *, resamples: int = 1000, seed: int = 0, estimator: str = "miller-madow"
) -> LabelMI:
    """MI with interval, agreement, ties and coverage of one label-by-truth table [3, 2]."""
    low, high = bootstrap_interval(counts, resamples=resamples, seed=seed, estimator=estimator)
    return LabelMI(
        mi_bits=float(mutual_information(counts, estimator)),
        ci_low=float(low),
        ci_high=float(high),
        agreement=_finite(agreement(counts)),
        ties=int(ties(counts)),
        coverage=float(coverage(counts)),
    )


def _finite(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class MIReport:
    """``dynrules mi``: over ``pairs`` pairs, with the MI ``estimator`` named, every rule's vote
    MI (``rules``, most informative first), one policy's ``label`` MI, and the most ``redundant``
    rule pairs."""

    pairs: int
    estimator: str
    rules: list[RuleMI]
    label: PolicyLabel
    redundant: list[RedundantPair]


def mi_report(
    store, truth, selection: SelectionConfig | None = None, config: MIConfig | None = None
) -> MIReport:
    """Per-rule MI, the MI of the label of the ``selection`` policy (any: adaptive, all, random
    with ``config.seed``, fixed), and the most redundant rule pairs, in one pass."""
    from dynrules.engine.select import SelectionConfig, select_chunk

    config = config or MIConfig()
    store = open_store(store)
    truth = truth_labels(store, truth)
    selection = dataclasses.replace(selection or SelectionConfig(), seed=config.seed)
    selection = selection.resolved(store)
    rule_index = None
    if selection.policy == "fixed":
        rule_index = np.asarray([store.rule_ids.index(r) for r in selection.rules], np.int64)
    label_table = np.zeros((3, 2), np.int64)

    def count_label(chunk, chunk_truth):
        _, _, label = select_chunk(chunk, selection, store.scale, rule_index)
        C.label_counts(label, chunk_truth, label_table)

    stats = rule_statistics(
        store, truth, redundancy_pairs=config.redundancy_pairs, on_chunk=count_label
    )
    estimator = config.estimator
    label = PolicyLabel.of(
        selection.policy,
        selection.criterion if selection.policy == "adaptive" else None,
        selection.k,
        label_summary(
            label_table, resamples=config.resamples, seed=config.seed, estimator=estimator
        ),
    )
    return MIReport(
        pairs=store.n_pairs,
        estimator=estimator,
        rules=rule_table(stats, store.rule_ids, estimator),
        label=label,
        redundant=redundant_pairs(stats, store.rule_ids),
    )
