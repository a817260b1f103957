"""CLI round trips (ingest -> select) and every bad input of the foundation issue."""

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from dynrules.cli import main
from dynrules.engine.judges.base import JobResult, Judge
from dynrules.engine.pool import load_pool
from dynrules.engine.select import SelectionConfig, run_selection
from dynrules.engine.store import RatingStore
from dynrules.errors import DynrulesError

from . import naive
from .conftest import scored_records, write_jsonl

R = 100  # the default pool's size


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def scored_jsonl(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", scored_records(50, R))


def test_ingest_select_round_trip(tmp_path, scored_jsonl):
    result = run("ingest", scored_jsonl, "--out", tmp_path / "store", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["pairs"] == 50
    result = run("select", tmp_path / "store", "--k", 5, "--out", tmp_path / "out.jsonl", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert set(summary) == {"pairs", "labelled", "ties", "seconds"} and summary["pairs"] == 50

    records = [json.loads(line) for line in open(tmp_path / "out.jsonl")]
    inputs = scored_records(50, R)
    assert len(records) == summary["labelled"] == 50 - summary["ties"]
    pool = load_pool()
    for record in records:
        source = inputs[int(record["id"])]
        a, b, rel = (np.asarray(source[f], np.float32) for f in ("scoresA", "scoresB", "relevance"))
        index, margin = naive.select_top_k(
            a[None], b[None], rel[None], 5, "additive", 0.5, 1.0, 1.0
        )
        assert record["rule_ids"] == [pool.ids[i] for i in index[0]]
        assert record["margin"] == pytest.approx(abs(margin[0]))
        a_wins = margin[0] > 0
        assert record["chosen"] == source["responseA" if a_wins else "responseB"]
        assert record["rejected"] == source["responseB" if a_wins else "responseA"]
        assert set(record) >= {"id", "prompt", "chosen", "rejected", "margin", "rule_ids"}

    store = RatingStore.open(tmp_path / "store")
    assert store.read_field("truth").tolist() == [i % 2 for i in range(50)]  # extra fields kept
    stored_margin = store.array("selections/adaptive-additive-k5/margin").read().result()
    assert stored_margin.shape == (50,)


def test_parquet_input_and_shards_cover_the_store(tmp_path):
    records = scored_records(40, R, published=False, relevance=False)
    table = pa.table({key: [r[key] for r in records] for key in records[0]})
    pq.write_table(table, tmp_path / "pairs.parquet")
    assert (
        run(
            "ingest", tmp_path / "pairs.parquet", "--out", tmp_path / "store", "--dtype", "int8"
        ).exit_code
        == 0
    )
    ids = []
    for shard in ("0/2", "1/2"):
        result = run(
            "select",
            tmp_path / "store",
            "--shard",
            shard,
            "--ties",
            "b",
            "--out",
            tmp_path / f"{shard[0]}.jsonl",
        )
        assert result.exit_code == 0, result.output
        ids += [json.loads(line)["id"] for line in open(tmp_path / f"{shard[0]}.jsonl")]
    assert ids == [str(i) for i in range(40)]


@pytest.mark.parametrize(
    "policy,extra",
    [
        ("all", []),
        ("random", ["--seed", "3"]),
        ("fixed", ["--rules", "violence.mass_harm_weapons,privacy.doxxing"]),
    ],
)
def test_other_policies(tmp_path, scored_jsonl, policy, extra):
    run("ingest", scored_jsonl, "--out", tmp_path / "store")
    result = run(
        "select",
        tmp_path / "store",
        "--policy",
        policy,
        *extra,
        "--out",
        tmp_path / "o.jsonl",
        "--json",
    )
    assert result.exit_code == 0, result.output
    first = json.loads(open(tmp_path / "o.jsonl").readline())
    expected_k = {"all": R, "random": 5, "fixed": 2}[policy]
    assert len(first["rule_ids"]) == expected_k


def _bad(records_or_lines):
    def build(tmp_path):
        return write_jsonl(tmp_path / "bad.jsonl", records_or_lines)

    return build


def _one(**change):
    record = scored_records(3, R)
    record[1].update(change)
    return record


def _drop(field):
    records = scored_records(3, R)
    del records[1][field]
    return records


BAD_INPUTS = {
    "nan": (_bad(_one(scoresA=[float("nan")] * R)), "line 2.*scores_a.*not finite"),
    "infinite": (
        _bad(_one(scoresA=[0.0] * (R - 1) + [float("inf")])),
        "line 2.*scores_a.*index 99 is not finite",
    ),
    "out of range": (_bad(_one(scoresB=[1.5] + [0.0] * (R - 1))), "line 2.*scores_b.*outside"),
    "relevance out of range": (
        _bad(_one(relevance=[-0.1] + [0.0] * (R - 1))),
        "line 2.*relevance.*outside",
    ),
    "wrong row length": (
        _bad(_one(scoresA=[0.0] * (R - 1))),
        f"line 2.*scores_a.*expected a list of {R}",
    ),
    "R disagrees with the pool": (_bad(scored_records(3, 50)), f"line 1.*expected a list of {R}"),
    "missing column": (_bad(_drop("scoresB")), "line 2.*scores_b.*missing"),
    "missing text": (_bad(_drop("prompt")), "line 2.*prompt.*missing"),
    "malformed JSON": (
        _bad([json.dumps(r) for r in scored_records(2, R)] + ['{"prompt": ']),
        "line 3.*malformed JSON",
    ),
    "empty file": (_bad([]), "empty file"),
    "not a number": (_bad(_one(scoresA=["x"] * R)), "line 2.*scores_a.*numbers"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_ingest_input_fails_cleanly(tmp_path, case):
    build, pattern = BAD_INPUTS[case]
    path = build(tmp_path)
    result = run("ingest", path, "--out", tmp_path / "store")
    assert result.exit_code == 2
    assert str(path) in result.output
    assert re.search(pattern, result.output), result.output
    assert not (tmp_path / "store").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # no temporary left behind


@pytest.mark.parametrize("k", [0, R + 1])
def test_k_out_of_range(tmp_path, scored_jsonl, k):
    run("ingest", scored_jsonl, "--out", tmp_path / "store")
    result = run("select", tmp_path / "store", "--k", k, "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 2 and "k must be between 1 and R = 100" in result.output
    assert not (tmp_path / "o.jsonl").exists()


def test_store_written_with_another_pool(tmp_path, scored_jsonl):
    run("ingest", scored_jsonl, "--out", tmp_path / "store")
    pool_file = tmp_path / "pool.txt"
    pool_file.write_text("\n".join(f"custom rule {i}" for i in range(R)))
    result = run("select", tmp_path / "store", "--pool", pool_file, "--out", tmp_path / "o.jsonl")
    assert (
        result.exit_code == 2
        and "rule pool" in result.output
        and str(tmp_path / "store") in result.output
    )
    assert not (tmp_path / "o.jsonl").exists()


def test_relevance_criterion_without_relevance(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", scored_records(5, R, relevance=False))
    run("ingest", tmp_path / "p.jsonl", "--out", tmp_path / "store")
    result = run("select", tmp_path / "store", "--criterion", "additive")
    assert result.exit_code == 2 and "needs relevance" in result.output


def test_int8_store_selects_exactly_and_refuses_an_alpha_it_cannot(tmp_path, scored_jsonl):
    run("ingest", scored_jsonl, "--out", tmp_path / "store", "--dtype", "int8")
    result = run("select", tmp_path / "store", "--alpha", "0.3", "--out", tmp_path / "o.jsonl")
    assert result.exit_code == 0, result.output
    store = RatingStore.open(tmp_path / "store")
    chunk = store.read()
    want_index, want_margin = naive.select_top_k(
        chunk.scores_a, chunk.scores_b, chunk.relevance, 5, "additive", 0.3, 1 / 127, 1 / 127
    )
    stored = store.array("selections/adaptive-additive-k5/index").read().result()
    np.testing.assert_array_equal(stored, want_index)
    result = run("select", tmp_path / "store", "--alpha", "0.123456", "--out", tmp_path / "x.jsonl")
    assert result.exit_code == 2 and "alpha 0.123456" in result.output, result.output
    assert not (tmp_path / "x.jsonl").exists()


class LengthJudge(Judge):
    """A deterministic toy judge for store plumbing tests: scores are a function of lengths."""

    rules_per_job = 4

    def __init__(self, pool):
        self.pool = pool

    @property
    def identity(self):
        return {"judge": "length-toy", "template": None}

    def rate_jobs(self, jobs):
        for job in jobs:
            lengths = np.array([len(r) for r in job.responses], np.float32)[:, None]
            scores = np.tanh((lengths - 8) / 8 + 0.1 * job.rules[None, :]).astype(np.float32)
            yield JobResult(job, scores, np.full_like(scores, 0.5), [None] * len(job.rules))


def test_select_refuses_an_interrupted_rating_and_counts_planned_cells(tmp_path, small_pool):
    from dynrules.engine.judges.runner import rate_pairs
    from dynrules.engine.ratinglog import LOG, RECORD

    records = [
        {"id": str(i), "prompt": f"q{i}", "response_a": "a" * i, "response_b": "b" * (9 - i)}
        for i in range(6)
    ]
    plan = {r["id"]: ["r1", "r2"] for r in records}
    rate_pairs(
        records,
        tmp_path / "store",
        pool=small_pool,
        judge=LengthJudge(small_pool),
        plan=plan,
        progress=False,
    )
    store = RatingStore.open(tmp_path / "store")
    summary = run_selection(store, SelectionConfig(k=2), tmp_path / "out.jsonl", progress=False)
    assert summary.rated_cells == 12 and summary.cells == 48
    assert all(
        set(json.loads(line)["rule_ids"]) == {"r1", "r2"} for line in open(tmp_path / "out.jsonl")
    )

    with open(
        tmp_path / "store" / LOG, "ab"
    ) as handle:  # a cell committed, then a kill before the fold
        handle.write(np.zeros(1, RECORD).tobytes())
    with pytest.raises(DynrulesError, match="run the same `dynrules rate` command again"):
        run_selection(store, SelectionConfig(k=2), tmp_path / "again.jsonl", progress=False)
    assert not (tmp_path / "again.jsonl").exists()
