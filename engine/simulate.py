"""Simulated rating stores drawn from the generative model of design.md §1, with the truth kept.

The model (all draws independent unless stated; σ(t) = 1 / (1 + e^−t)):

Per rule i = 1…R, drawn once from the seed:
    ρ_i ~ Beta(1, (1 − μ)/μ)                 how often rule i is relevant (mean μ = relevance_rate)
    τ_i = τ · exp(s·ξ_i), ξ_i ~ N(0, 1)      the judge's noise scale on rule i when it is
                                             irrelevant (s = noise_spread; s = 0: all equal τ)
Per pair n:
    Y_n = +1 (A better) with probability π (prior), else −1;  stored as truth = (Y_n + 1)/2
Per pair n and rule i:
    r_ni ~ Beta(κ·ρ_i, κ·(1 − ρ_i))           stored relevance (κ = relevance_concentration);
                                             it is calibrated: P(relevant | r_ni) = r_ni
    Z_ni ~ Bernoulli(r_ni)                   whether rule i actually bears on pair n
    relevant (Z = 1):   m ~ Uniform(0, 2),  V = Y_n with probability g(m) = σ(β·m), else −Y_n,
                        d_ni = V·m           (β = slope: the vote of a larger discrepancy is
                                             more reliable, g(0) = 1/2)
    irrelevant (Z = 0): d_ni = clip(τ_i·ε, −2, 2), ε ~ N(0, 1)   (noise, independent of Y)
    position bias:      d_ni ← clip(d_ni + b, −2, 2)             (b = position_bias, default 0)
    scores:             c ~ Uniform(−1 + |d|/2, 1 − |d|/2),  s_i(A) = c + d/2,  s_i(B) = c − d/2

Duplicated rules (duplicates = D > 0) break the conditional independence of votes on purpose:
the last D rules copy the D most often relevant of the first R − D rules (largest ρ_i, lower
index first): rule j copying rule i has r_nj = r_ni, Z_nj = Z_ni and
d_nj = clip(d_ni + η·ε, −2, 2) with η = duplicate_noise, and its own midpoint c.

Under these assumptions (D = 0, b = 0, equal τ) rule i's vote carries
I(Y; V_i | m, relevant) = 1 − H_b(σ(β·m)) bits, increasing in |d|, and the Bayes label of the
relevant rules' votes is sign(Σ d_i) — the claim that ``dynrules ablate`` tests.

Pairs are generated in blocks of BLOCK_ROWS, each from its own generator seeded by
(seed, block), so a store is the same whatever the chunking of the write.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dynrules.atomic import atomic_path
from dynrules.engine.pool import Rule, RulePool
from dynrules.engine.store import PairTableWriter, RatingStore
from dynrules.errors import DynrulesError
from dynrules.settings import option, section

BLOCK_ROWS = 8192
MAX_DISCREPANCY = 2.0
PARAMETERS_FILE = "simulation.json"


@section(frozen=True)
class SimulationModel:
    """The generative model's parameters: the ``simulate`` section of the configuration tree."""

    n_rules: int = option(100, "Rules R.", flag="rules")
    relevance_rate: float = option(0.1, "Mean per-rule relevance rate μ.")
    relevance_concentration: float = option(2.0, "κ of the per-pair relevance Beta.")
    slope: float = option(2.0, "β of g(|d|) = σ(β|d|).")
    noise: float = option(0.25, "τ: irrelevant rules' discrepancy noise scale.")
    noise_spread: float = option(0.0, "Log-normal spread of per-rule noise scales.")
    duplicates: int = option(0, "Rules that duplicate the most relevant ones.")
    duplicate_noise: float = option(0.05, "η: a duplicate's extra discrepancy noise.")
    position_bias: float = option(0.0, "b: added to every discrepancy (favours A).")
    prior: float = option(0.5, "P(A is better).")

    def check(self) -> None:
        problems = []
        if self.n_rules < 1:
            problems.append("rules must be at least 1")
        if not 0 < self.relevance_rate < 1:
            problems.append("relevance rate must be in (0, 1)")
        if self.relevance_concentration <= 0:
            problems.append("relevance concentration must be positive")
        if self.slope < 0 or self.noise < 0 or self.noise_spread < 0 or self.duplicate_noise < 0:
            problems.append("slope, noise, noise spread and duplicate noise must be non-negative")
        if not 0 <= self.duplicates <= self.n_rules // 2:
            problems.append(f"duplicates must be between 0 and R/2 = {self.n_rules // 2}")
        if not 0 <= self.prior <= 1:
            problems.append("prior must be in [0, 1]")
        if abs(self.position_bias) > MAX_DISCREPANCY:
            problems.append("position bias must be within [-2, 2]")
        if problems:
            raise DynrulesError("bad simulation parameters: " + "; ".join(problems))


@dataclass(frozen=True)
class RuleParameters:
    relevance_rate: np.ndarray  # ρ [R]
    noise_scale: np.ndarray  # τ [R]
    source: np.ndarray  # [R]: the rule each rule copies (itself when it is not a duplicate)


