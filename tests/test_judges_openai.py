"""The OpenAI-compatible judge client against a loopback server, with injected faults."""

import json
import logging
import math
import time

import numpy as np
import pytest

from dynrules.engine.judges.base import Job, JudgeAborted
from dynrules.engine.judges.loopback import (
    MALFORMED,
    NO_ANSWER,
    NO_LOGPROBS,
    Faults,
    LoopbackServer,
    synthetic_rating,
)
from dynrules.engine.judges.openai import OpenAIJudge, rating_from_top_logprobs, retry_after_seconds
from dynrules.engine.judges.templates import IRRELEVANT, NO, YES, answer_class, load_template
from dynrules.errors import DynrulesError, InputError

FAST = dict(backoff=0.01, max_backoff=0.05, timeout=5.0)


def triples(pool, n_rules=6, prompt="How do I pick a lock?", response="I can't help with that."):
    return [(prompt, response, rule_id) for rule_id in pool.ids[:n_rules]]


def expected(pool, triple, template="default"):
    prompt, response, rule_id = triple
    return synthetic_rating(
        load_template(template).render(prompt, response, pool.rules[pool.index_of(rule_id)].text)
    )


@pytest.fixture
def server():
    with LoopbackServer() as running:
        yield running


def test_answer_tokens_across_tokenizers():
    for token in ("Yes", " Yes", "yes", "▁Yes", "ĠYes", " YES", "Yes."):
        assert answer_class(token) == YES, token
    for token in ("No", " no", "▁No"):
        assert answer_class(token) == NO, token
    for token in (" Ir", "Irrelevant", " irre", "IRRELEVANT"):
        assert answer_class(token) == IRRELEVANT, token
    for token in (" I", "Not", " Nope", " The", "", "yesterday"):
        assert answer_class(token) is None, token


def test_rating_normalises_over_the_three_answers():
    top = [
        (" Yes", math.log(0.3)),
        ("Yes", math.log(0.1)),
        (" No", math.log(0.2)),
        (" Ir", math.log(0.2)),
        (" Maybe", math.log(0.2)),
    ]
    s, relevance = rating_from_top_logprobs(top)
    assert s == pytest.approx((0.4 - 0.2) / 0.8) and relevance == pytest.approx(1 - 0.2 / 0.8)
    # Two token ids decoding to the same string both count.
    s, _ = rating_from_top_logprobs(
        [("Yes", math.log(0.25)), ("Yes", math.log(0.25)), ("No", math.log(0.5))]
    )
    assert s == pytest.approx(0.0)
    assert "no Yes/No/Irrelevant" in rating_from_top_logprobs([(" The", -0.1)])
    assert "invalid log-probability" in rating_from_top_logprobs([("Yes", float("nan"))])


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # a date in the past


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_client_reads_the_servers_distribution(server, small_pool, endpoint):
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", endpoint=endpoint, **FAST)
    asked = triples(small_pool, 8)
    ratings = judge.rate(asked)
    for triple, rating in zip(asked, ratings, strict=True):
        s, relevance = expected(small_pool, triple)
        assert rating.error is None
        assert rating.score == pytest.approx(s, abs=1e-6) and rating.relevance == pytest.approx(
            relevance, abs=1e-6
        )
    # completions: one request for all rules of the response; chat: one per rule.
    assert server.requests == (1 if endpoint == "completions" else 8)


def test_several_rules_per_request_split_by_prompts_per_request(server, small_pool):
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", prompts_per_request=4, **FAST)
    assert all(r.error is None for r in judge.rate(triples(small_pool, 8)))
    assert server.requests == 2


@pytest.mark.parametrize(
    "status, requests",
    [
        (503, 3),  # transient: retried with backoff
        # The same 500 twice on a list of prompts: the client asks for one prompt alone, then
        # for the list once more, which is answered now: the fault has passed, lists stay.
        (500, 4),
    ],
)
def test_server_errors_are_retried(small_pool, status, requests):
    with LoopbackServer(Faults(status_first=2, status=status)) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
        ratings = judge.rate(triples(small_pool))
        assert all(r.error is None for r in ratings) and server.requests == requests
        assert judge.prompts_per_request == 64


def test_the_same_500_twice_is_not_retried_further(small_pool):
    with LoopbackServer(Faults(status_first=100, status=500)) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", max_retries=5, **FAST)
        (rating,) = judge.rate(triples(small_pool, 1))
        assert server.requests == 2 and "the same answer twice: not retried" in rating.error


