"""Pairwise evaluation with RewardBench's conventions.

- A pair is right only if r(chosen) > r(rejected): a tie counts as wrong.
- ``subsets``: per ``subset`` field; ``sections``: per ``section`` field (for example
  ``should_refuse`` and ``should_respond``), i.e. the section's subsets weighted by their
  example counts. Each group reports its ``pairs``, ``accuracy`` and ``length_baseline``.
  Pairs without the field fall in ``"all"``.
- ``accuracy`` over all pairs is the sections' mean weighted by their pair counts.
- ``length_baseline``: the accuracy of "the longer response (in characters) is chosen",
  ties wrong, to show how much of the score length alone explains.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dynrules.train.data import Pair, load_preferences


@dataclass(frozen=True)
class GroupAccuracy:
    """One subset's or section's ``pairs``, its ``accuracy`` (share of pairs where the chosen
    text scores higher; ties wrong) and its ``length_baseline`` (share where the chosen text is
    the longer one in characters; ties wrong)."""

    pairs: int
    accuracy: float
    length_baseline: float


@dataclass(frozen=True)
class PairReport:
    """Rewards of preference pairs against their labels (RewardBench conventions, see above).

    ``accuracy`` and ``length_baseline`` are shares of all ``pairs`` as in
    :class:`GroupAccuracy`; ``reward_mean`` and ``reward_std`` are over both texts of every
    pair, in the model's reward units; ``subsets`` and ``sections`` group by the pairs' fields.
    """

    pairs: int
    accuracy: float
    length_baseline: float
    reward_mean: float
    reward_std: float
    subsets: dict[str, GroupAccuracy]
    sections: dict[str, GroupAccuracy]


@dataclass(frozen=True)
class Evaluation(PairReport):
    """A run's reward model on pairs (``dynrules eval``): the :class:`PairReport` and the number
    of texts ``truncated`` to the model's max_length."""

    truncated: int = 0

    def to_json(self) -> dict:
        """The ``dynrules eval --json`` object: the pair report."""
        out = asdict(self)
        del out["truncated"]
        return out


def section_mean(accuracies: Mapping[str, float]) -> float | None:
    """RewardBench's overall score: the mean accuracy of the named sections, counted equally
    whatever their sizes ("all", the pairs without a section, is not one); None without any."""
    named = [accuracy for name, accuracy in accuracies.items() if name != "all"]
    return float(np.mean(named)) if named else None


def pair_report(pairs: list[Pair], chosen: np.ndarray, rejected: np.ndarray) -> PairReport:
    """The report for rewards of ``pairs``' chosen and rejected texts."""
    chosen, rejected = np.asarray(chosen, np.float64), np.asarray(rejected, np.float64)
    correct = chosen > rejected
    longer = np.array([len(p.chosen) > len(p.rejected) for p in pairs])
    both = np.concatenate([chosen, rejected])
    return PairReport(
        pairs=len(pairs),
        accuracy=float(correct.mean()),
        length_baseline=float(longer.mean()),
        reward_mean=float(both.mean()),
        reward_std=float(both.std()),
        subsets=_grouped(correct, longer, [p.subset or "all" for p in pairs]),
        sections=_grouped(correct, longer, [p.section or "all" for p in pairs]),
    )


def _grouped(correct: np.ndarray, longer: np.ndarray, names: list[str]) -> dict[str, GroupAccuracy]:
    rows = defaultdict(list)
    for index, name in enumerate(names):
        rows[name].append(index)
    return {
        name: GroupAccuracy(
            pairs=len(index),
            accuracy=float(correct[index].mean()),
            length_baseline=float(longer[index].mean()),
        )
        for name, index in sorted(rows.items())
    }


def evaluate(
    model: str | Path,
    pairs: str | Path | list[dict] | list[Pair],
    *,
    batch_size: int = 64,
    mesh: str = "",
    distributed: bool = False,
) -> Evaluation:
    """Score both sides of every pair with a run's (or model directory's) reward model.

    In a multi-process job (``distributed``, see :func:`dynrules.train.sharding.join_job`) the
    pairs are scored across processes and every process returns the same report.
    """
    from dynrules.train import sharding as shd
    from dynrules.train.scoring import Scorer

    shd.join_job(distributed)

    preferences = load_preferences(pairs)  # Pairs pass through as they are
    scorer = Scorer.from_model_dir(model, mesh_spec=mesh, batch_size=batch_size)
    texts = [text for pair in preferences for text in pair.texts(scorer.render)]
    rewards = scorer.rewards(texts)
    report = pair_report(preferences, rewards[0::2], rewards[1::2])
    return Evaluation(**vars(report), truncated=scorer.truncated)
