"""The policy ablation: which selection policy's label carries the most information about the truth.

Policies, each at every requested k (criterion in brackets):

    adaptive  top-k per pair by a criterion of kernels.selection (additive, product, absolute)
    zscore    top-k per pair by |d_i| / σ_i, σ_i = rule i's discrepancy standard deviation over
              the data set (absolute; and relevance·|d_i|/σ_i as "product" when the store has
              relevance); a rule with σ_i = 0 never differs and gets weight 0
    greedy    redundancy-aware greedy selection (kernels.policies): the next rule maximises
              criterion·(1 − discount·max redundancy with the rules already chosen), redundancy
              as in engine.mi, by the store's default criterion
    all       every rule (one row, k = R)
    random    k random rules per pair (reproducible from the seed)
    fixed     the same k rules for every pair: those of highest vote MI over the data set. This
              uses the truth, so it is an optimistic baseline for any fixed set.

Two passes over the store: the first counts per-rule vote tables and discrepancy moments and
measures redundancy (what zscore, greedy and fixed need); the second labels every pair by every
policy and counts one label-by-truth table each. Each row then reports, from its table alone
(see engine.mi): agreement (accuracy of the non-tie labels), Miller–Madow MI in bits with a
multinomial-resampling interval, ties and coverage (the fraction of pairs labelled).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Annotated, Literal, get_args

import numpy as np
from pydantic import AfterValidator, BeforeValidator, Field

from dynrules.engine.mi import (
    MIConfig,
    PolicyLabel,
    RedundantPair,
    RuleMI,
    label_summary,
    open_store,
    redundant_pairs,
    rule_statistics,
    rule_table,
    truth_labels,
)
from dynrules.engine.select import SelectionConfig, select_chunk
from dynrules.engine.store import to_kernel_dtype
from dynrules.errors import DynrulesError
from dynrules.kernels import contingency as C
from dynrules.kernels import policies as P
from dynrules.kernels import selection as K
from dynrules.settings import option, section

AblationPolicy = Literal["adaptive", "zscore", "greedy", "all", "random", "fixed"]
ABLATION_POLICIES: tuple[AblationPolicy, ...] = get_args(AblationPolicy)
_KS = re.compile(r"\s*(\d+|R)\s*(-\s*(\d+|R)\s*)?", re.IGNORECASE)


def _ks_text(value):
    """A k list written in YAML as a number or a list ([1, 3, "5-10"]) in its text form."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return value


def _check_ks(text: str) -> str:
    if not all(_KS.fullmatch(part) for part in text.split(",")):
        raise ValueError(f"bad k list {text!r}: expected numbers like 1,3,5,10 or 1-10 (R: all)")
    return text


KsText = Annotated[str, BeforeValidator(_ks_text), AfterValidator(_check_ks)]


@section(frozen=True)
class AblationConfig:
    """The policy ablation of ``dynrules ablate`` (which reads mi and selection.alpha too)."""

    ks: KsText = option(
        "1,3,5,10",
        "ks compared: a list (1,3,5,10), ranges (1-10), R for the pool size (1-R: every k).",
        flag="k",
    )
    policies: tuple[AblationPolicy, ...] = option(
        ABLATION_POLICIES, "Policies compared, comma-separated."
    )
    discount: Annotated[float, Field(ge=0, le=1)] = option(
        1.0, "Greedy policy's redundancy discount in [0, 1]."
    )


# The library's defaults are the sections' defaults.
_MI, _ABLATE, _SELECTION = MIConfig(), AblationConfig(), SelectionConfig()


class _Contender:
    """One (policy, criterion, k) and how it labels a chunk."""

    def __init__(self, policy: str, criterion: str | None, k: int, label_of):
        self.policy, self.criterion, self.k, self.label_of = policy, criterion, k, label_of
        self.counts = np.zeros((3, 2), np.int64)


def _labels_by(kernel, arguments: tuple):
    """Label a chunk with a selection kernel: kernel(a, b, relevance, k, *arguments, index, margin)."""

    def label_of(chunk, k):
        a, b = to_kernel_dtype(chunk.scores_a), to_kernel_dtype(chunk.scores_b)
        relevance = a if chunk.relevance is None else to_kernel_dtype(chunk.relevance)
        index = np.empty((a.shape[0], k), np.int16)
        margin = np.empty(a.shape[0], np.float64)
        kernel(a, b, relevance, k, *arguments, index, margin)
        label = np.empty(a.shape[0], np.int8)
        K.labels_of_margins(margin, label)
        return label

    return label_of


def _by_config(config: SelectionConfig, scale: float, rule_index=None):
    return lambda chunk, k: select_chunk(chunk, config, scale, rule_index)[2]


def parse_ks(text: str, n_rules: int | None = None) -> list[int]:
    """'1,3,5,10' or ranges '1-10,20' to sorted distinct ks; 'R' stands for the pool size (1-R: all)."""

    def number(token: str) -> int:
        token = token.strip()
        return n_rules if token.upper() == "R" and n_rules else int(token)

    ks: set[int] = set()
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            lo, _, hi = part.partition("-")
            ks.update(range(number(lo), number(hi or lo) + 1))
        except ValueError:
            raise DynrulesError(
                f"bad k list {text!r}: expected numbers like 1,3,5,10 or 1-10"
            ) from None
    if not ks:
        raise DynrulesError("empty k list")
    return sorted(ks)


