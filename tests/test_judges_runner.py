"""Rating pairs into a store: values, failures, plans, resumption after kill -9, the CLI."""

import gzip
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dynrules.benchmarks.paths import HH_TEST
from dynrules.cli import main
from dynrules.engine.judges.loopback import MALFORMED, Faults, LoopbackServer, synthetic_rating
from dynrules.engine.judges.openai import OpenAIJudge
from dynrules.engine.judges.runner import rate_pairs
from dynrules.engine.judges.templates import load_template
from dynrules.engine.pool import load_pool
from dynrules.engine.ratinglog import DONE, LOG, fold, read_done, read_log
from dynrules.engine.store import RatingStore
from dynrules.errors import DynrulesError, InputError

from .conftest import write_jsonl

FAST = dict(backoff=0.01, max_backoff=0.05, timeout=5.0)


def pairs(n, marker_rows=()):
    return [
        {
            "id": f"p{i}",
            "prompt": f"question {i}" + (f" {MALFORMED}" if i in marker_rows else ""),
            "response_a": f"answer A{i}",
            "response_b": f"answer B{i}",
            "truth": i % 2,
        }
        for i in range(n)
    ]


def expected_arrays(records, pool):
    template = load_template()
    shape = (len(records), len(pool))
    a, b, relevance = (
        np.zeros(shape, np.float32),
        np.zeros(shape, np.float32),
        np.zeros(shape, np.float32),
    )
    for row, record in enumerate(records):
        for col, rule in enumerate(pool.texts):
            sa, ra = synthetic_rating(template.render(record["prompt"], record["response_a"], rule))
            sb, rb = synthetic_rating(template.render(record["prompt"], record["response_b"], rule))
            a[row, col], b[row, col], relevance[row, col] = sa, sb, np.mean(np.float32([ra, rb]))
    return a, b, relevance


def store_contents(path):
    store = RatingStore.open(path)
    arrays = {
        name: store.array(name)[...].read().result()
        for name in ("scores_a", "scores_b", "relevance", DONE)
    }
    return arrays, store.manifest, pq.read_table(store.pairs_path)


@pytest.fixture
def server():
    with LoopbackServer() as running:
        yield running


def test_rates_every_cell_with_the_servers_values(tmp_path, server, small_pool):
    records = pairs(5)
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", prompts_per_request=6, **FAST)
    summary = rate_pairs(records, tmp_path / "store", pool=small_pool, judge=judge, progress=False)
    assert (summary.rated, summary.skipped_done, summary.failed) == (40, 0, 0)
    arrays, manifest, table = store_contents(tmp_path / "store")
    for name, values in zip(
        ("scores_a", "scores_b", "relevance"), expected_arrays(records, small_pool), strict=True
    ):
        np.testing.assert_allclose(arrays[name], values, atol=1e-6)
    assert arrays[DONE].all() and manifest["rating"]["done"] == 40
    assert manifest["judge"] == "openai-completions:m" and manifest["template"].startswith(
        "default sha256:"
    )
    assert table.column("id").to_pylist() == [r["id"] for r in records]
    assert table.column("truth").to_pylist() == [r["truth"] for r in records]
    assert not read_log(RatingStore.open(tmp_path / "store")).size

    again = rate_pairs(records, tmp_path / "store", pool=small_pool, judge=judge, progress=False)
    assert (again.rated, again.skipped_done, again.failed) == (0, 40, 0)


def test_failures_are_recorded_not_stored_and_retried_next_run(tmp_path, server, small_pool):
    records = pairs(4, marker_rows={2})
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
    summary = rate_pairs(records, tmp_path / "store", pool=small_pool, judge=judge, progress=False)
    assert (summary.rated, summary.failed) == (24, 8)
    arrays, _, _ = store_contents(tmp_path / "store")
    assert not arrays[DONE][2].any() and arrays[DONE][[0, 1, 3]].all()
    assert (arrays["scores_a"][2] == 0).all()  # untouched fill, flagged not-done: never a rating
    failures = [
        json.loads(line)
        for line in (tmp_path / "store" / "failures.jsonl").read_text().splitlines()
    ]
    assert len(failures) == 8 and {f["id"] for f in failures} == {"p2"}
    assert all("not JSON" in f["reason"] for f in failures)
    asked_before = server.requests
    again = rate_pairs(records, tmp_path / "store", pool=small_pool, judge=judge, progress=False)
    assert (again.rated, again.skipped_done, again.failed) == (0, 24, 8)
    assert server.requests == asked_before + 1  # only the failed pair is asked again


