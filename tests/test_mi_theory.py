"""Checks of the information-theoretic argument (design.md §1) on simulated data with known truth.

If one of these fails, the theory or the simulation is wrong somewhere: investigate, don't loosen.
"""

import json
import math

import numpy as np
import pytest

from dynrules.engine import mi as M
from dynrules.engine.ablate import ablate
from dynrules.engine.simulate import PARAMETERS_FILE, SimulationModel, simulate

N_PAIRS = 100_000


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    base = tmp_path_factory.mktemp("theory")
    simulate(base / "plain", N_PAIRS, SimulationModel(), seed=11)
    simulate(base / "duplicated", N_PAIRS, SimulationModel(duplicates=10), seed=12)
    return base


def _row(rows, policy, k, criterion=None):
    return next(r for r in rows if r.policy == policy and r.k == k and r.criterion == criterion)


def test_per_rule_vote_mi_matches_the_model(stores):
    """Rule i's vote is a binary symmetric channel with P(correct) = 1/2 + ρ_i·(ḡ − 1/2), where
    ḡ = E σ(β·m), m ~ U(0, 2), = (ln(1 + e^{2β}) − ln 2) / (2β); so I = 1 − H_b(P(correct))."""
    model = SimulationModel()
    beta = model.slope
    g_mean = (math.log1p(math.exp(2 * beta)) - math.log(2)) / (2 * beta)
    rho = np.array(
        [
            r["relevance_rate"]
            for r in json.loads((stores / "plain" / PARAMETERS_FILE).read_text())["rules"]
        ]
    )
    p = 0.5 + rho * (g_mean - 0.5)
    predicted = 1 + p * np.log2(p) + (1 - p) * np.log2(1 - p)
    store = M.open_store(stores / "plain")
    stats = M.rule_statistics(store, M.truth_labels(store, "truth"))
    error = stats.mi_bits() - predicted
    assert np.abs(error).max() < 0.006, np.abs(error).max()
    assert np.corrcoef(stats.mi_bits(), predicted)[0, 1] > 0.99


def test_adaptive_beats_random_and_fixed(stores):
    rows = ablate(stores / "plain", "truth", [5], policies=("adaptive", "random", "fixed")).rows
    random_row, fixed_row = _row(rows, "random", 5), _row(rows, "fixed", 5)
    for criterion in ("additive", "product", "absolute"):
        adaptive = _row(rows, "adaptive", 5, criterion)
        for baseline in (random_row, fixed_row):
            assert adaptive.ci_low > baseline.ci_high, (adaptive, baseline)
            assert adaptive.agreement > baseline.agreement


def test_redundancy_aware_greedy_beats_top_k_with_duplicated_rules(stores):
    result = ablate(stores / "duplicated", "truth", [5], policies=("adaptive", "greedy"))
    top_k, greedy = (
        _row(result.rows, "adaptive", 5, "additive"),
        _row(result.rows, "greedy", 5, "additive"),
    )
    assert greedy.ci_low > top_k.ci_high, (greedy, top_k)
    assert greedy.agreement > top_k.agreement
    # The redundancy measure finds exactly the injected duplicates.
    rules = json.loads((stores / "duplicated" / PARAMETERS_FILE).read_text())["rules"]
    injected = {frozenset((r["id"], r["copies"])) for r in rules if r["copies"]}
    found = {frozenset((p.a, p.b)) for p in result.redundant}
    assert found == injected