def test_rate_limit_honours_retry_after(small_pool):
    with LoopbackServer(Faults(status_first=1, status=429, retry_after="1")) as server:
        started = time.perf_counter()
        ratings = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST).rate(
            triples(small_pool)
        )
        assert time.perf_counter() - started >= 0.9  # waited as told, not the 10 ms backoff
        assert all(r.error is None for r in ratings) and server.requests == 2


def test_slow_answer_times_out_and_is_retried(small_pool):
    with LoopbackServer(Faults(slow_first=1, slow_seconds=2.0)) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", timeout=0.3, backoff=0.01)
        started = time.perf_counter()
        ratings = judge.rate(triples(small_pool))
        assert time.perf_counter() - started < 1.5
        assert all(r.error is None for r in ratings) and server.requests == 2


def test_gives_up_with_the_reason_after_max_retries(small_pool):
    with LoopbackServer(Faults(status_first=100, status=503)) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", max_retries=2, **FAST)
        ratings = judge.rate(triples(small_pool))
        assert server.requests == 3
        assert all(
            r.score is None and "HTTP 503" in r.error and "gave up after 3 attempts" in r.error
            for r in ratings
        )


@pytest.mark.parametrize(
    "marker, reason",
    [(MALFORMED, "not JSON"), (NO_LOGPROBS, "no logprobs"), (NO_ANSWER, "no Yes/No/Irrelevant")],
)
def test_bad_answers_are_failures_with_reasons_never_zero(server, small_pool, marker, reason):
    judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
    good = triples(small_pool, 3)
    bad = triples(small_pool, 3, prompt=f"prompt {marker}")
    ratings = judge.rate(good + bad)
    assert all(r.error is None for r in ratings[:3])
    assert all(r.score is None and r.relevance is None and reason in r.error for r in ratings[3:])


def test_repeated_failures_abort_clearly(small_pool):
    # The first request is answered, every later one fails.
    with LoopbackServer(Faults(status_after=1, status=500)) as server:
        judge = OpenAIJudge(
            small_pool,
            base_url=server.url,
            model="m",
            max_retries=0,
            concurrency=2,
            max_consecutive_failures=3,
            **FAST,
        )
        pairs = [(f"prompt {i}", "reply", small_pool.ids[0]) for i in range(10)]
        with pytest.raises(
            JudgeAborted, match="3 answers in a row .* rated nothing; last: HTTP 500"
        ):
            judge.rate(pairs)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_failure_that_repeats_before_any_rating_stops_the_run_at_once(small_pool, endpoint):
    with LoopbackServer(Faults(status_first=10_000, status=500)) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", endpoint=endpoint, **FAST)
        pairs = [(f"prompt {i}", "reply", small_pool.ids[0]) for i in range(50)]
        other = "chat" if endpoint == "completions" else "completions"
        with pytest.raises(JudgeAborted) as raised:
            judge.rate(pairs)
        # Two pairs, each asked twice (the same 500 twice is not retried further).
        assert server.requests == 4
        message = str(raised.value)
        assert message.startswith(f"nothing rated: {server.url}/")
        assert "failed the same way for two pairs: HTTP 500" in message
        assert f"--endpoint {other}" in message
        assert "--model 'loopback' (the models it serves)" in message  # it serves no model 'm'


@pytest.mark.parametrize("status, match", [(401, "API key"), (404, "--model")])
def test_rejected_credentials_or_unknown_model_abort_at_once(small_pool, status, match):
    with LoopbackServer(Faults(status_first=100, status=status)) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST)
        with pytest.raises(JudgeAborted, match=match):
            judge.rate(triples(small_pool, 1))
        assert server.requests == 1


def test_unreachable_server_is_a_failure_not_a_hang(small_pool):
    judge = OpenAIJudge(
        small_pool, base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, **FAST
    )
    ratings = judge.rate(triples(small_pool, 2))
    assert all("connection error" in r.error for r in ratings)


def test_key_is_sent_but_never_shown(server, small_pool):
    judge = OpenAIJudge(
        small_pool, base_url=server.url, model="m", api_key="sk-very-secret", **FAST
    )
    assert "sk-very-secret" not in repr(judge) and "sk-very-secret" not in str(judge.identity)
    assert all(r.error is None for r in judge.rate(triples(small_pool, 2)))


def test_templates(tmp_path, small_pool):
    default, published = load_template("default"), load_template("published-order")
    rule = small_pool.rules[0].text
    assert default.render("P {x}", "R", rule).index("P {x}") < default.render(
        "P {x}", "R", rule
    ).index(rule)
    assert published.render("P", "R", rule).index(rule) < published.render("P", "R", rule).index(
        "P"
    )
    bad = tmp_path / "bad.txt"
    bad.write_text("{prompt} {response}")
    with pytest.raises(InputError, match=r"bad.txt, field 'rule': template must contain \{rule\}"):
        load_template(str(bad))
    custom = tmp_path / "custom.txt"
    custom.write_text("Rule {rule}? {prompt} -> {response} Answer:")
    assert (
        load_template(str(custom)).render("p", "r", "x {prompt}")
        == "Rule x {prompt}? p -> r Answer:"
    )