def rule_parameters(model: SimulationModel, seed: int) -> RuleParameters:
    rng = np.random.default_rng([seed, 0x5EED])
    mu = model.relevance_rate
    # Clipped away from 0 and 1, where the per-pair Beta below is undefined.
    rho = np.clip(rng.beta(1.0, (1.0 - mu) / mu, model.n_rules), 1e-6, 1 - 1e-6)
    tau = model.noise * np.exp(model.noise_spread * rng.standard_normal(model.n_rules))
    source = np.arange(model.n_rules)
    n_base = model.n_rules - model.duplicates
    if model.duplicates:
        originals = np.lexsort((np.arange(n_base), -rho[:n_base]))[: model.duplicates]
        source[n_base:] = originals
        rho[n_base:] = rho[originals]
        tau[n_base:] = tau[originals]
    return RuleParameters(rho, tau, source)


def generate_block(model: SimulationModel, params: RuleParameters, seed: int, block: int, n: int):
    """(scores_a, scores_b, relevance [n, R] float32, truth [n] int8) of block ``block``."""
    rng = np.random.default_rng([seed, block])
    n_rules, n_base = model.n_rules, model.n_rules - model.duplicates
    rho, tau = params.relevance_rate[:n_base], params.noise_scale[:n_base]
    y = np.where(rng.random(n) < model.prior, 1.0, -1.0)
    kappa = model.relevance_concentration
    relevance = rng.beta(kappa * rho, kappa * (1.0 - rho), (n, n_base))
    relevant = rng.random((n, n_base)) < relevance
    magnitude = rng.uniform(0.0, MAX_DISCREPANCY, (n, n_base))
    agrees = rng.random((n, n_base)) < 1.0 / (1.0 + np.exp(-model.slope * magnitude))
    informative = np.where(agrees, 1.0, -1.0) * y[:, None] * magnitude
    noise = np.clip(tau * rng.standard_normal((n, n_base)), -MAX_DISCREPANCY, MAX_DISCREPANCY)
    d = np.clip(
        np.where(relevant, informative, noise) + model.position_bias,
        -MAX_DISCREPANCY,
        MAX_DISCREPANCY,
    )
    if model.duplicates:
        originals = params.source[n_base:]
        copies = d[:, originals] + model.duplicate_noise * rng.standard_normal(
            (n, model.duplicates)
        )
        d = np.concatenate([d, np.clip(copies, -MAX_DISCREPANCY, MAX_DISCREPANCY)], axis=1)
        relevance = np.concatenate([relevance, relevance[:, originals]], axis=1)
    half = np.abs(d) / 2.0
    middle = rng.uniform(-1.0 + half, 1.0 - half, (n, n_rules))
    a = np.clip(middle + d / 2.0, -1.0, 1.0).astype(np.float32)
    b = np.clip(middle - d / 2.0, -1.0, 1.0).astype(np.float32)
    return a, b, relevance.astype(np.float32), (y > 0).astype(np.int8)


def simulated_pool(n_rules: int) -> RulePool:
    return RulePool(
        "simulated",
        tuple(Rule(f"sim_{i:03d}", "simulated", f"simulated rule {i}") for i in range(n_rules)),
    )


@dataclass(frozen=True)
class SimulationSummary:
    """What ``dynrules simulate`` drew."""

    pairs: int
    rules: int
    dtype: str
    a_better: int
    duplicates: int
    seconds: float


def simulate(
    out,
    n_pairs: int,
    model: SimulationModel | None = None,
    *,
    seed: int = 0,
    dtype: str = "float32",
) -> SimulationSummary:
    """Write a simulated store (with the pair field ``truth`` and simulation.json) at ``out``
    (``model`` None: the default model)."""
    model = model or SimulationModel()
    model.check()
    if n_pairs < 1:
        raise DynrulesError("pairs must be at least 1")
    started = time.perf_counter()
    params = rule_parameters(model, seed)
    pool = simulated_pool(model.n_rules)
    with atomic_path(out) as tmp:
        store = RatingStore.create(
            tmp,
            pool=pool,
            dtype=dtype,
            has_relevance=True,
            n_pairs=n_pairs,
            source=f"dynrules simulate (seed {seed})",
            judge="simulated",
            chunk_rows=BLOCK_ROWS,
        )
        writer = PairTableWriter(store.pairs_path)
        a_better = 0
        for block, lo in enumerate(range(0, n_pairs, BLOCK_ROWS)):
            n = min(BLOCK_ROWS, n_pairs - lo)
            a, b, relevance, truth = generate_block(model, params, seed, block, n)
            store.write_rows(lo, a, b, relevance)
            ids = [str(i) for i in range(lo, lo + n)]
            writer.write(
                {
                    "id": ids,
                    "prompt": [f"simulated prompt {i}" for i in ids],
                    "response_a": [f"simulated response A {i}" for i in ids],
                    "response_b": [f"simulated response B {i}" for i in ids],
                    "truth": truth,
                }
            )
            a_better += int(truth.sum())
        writer.close()
        store.write_manifest()
        description = {
            "model": asdict(model),
            "seed": seed,
            "rules": [
                {
                    "id": rule.id,
                    "relevance_rate": float(rho),
                    "noise_scale": float(tau),
                    "copies": pool.ids[src] if src != i else None,
                }
                for i, (rule, rho, tau, src) in enumerate(
                    zip(pool, params.relevance_rate, params.noise_scale, params.source, strict=True)
                )
            ],
        }
        (Path(tmp) / PARAMETERS_FILE).write_text(json.dumps(description, indent=2) + "\n")
    return SimulationSummary(
        pairs=n_pairs,
        rules=model.n_rules,
        dtype=dtype,
        a_better=a_better,
        duplicates=model.duplicates,
        seconds=round(time.perf_counter() - started, 3),
    )
