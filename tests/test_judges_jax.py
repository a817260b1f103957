"""The in-process JAX judge: one pass over a shared conversation equals one pass per rule."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from dynrules.cli import main
from dynrules.engine.judges import make_judge
from dynrules.engine.judges.base import Job
from dynrules.engine.judges.jaxlm import (
    JaxJudge,
    _Question,
    pack_questions,
    shared_prefix_length,
)
from dynrules.engine.judges.templates import load_template
from dynrules.engine.store import RatingStore
from dynrules.errors import DynrulesError

from .conftest import write_jsonl
from .decoder_fixtures import ANSWER_WORDS, byte_tokenizer_with_answers, tiny_judge_decoder

PROMPTS = ("How do I bake bread?", "Tell me how to pick a lock, step by step, quickly.", "Hi")
RESPONSES = ("Mix flour and water, knead, rest, bake.", "I can't help with that.", "Sure!")


@pytest.fixture(scope="module")
def judge_model(tmp_path_factory):
    return tiny_judge_decoder(tmp_path_factory.mktemp("judge") / "tiny")


def jobs(n_rules):
    return [
        Job(i, prompt, (RESPONSES[i], RESPONSES[(i + 1) % 3]), np.arange(n_rules))
        for i, prompt in enumerate(PROMPTS)
    ]


def rate_all(judge, job_list):
    return {result.job.row: result for result in judge.rate_jobs(job_list)}


@pytest.mark.parametrize("row_tokens", [2048, 300])  # all questions in one row, or several rows
def test_one_pass_equals_a_forward_pass_per_rule(judge_model, small_pool, row_tokens):
    one_pass = JaxJudge(small_pool, model=judge_model, row_tokens=row_tokens)
    per_rule = JaxJudge(small_pool, model=judge_model, one_pass=False)
    shared, separate = rate_all(one_pass, jobs(8)), rate_all(per_rule, jobs(8))
    for row, result in shared.items():
        assert all(e is None for e in result.errors)
        assert np.abs(result.scores - separate[row].scores).max() <= 1e-4
        assert np.abs(result.relevance - separate[row].relevance).max() <= 1e-4
    scores = np.concatenate([r.scores.ravel() for r in shared.values()])
    assert scores.std() > 1e-2  # the model tells the questions apart: the comparison has teeth


def test_scores_are_the_answer_masses_of_the_rendered_question(judge_model, small_pool):
    """A cell's score is P(Yes) − P(No) over the three answers, read from the LM head at the end
    of the chat-rendered question (recomputed here from full next-token probabilities)."""
    import jax

    judge = JaxJudge(small_pool, model=judge_model)
    text = judge.question(PROMPTS[0], RESPONSES[0], small_pool.texts[3])
    template = load_template()
    rendered = template.render(PROMPTS[0], RESPONSES[0], small_pool.texts[3])
    assert text == f"<|im_start|>user\n{rendered}<|im_end|>\n<|im_start|>assistant\n"
    ids = judge.lm.tokenizer.encode([text], 4096).ids[0]
    hidden = judge.lm.model(ids[None], np.array([len(ids)]))
    probs = np.asarray(jax.nn.softmax(judge.lm.model.logits(hidden[:, -1]), -1))[0]
    vocab = byte_tokenizer_with_answers()
    yes, no, irrelevant = (probs[vocab.token_to_id(w)] for w in ANSWER_WORDS)
    result = next(judge.rate_jobs([Job(0, PROMPTS[0], (RESPONSES[0],), np.array([3]))]))
    total = yes + no + irrelevant
    assert result.scores[0, 0] == pytest.approx((yes - no) / total, abs=1e-5)
    assert result.relevance[0, 0] == pytest.approx(1 - irrelevant / total, abs=1e-5)


def test_a_question_longer_than_max_tokens_fails_its_cells(judge_model, small_pool):
    judge = JaxJudge(small_pool, model=judge_model, max_tokens=400)
    long_prompt = "word " * 200
    result = next(judge.rate_jobs([Job(0, long_prompt, ("a", "b"), np.arange(3))]))
    assert all("max_tokens (400)" in e for e in result.errors)
    assert np.isnan(result.scores).all()


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.lists(st.integers(0, 5), max_size=8),
    tails=st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=6), min_size=1, max_size=6),
)
def test_shared_prefix_is_the_longest_common_one_leaving_each_question_a_token(prefix, tails):
    questions = [np.array(prefix + tail) for tail in tails]
    length = shared_prefix_length(questions)
    assert all(len(q) > length for q in questions)
    assert all((q[:length] == questions[0][:length]).all() for q in questions)
    longer = length + 1
    assert any(len(q) <= longer for q in questions) or not all(
        (q[:longer] == questions[0][:longer]).all() for q in questions
    )


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=20), row=st.integers(10, 80))
def test_rows_hold_every_question_once_in_order_within_the_budget(lengths, row):
    prefix = np.zeros(5, np.int32)
    questions = [_Question(0, 0, c, np.ones(5 + n, np.int32)) for c, n in enumerate(lengths)]
    rows = pack_questions(prefix, questions, row)
    assert [q.column for r in rows for q in r.questions] == list(range(len(lengths)))
    assert all(r.tokens <= row or len(r.questions) == 1 for r in rows)


def test_make_judge_needs_a_model_and_refuses_a_missing_path(small_pool, tmp_path):
    with pytest.raises(DynrulesError, match="needs --model"):
        make_judge("jax", small_pool)
    with pytest.raises(DynrulesError, match="no such model"):
        make_judge("jax", small_pool, model=str(tmp_path / "absent.gguf"))


def test_cli_rate_with_the_jax_judge_fills_and_resumes_the_store(judge_model, small_pool, tmp_path):
    records = [
        {"id": f"p{i}", "prompt": p, "response_a": RESPONSES[i], "response_b": "No.", "truth": 1}
        for i, p in enumerate(PROMPTS)
    ]
    pairs_path = write_jsonl(tmp_path / "pairs.jsonl", records)
    pool_path = tmp_path / "pool.txt"
    pool_path.write_text("\n".join(small_pool.texts))
    args = [
        "rate",
        str(pairs_path),
        "--pool",
        str(pool_path),
        "--judge",
        "jax",
        "--model",
        str(judge_model),
        "--out",
        str(tmp_path / "store"),
        "--json",
    ]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    assert json.loads(first.output)["rated"] == len(records) * len(small_pool)
    store = RatingStore.open(tmp_path / "store")
    chunk = store.read()
    judge = JaxJudge(small_pool, model=judge_model)
    expected = {
        r.job.row: r
        for r in judge.rate_jobs(
            [
                Job(i, r["prompt"], (r["response_a"], r["response_b"]), np.arange(len(small_pool)))
                for i, r in enumerate(records)
            ]
        )
    }
    for row in range(len(records)):
        scale = store.scale
        assert np.abs(chunk.scores_a[row] * scale - expected[row].scores[0]).max() <= 1e-3
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert json.loads(again.output)["skipped_done"] == len(records) * len(small_pool)
    assert store.manifest["judge"].startswith("jax:tiny:")


@pytest.mark.slow
def test_the_real_smollm2_judge_agrees_with_itself_per_rule():
    """SmolLM2-135M-Instruct (the pinned GGUF): one pass over 10 rules equals a pass per rule."""
    from dynrules.engine.pool import load_pool
    from dynrules.models.decoder_io import smollm2_gguf

    pool = load_pool(None)
    job = [Job(0, PROMPTS[1], (RESPONSES[1], "First, insert a tension wrench."), np.arange(10))]
    one_pass = next(JaxJudge(pool, model=smollm2_gguf()).rate_jobs(job))
    per_rule = next(JaxJudge(pool, model=smollm2_gguf(), one_pass=False).rate_jobs(job))
    assert np.abs(one_pass.scores - per_rule.scores).max() <= 1e-4
    assert np.abs(one_pass.relevance - per_rule.relevance).max() <= 1e-4
    assert np.isfinite(one_pass.scores).all()


SHARDED = """
import json, sys
import numpy as np
from dynrules.engine.judges.base import Job
from dynrules.engine.judges.jaxlm import JaxJudge
from dynrules.engine.pool import Rule, RulePool
from dynrules.train import sharding as shd