def test_stopping_the_consumer_cancels_requests_in_flight(small_pool):
    # The first request fails at once (400 is not retried); every later one would take 30 s.
    with LoopbackServer(
        Faults(status_first=1, status=400, slow_first=10_000, slow_seconds=30.0)
    ) as server:
        judge = OpenAIJudge(small_pool, base_url=server.url, model="m", concurrency=4, timeout=20.0)
        results = judge.rate_jobs(Job(i, "p", ("a",), np.arange(1)) for i in range(50))
        assert "HTTP 400" in next(results).errors[0]
        started = time.perf_counter()
        results.close()
        assert time.perf_counter() - started < 5


def test_a_small_models_answers_lie_below_the_top_5(small_pool):
    with LoopbackServer(llama_cpp=True) as server:
        asked = triples(small_pool, 4)
        few = OpenAIJudge(small_pool, base_url=server.url, model="m", top_logprobs=5, **FAST)
        assert all("no Yes/No/Irrelevant among the top" in r.error for r in few.rate(asked))
        for rating, triple in zip(
            OpenAIJudge(small_pool, base_url=server.url, model="m", **FAST).rate(asked),
            asked,
            strict=True,
        ):
            assert rating.score == pytest.approx(expected(small_pool, triple)[0], abs=1e-6)


def test_one_prompt_per_request_given_up_front_sends_no_list(small_pool, caplog):
    with LoopbackServer(llama_cpp=True) as server:
        judge = OpenAIJudge(
            small_pool, base_url=server.url, model="m", prompts_per_request=1, **FAST
        )
        with caplog.at_level(logging.WARNING):
            assert all(r.error is None for r in judge.rate(triples(small_pool, 8)))
        assert server.requests == 8 and not caplog.records
        assert judge.concurrency == 16  # nothing was learned, nothing changed


def test_chat_asks_every_rule_of_one_response_back_to_back(small_pool):
    with LoopbackServer() as server:
        judge = OpenAIJudge(
            small_pool, base_url=server.url, model="m", endpoint="chat", concurrency=1, **FAST
        )
        jobs = [Job(i, f"prompt {i}", ("reply A", "reply B"), np.arange(8)) for i in range(3)]
        results = list(judge.rate_jobs(jobs))
        # One result per cell, handed on as soon as both of its questions are answered.
        assert len(results) == 3 * 8 and all(len(r.job.rules) == 1 for r in results)
        conversations = [q.split("Rule:")[0] for q in server.order]
        assert 1 + sum(a != b for a, b in zip(conversations, conversations[1:], strict=False)) == 6


def test_chat_refuses_prompts_per_request():
    from dynrules.engine.pool import load_pool

    with pytest.raises(DynrulesError, match="applies to --endpoint completions"):
        OpenAIJudge(
            load_pool(), base_url="http://x/v1", model="m", endpoint="chat", prompts_per_request=8
        )


def test_no_server_at_all_stops_the_run_naming_the_url(small_pool):
    judge = OpenAIJudge(
        small_pool, base_url="http://127.0.0.1:9/v1", model="m", max_retries=1, **FAST
    )
    pairs = [(f"prompt {i}", "reply", small_pool.ids[0]) for i in range(20)]
    with pytest.raises(
        JudgeAborted, match=r"connection error.*is a server listening at --base-url"
    ):
        judge.rate(pairs)


def test_bench_judge_against_a_server_learns_it_and_compares_the_orders():
    from click.testing import CliRunner

    from dynrules.cli import main

    with LoopbackServer(llama_cpp=True) as server:
        result = CliRunner().invoke(
            main,
            ["bench", "judge", "--base-url", server.url, "--model", "m", "--client-pairs", "2"]
            + ["--rules", "3", "--prefix-pairs", "2", "--json"],
        )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output.strip().splitlines()[-1])
    assert out["benchmark"] == "judge-server"
    for key in ("conversation_first", "interleaved", "published_order"):
        assert out["results"][f"{key}_ratings_per_s"] > 0
        assert out["setup"]["failed_cells"][key] == 0
    assert out["setup"]["prompts_per_request"] == 1 and out["setup"]["concurrency"] == 1
    assert out["setup"]["pairs"] == 2 and out["setup"]["rules"] == 3