@dataclass(frozen=True)
class Ablation:
    """The ablation over ``pairs`` pairs and ``rules`` rules against the pair field ``truth``
    (None: an array was given): one row per (policy, criterion, k), MI by ``estimator`` with
    intervals from ``resamples`` resamples; the rules by vote MI (``rule_mi``) and the most
    ``redundant`` rule pairs. ablation.json holds all of it."""

    pairs: int
    rules: int
    truth: str | None
    estimator: str
    resamples: int
    rows: list[PolicyLabel]
    rule_mi: list[RuleMI]
    redundant: list[RedundantPair]

    def to_json(self) -> dict:
        """The ``dynrules ablate --json`` object: the rows."""
        return {"rows": [asdict(row) for row in self.rows]}


def ablate(
    store,
    truth,
    ks,
    *,
    policies=_ABLATE.policies,
    alpha: float = _SELECTION.alpha,
    seed: int = _MI.seed,
    resamples: int = _MI.resamples,
    discount: float = _ABLATE.discount,
    estimator: str = _MI.estimator,
    redundancy_pairs: int = _MI.redundancy_pairs,
) -> Ablation:
    """Compare selection policies on ``store`` against ``truth`` (a pair field name or an array)
    at every k of ``ks``; the keywords are those of the ablate, mi and selection sections (see
    :func:`ablate_with`)."""
    store = open_store(store)
    truth_values = truth_labels(store, truth)
    unknown = [p for p in policies if p not in ABLATION_POLICIES]
    if unknown:
        raise DynrulesError(
            f"unknown policies {', '.join(unknown)}; choose from {', '.join(ABLATION_POLICIES)}"
        )
    ks = sorted(set(ks))
    if not ks or ks[0] < 1 or ks[-1] > store.n_rules:
        raise DynrulesError(f"every k must be between 1 and R = {store.n_rules}, got {ks}")
    if not 0.0 <= discount <= 1.0:
        raise DynrulesError(f"discount must be in [0, 1], got {discount}")

    stats = rule_statistics(store, truth_values, redundancy_pairs=redundancy_pairs)
    rules = rule_table(stats, store.rule_ids, estimator)
    contenders = _contenders(store, stats, rules, ks, policies, alpha, seed, discount)

    for chunk in store.iter_chunks(reuse_buffers=True):
        chunk_truth = truth_values[chunk.start : chunk.stop]
        for contender in contenders:
            C.label_counts(contender.label_of(chunk, contender.k), chunk_truth, contender.counts)

    rows = [
        PolicyLabel.of(
            c.policy,
            c.criterion,
            c.k,
            label_summary(c.counts, resamples=resamples, seed=seed, estimator=estimator),
        )
        for c in contenders
    ]
    return Ablation(
        pairs=store.n_pairs,
        rules=store.n_rules,
        truth=truth if isinstance(truth, str) else None,
        estimator=estimator,
        resamples=resamples,
        rows=rows,
        rule_mi=rules,
        redundant=redundant_pairs(stats, store.rule_ids),
    )


def ablate_with(
    store, truth, config: AblationConfig, mi: MIConfig, selection: SelectionConfig
) -> Ablation:
    """:func:`ablate` with the sections `dynrules ablate` loads (ks resolved on the store)."""
    store = open_store(store)
    return ablate(
        store,
        truth,
        parse_ks(config.ks, store.n_rules),
        policies=config.policies,
        alpha=selection.alpha,
        seed=mi.seed,
        resamples=mi.resamples,
        discount=config.discount,
        estimator=mi.estimator,
        redundancy_pairs=mi.redundancy_pairs,
    )


def _contenders(store, stats, rules, ks, policies, alpha, seed, discount) -> list[_Contender]:
    criteria: list[K.Criterion] = list(K.CRITERIA) if store.has_relevance else ["absolute"]
    default_criterion: K.Criterion = "additive" if store.has_relevance else "absolute"
    zscore_criteria: tuple[K.Criterion, ...] = (
        ("absolute", "product") if store.has_relevance else ("absolute",)
    )
    std = stats.discrepancy_std()
    zscore_weight = np.where(std > 0, 1.0 / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)
    unit_weight = np.ones(store.n_rules, np.float32)
    redundancy = np.ascontiguousarray(stats.redundancy(), np.float32)
    by_mi = [r.index for r in rules]
    scale = store.scale
    out = []
    for policy in policies:
        if policy == "all":
            config = SelectionConfig(policy="all").resolved(store)
            out.append(_Contender("all", None, store.n_rules, _by_config(config, scale)))
            continue
        for k in ks:
            if policy == "adaptive":
                for criterion in criteria:
                    config = SelectionConfig(k=k, criterion=criterion, alpha=alpha).resolved(store)
                    out.append(_Contender(policy, criterion, k, _by_config(config, scale)))
            elif policy == "zscore":
                for criterion in zscore_criteria:
                    code = K.CRITERIA[criterion]
                    label_of = _labels_by(
                        functools.partial(K.select_top_k, weight=zscore_weight),
                        (code, alpha, scale, scale),
                    )
                    out.append(_Contender(policy, criterion, k, label_of))
            elif policy == "greedy":
                code = K.CRITERIA[default_criterion]
                label_of = _labels_by(
                    P.select_greedy, (code, alpha, scale, scale, unit_weight, redundancy, discount)
                )
                out.append(_Contender(policy, default_criterion, k, label_of))
            elif policy == "random":
                config = SelectionConfig(policy="random", k=k, seed=seed).resolved(store)
                out.append(_Contender(policy, None, k, _by_config(config, scale)))
            else:
                chosen = np.asarray(by_mi[:k], np.int64)
                config = SelectionConfig(
                    policy="fixed", rules=tuple(store.rule_ids[i] for i in chosen)
                ).resolved(store)
                out.append(_Contender(policy, None, k, _by_config(config, scale, chosen)))
    return out