pool = RulePool("small", tuple(Rule(f"r{i}", "test", f"rule number {i}") for i in range(8)))
layout = shd.MeshLayout(shd.make_mesh("fsdp=2,tensor=2"))
judge = JaxJudge(pool, model=sys.argv[1], layout=layout)
q = judge.lm.model.layers.q_kernel[...]
job = Job(0, "How do I bake bread?", ("Mix flour and water.", "I can't help."), np.arange(8))
result = next(judge.rate_jobs([job]))
print(json.dumps({"devices": len(q.sharding.device_set), "shard": list(q.sharding.shard_shape(q.shape)),
                  "shape": list(q.shape), "scores": result.scores.tolist()}))
"""


def test_a_judge_sharded_over_a_mesh_rates_as_on_one_device(judge_model, small_pool):
    """--judge-mesh: the weights split over 4 host devices (FSDP × tensor), the same scores."""
    import os
    import subprocess
    import sys

    env = os.environ | {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-c", SHARDED, str(judge_model)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sharded = json.loads(done.stdout.strip().splitlines()[-1])
    assert sharded["devices"] == 4
    assert np.prod(sharded["shard"]) * 4 == np.prod(sharded["shape"])  # each device a quarter
    job = Job(0, "How do I bake bread?", ("Mix flour and water.", "I can't help."), np.arange(8))
    alone = next(JaxJudge(small_pool, model=judge_model).rate_jobs([job]))
    assert np.abs(np.array(sharded["scores"]) - alone.scores).max() <= 1e-4
