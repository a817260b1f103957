"""`dynrules simulate`, `mi`, `ablate` and `bench mi` through click's test runner."""

import json

import pytest
from click.testing import CliRunner

from dynrules.cli import main
from dynrules.engine.store import RatingStore

ROW_KEYS = {"policy", "criterion", "k", "agreement", "mi_bits", "ci_low", "ci_high", "ties"}


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "store"
    result = CliRunner().invoke(
        main,
        [
            "simulate",
            "--pairs",
            "3000",
            "--rules",
            "12",
            "--out",
            str(out),
            "--duplicates",
            "2",
            "--seed",
            "3",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["pairs"] == 3000 and summary["rules"] == 12
    return out


def test_simulate_writes_a_store_with_truth(simulated):
    store = RatingStore.open(simulated)
    assert store.n_pairs == 3000 and store.n_rules == 12 and store.has_relevance
    truth = store.read_field("truth")
    assert set(truth.tolist()) == {0, 1}
    chunk = next(store.iter_chunks())
    assert chunk.scores_a.min() >= -1 and chunk.scores_a.max() <= 1 and chunk.relevance.min() >= 0


def test_simulate_is_reproducible(tmp_path):
    outputs = []
    for name in ("one", "two"):
        CliRunner().invoke(
            main, ["simulate", "--pairs", "500", "--rules", "5", "--out", str(tmp_path / name)]
        )
        outputs.append(RatingStore.open(tmp_path / name).read().scores_a)
    assert (outputs[0] == outputs[1]).all()


def test_mi_json(simulated):
    result = CliRunner().invoke(
        main, ["mi", str(simulated), "--truth", "truth", "--json", "--resamples", "200"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert len(report["rules"]) == 12
    assert {"id", "index", "mi_bits", "p_value"} <= set(report["rules"][0])
    mi = [r["mi_bits"] for r in report["rules"]]
    assert mi == sorted(mi, reverse=True)
    label = report["label"]
    assert {"policy", "k", "mi_bits", "ci_low", "ci_high", "agreement"} <= set(label)
    assert label["policy"] == "adaptive" and label["k"] == 5 and label["ci_low"] <= label["ci_high"]
    text = CliRunner().invoke(
        main, ["mi", str(simulated), "--truth", "truth", "--top", "2", "--policy", "random"]
    )
    assert text.exit_code == 0 and "more" in text.output and "label of random" in text.output


def test_ablate_json_and_files(simulated, tmp_path):
    out = tmp_path / "ablation"
    result = CliRunner().invoke(
        main,
        [
            "ablate",
            str(simulated),
            "--truth",
            "truth",
            "--k",
            "1,3",
            "--out",
            str(out),
            "--resamples",
            "100",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert all(ROW_KEYS <= set(row) for row in rows)
    assert {row["policy"] for row in rows} == {
        "adaptive",
        "zscore",
        "greedy",
        "all",
        "random",
        "fixed",
    }
    assert {row["k"] for row in rows if row["policy"] != "all"} == {1, 3}
    assert [row["k"] for row in rows if row["policy"] == "all"] == [12]
    for name in ("ablation.json", "ablation.md", "mi_vs_k.png", "rule_mi.png"):
        assert (out / name).stat().st_size > 0
    assert (out / "mi_vs_k.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "ablation.json").read_text())["rows"] == rows
    assert "| adaptive | additive | 1 |" in (out / "ablation.md").read_text()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--truth", "human"], "no pair field 'human'"),
        (["--truth", "truth", "--k", "0,40"], "between 1 and R = 12"),
        (["--truth", "truth", "--k", "a"], "bad k list"),
        (["--truth", "truth", "--policies", "adaptive,oracle"], "unknown policies oracle"),
    ],
)
def test_ablate_errors(simulated, tmp_path, args, message):
    result = CliRunner().invoke(
        main, ["ablate", str(simulated), "--out", str(tmp_path / "x"), *args]
    )
    assert result.exit_code == 2 and message in result.output


def test_mi_on_a_missing_store(tmp_path):
    result = CliRunner().invoke(main, ["mi", str(tmp_path / "nothing"), "--truth", "truth"])
    assert result.exit_code == 2 and "not a rating store" in result.output


def test_bench_mi_json():
    result = CliRunner().invoke(
        main,
        ["bench", "mi", "--pairs", "20000", "--rules", "10", "--sklearn-pairs", "2000", "--json"],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["benchmark"] == "mi" and report["pairs"] == 20000 and report["rules"] == 10
    assert set(report["results"]) == {"sklearn_loop", "kernel", "roofline"}
    assert report["point_seconds"] > 0 and report["interval_1000_seconds"] > 0


def test_int8_store_from_simulate_to_ablate(tmp_path):
    runner = CliRunner()
    assert (
        runner.invoke(
            main,
            [
                "simulate",
                "--pairs",
                "800",
                "--rules",
                "6",
                "--out",
                str(tmp_path / "s"),
                "--dtype",
                "int8",
                "--noise-spread",
                "1",
                "--position-bias",
                "0.1",
            ],
        ).exit_code
        == 0
    )
    result = runner.invoke(
        main,
        [
            "ablate",
            str(tmp_path / "s"),
            "--truth",
            "truth",
            "--k",
            "1-R",
            "--out",
            str(tmp_path / "a"),
            "--policies",
            "adaptive,zscore",
            "--resamples",
            "50",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert sorted({r["k"] for r in json.loads(result.output)["rows"]}) == [1, 2, 3, 4, 5, 6]