def test_plan_rates_only_planned_rules_and_validates(tmp_path, server, small_pool):
    records = pairs(3)
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
    plan = write_jsonl(
        tmp_path / "plan.jsonl",
        [{"id": "p0", "rule_ids": ["r1", "r3"]}, {"id": "p2", "rule_ids": ["r0"]}],
    )
    summary = rate_pairs(
        records, tmp_path / "store", pool=small_pool, judge=judge, plan=plan, progress=False
    )
    assert summary.rated == 3
    done = store_contents(tmp_path / "store")[0][DONE]
    assert [tuple(np.flatnonzero(row)) for row in done] == [(1, 3), (), (0,)]
    rest = rate_pairs(records, tmp_path / "store", pool=small_pool, judge=judge, progress=False)
    assert (rest.rated, rest.skipped_done) == (21, 3)

    for lines, match in [
        (
            [{"id": "nope", "rule_ids": ["r0"]}],
            r"plan.jsonl, line 1, field 'id': no pair with id 'nope'",
        ),
        (
            [{"id": "p0", "rule_ids": ["r0"]}, {"id": "p1", "rule_ids": ["zz"]}],
            r"line 2, field 'rule_ids': unknown rule ids .*zz",
        ),
        ([{"id": "p0", "rule_ids": "r0"}], r"line 1, field 'rule_ids': expected a list"),
        ([{"rule_ids": ["r0"]}], r"line 1, field 'id': missing field"),
        (["{not json"], r"line 1: malformed JSON"),
    ]:
        bad = write_jsonl(tmp_path / "plan.jsonl", lines)
        with pytest.raises(InputError, match=match):
            rate_pairs(
                records, tmp_path / "other", pool=small_pool, judge=judge, plan=bad, progress=False
            )


def test_store_is_only_continued_with_the_same_judge_pairs_and_pool(tmp_path, server, small_pool):
    records = pairs(2)
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
    rate_pairs(records, tmp_path / "store", pool=small_pool, judge=judge, progress=False)
    other_model = OpenAIJudge(small_pool, base_url=server.url, model="other", **FAST)
    with pytest.raises(
        InputError, match="field 'judge': store was rated with judge 'openai-completions:m'"
    ):
        rate_pairs(records, tmp_path / "store", pool=small_pool, judge=other_model, progress=False)
    other_template = OpenAIJudge(
        small_pool, base_url=server.url, model="m", template="published-order", **FAST
    )
    with pytest.raises(InputError, match="field 'template'"):
        rate_pairs(
            records, tmp_path / "store", pool=small_pool, judge=other_template, progress=False
        )
    with pytest.raises(InputError, match="different pairs"):
        rate_pairs(pairs(3), tmp_path / "store", pool=small_pool, judge=judge, progress=False)
    with pytest.raises(DynrulesError, match="different rule pool"):
        rate_pairs(records, tmp_path / "store", pool=load_pool(), judge=judge, progress=False)


def test_fold_is_idempotent_and_torn_records_are_dropped(tmp_path, server, small_pool):
    records = pairs(3)
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
    rate_pairs(records, tmp_path / "full", pool=small_pool, judge=judge, progress=False)
    plan = {"p0": ["r0"]}
    rate_pairs(records, tmp_path / "store", pool=small_pool, judge=judge, plan=plan, progress=False)
    store = RatingStore.open(tmp_path / "store")
    full = store_contents(tmp_path / "full")[0]
    # Commit two cells by hand, as a killed run would have left them: once mid-fold, once torn.
    log = read_log(store)
    record = np.zeros(2, log.dtype)
    record["row"], record["rule"] = [1, 2], [4, 5]
    for i, (row, rule) in enumerate(zip(record["row"], record["rule"], strict=True)):
        record["a"][i], record["b"][i], record["relevance"][i] = (
            full[name][row, rule] for name in ("scores_a", "scores_b", "relevance")
        )
    raw = record.tobytes()
    (store.path / LOG).write_bytes(raw + raw[:7])  # the second copy is torn
    assert read_done(store.path)[1, 4] and read_done(store.path)[2, 5]
    assert fold(store) == 2
    (store.path / LOG).write_bytes(raw)  # a kill between writing the arrays and emptying the log
    assert fold(store) == 2
    arrays = store_contents(tmp_path / "store")[0]
    assert np.flatnonzero(arrays[DONE].ravel()).tolist() == [0, 12, 21]
    for name in ("scores_a", "scores_b", "relevance"):
        assert arrays[name][1, 4] == full[name][1, 4] and arrays[name][2, 5] == full[name][2, 5]


def _rate_command(pairs_path, url, out):
    return [
        str(Path(sys.executable).with_name("dynrules")),
        "rate",
        str(pairs_path),
        "--judge",
        "openai",
        "--base-url",
        url,
        "--model",
        "m",
        "--concurrency",
        "2",
        "--out",
        str(out),
        "--json",
    ]


def test_kill_and_resume_gives_the_uninterrupted_store(tmp_path, small_pool):
    records = [{"prompt": f"q{i}", "responseA": f"a{i}", "responseB": f"b{i}"} for i in range(60)]
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", records)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with LoopbackServer() as server:
        done = subprocess.run(
            _rate_command(pairs_path, server.url, tmp_path / "whole"),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["rated"] == 6000
    with LoopbackServer(Faults(delay=0.02)) as server:
        killed = subprocess.Popen(
            _rate_command(pairs_path, server.url, tmp_path / "resumed"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        log, deadline = tmp_path / "resumed" / LOG, time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists() and log.stat().st_size > 40 * 24):
            time.sleep(0.01)
        killed.send_signal(signal.SIGKILL)
        killed.wait()
        committed = read_done(tmp_path / "resumed")
        assert 0 < committed.sum() < committed.size  # killed mid-run
        asked_first = server.questions.copy()
        server.handler.faults.delay = 0.0
        resumed = subprocess.run(
            _rate_command(pairs_path, server.url, tmp_path / "resumed"),
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert resumed.returncode == 0, resumed.stderr
        summary = json.loads(resumed.stdout)
        assert (
            summary["skipped_done"] == committed.sum()
            and summary["rated"] == 6000 - committed.sum()
        )
        asked_second = server.questions - asked_first
    # Nothing committed before the kill was asked again.
    pool, template = load_pool(), load_template()
    for row, rule in zip(*np.nonzero(committed), strict=True):
        question = template.render(f"q{row}", f"a{row}", pool.texts[rule])
        assert asked_first[question] == 1 and asked_second[question] == 0
    whole, resumed_store = store_contents(tmp_path / "whole"), store_contents(tmp_path / "resumed")
    for name in whole[0]:
        np.testing.assert_array_equal(whole[0][name], resumed_store[0][name])
    assert {k: v for k, v in whole[1].items() if k != "source"} == {
        k: v for k, v in resumed_store[1].items() if k != "source"
    }
    assert whole[2].equals(resumed_store[2])


@pytest.mark.skipif(not HH_TEST.exists(), reason="HH test data not present")
def test_cli_rate_hh_transcripts_keeps_truth_and_hides_the_key(tmp_path, small_pool):
    with gzip.open(HH_TEST, "rt") as handle:
        lines = [next(handle) for _ in range(4)]
    pairs_path = tmp_path / "hh.jsonl"
    pairs_path.write_text("".join(lines))
    pool_path = tmp_path / "pool.txt"
    pool_path.write_text("\n".join(small_pool.texts))
    with LoopbackServer() as server:
        os.environ["DYNRULES_TEST_KEY"] = "sk-should-never-appear"
        try:
            result = CliRunner().invoke(
                main,
                [
                    "rate",
                    str(pairs_path),
                    "--pool",
                    str(pool_path),
                    "--judge",
                    "openai",
                    "--base-url",
                    server.url,
                    "--model",
                    "m",
                    "--api-key-env",
                    "DYNRULES_TEST_KEY",
                    "--out",
                    str(tmp_path / "store"),
                    "--json",
                ],
            )
        finally:
            del os.environ["DYNRULES_TEST_KEY"]
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {
        **json.loads(result.output),
        "rated": 32,
        "skipped_done": 0,
        "failed": 0,
    }
    assert set(json.loads(result.output)) == {"rated", "skipped_done", "failed", "seconds"}
    table = pq.read_table(tmp_path / "store" / "pairs.parquet")
    assert set(table.column("truth").to_pylist()) <= {0, 1}
    for path in (tmp_path / "store").rglob("*"):
        if path.is_file():
            assert b"sk-should-never-appear" not in path.read_bytes(), path
    assert "sk-should-never-appear" not in result.output


def test_cli_rate_errors_are_one_line(tmp_path):
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", pairs(2))
    result = CliRunner().invoke(
        main, ["rate", str(pairs_path), "--judge", "openai", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 2 and "needs --base-url and --model" in result.output
    result = CliRunner().invoke(
        main,
        [
            "rate",
            str(pairs_path),
            "--judge",
            "openai",
            "--base-url",
            "http://x/v1",
            "--model",
            "m",
            "--api-key-env",
            "DYNRULES_UNSET_VAR",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 2 and "DYNRULES_UNSET_VAR is not set" in result.output
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "response_a": "a"}])
    result = CliRunner().invoke(
        main,
        [
            "rate",
            str(bad),
            "--judge",
            "openai",
            "--base-url",
            "http://x/v1",
            "--model",
            "m",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert (
        result.exit_code == 2
        and "bad.jsonl, line 1, field 'response_b': missing field" in result.output
    )


def conversation_starts(questions):
    """How many times the asked conversation changes (the text before the rule), counting the first."""
    conversations = [q.split("Rule:")[0] for q in questions]
    return 1 + sum(a != b for a, b in zip(conversations, conversations[1:], strict=False))


def test_rate_with_the_defaults_against_a_llama_cpp_server(tmp_path, small_pool, caplog):
    records = pairs(6)
    with LoopbackServer(llama_cpp=True) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
        with caplog.at_level(logging.WARNING, logger="dynrules.engine.judges.openai"):
            summary = rate_pairs(
                records, tmp_path / "s", pool=small_pool, judge=judge, progress=False
            )
        assert summary.rated == 6 * 8 and summary.failed == 0
        arrays, _, _ = store_contents(tmp_path / "s")
        for name, want in zip(
            ("scores_a", "scores_b", "relevance"), expected_arrays(records, small_pool), strict=True
        ):
            np.testing.assert_allclose(arrays[name], want, atol=1e-6)
        # Learned from the first request, said once: a list of 16 refused (the same 500 twice),
        # its first prompt alone answered, the list refused again; then one prompt a request.
        (notice,) = [r.getMessage() for r in caplog.records]
        assert "refused a request of 16 prompts" in notice and "one pair at a time" in notice
        assert judge.prompts_per_request == 1 and judge.concurrency == 1
        assert server.requests == 4 + 2 * 6 * 8
        # Every rule of one response back to back: each conversation is started once.
        assert conversation_starts(server.order) == 2 * len(records)


def test_cli_rate_stops_at_once_with_one_actionable_line(tmp_path, small_pool):
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", pairs(40))
    pool_path = tmp_path / "pool.txt"
    pool_path.write_text("\n".join(small_pool.texts))
    with LoopbackServer(Faults(status_first=10**6, status=500)) as server:
        started = time.perf_counter()
        result = CliRunner().invoke(
            main,
            [
                "rate",
                str(pairs_path),
                "--pool",
                str(pool_path),
                "--judge",
                "openai",
                "--base-url",
                server.url,
                "--model",
                "m",
                "--out",
                str(tmp_path / "s"),
                "--json",
            ],
        )
        seconds = time.perf_counter() - started
        # Two pairs, each: the list twice, its first prompt alone twice (the default backoff
        # waits about a second between the two attempts of each).
        assert server.requests == 8
    assert result.exit_code == 2 and seconds < 15
    (line,) = result.output.strip().splitlines()
    assert line.startswith(f"error: nothing rated: {server.url}/completions failed the same way")
    assert "HTTP 500" in line and "--endpoint chat" in line and "--model 'loopback'" in line
