"""`dynrules simulate`, `mi`, `ablate` and `bench mi` through click's test runner."""

import json
from types import SimpleNamespace

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
        (
            ["--truth", "truth", "--policies", "adaptive,oracle"],
            "--policies: ablate.policies: each item must be one of adaptive, zscore, greedy, all, "
            "random, fixed, got 'oracle'",
        ),
        (
            ["--truth", "truth", "discount=2"],
            "override 'discount=2': discount: input should be less than or equal to 1",
        ),
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


def _mi_arguments(monkeypatch, *args):
    """(selection, mi config) `dynrules mi STORE ARGS` would run with (the report stubbed)."""
    seen = {}

    def fake_report(store, truth, selection, config):
        seen.update(selection=selection, config=config, truth=truth)
        return SimpleNamespace()

    monkeypatch.setattr("dynrules.engine.mi.mi_report", fake_report)
    monkeypatch.setattr("dynrules.cli.print_json", lambda result: None)
    result = CliRunner().invoke(main, ["mi", "store", "--truth", "t", "--json", *map(str, args)])
    assert result.exit_code == 0, result.output
    return seen["selection"], seen["config"]


def test_mi_precedence_defaults_yaml_overrides_flags(tmp_path, monkeypatch):
    config_file = tmp_path / "mi.yaml"
    config_file.write_text(
        "mi:\n  estimator: plug-in\n  resamples: 50\n  seed: 4\n"
        "selection: {k: 3, policy: random, alpha: 0.25}\n"
        "top: 2\n"  # bare: a key of the primary section, mi
    )
    selection, config = _mi_arguments(
        monkeypatch,
        "--config",
        config_file,
        "resamples=60",
        "selection.k=4",
        "mi.seed=5",
        "--k",
        "2",
        "--seed",
        "6",
    )
    assert config.redundancy_pairs == 20_000  # default
    assert (config.estimator, config.top, selection.policy, selection.alpha) == (
        "plug-in",
        2,
        "random",
        0.25,
    )  # YAML
    assert config.resamples == 60  # override over YAML
    assert (selection.k, config.seed) == (2, 6)  # flag over override over YAML
    selection, config = _mi_arguments(monkeypatch)  # the old flags' defaults, from the tree
    assert (selection.policy, selection.k, selection.criterion, selection.alpha) == (
        "adaptive",
        5,
        None,
        0.5,
    )
    assert (config.estimator, config.resamples, config.seed, config.top) == (
        "miller-madow",
        1000,
        0,
        10,
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["mi.resampels=50"], "override 'mi.resampels=50': unknown key 'mi.resampels'; did you"),
        (["estimater=plug-in"], "unknown key 'estimater'; did you mean 'estimator'?"),
        (["mi.estimator=exact"], "mi.estimator must be one of miller-madow, plug-in, got 'exact'"),
        (["--resamples", "5"], "--resamples: mi.resamples: input should be greater than or"),
        (["selection.ties=a"], "key 'selection.ties' is not used by `dynrules mi`"),
        (["judge.kind=openai"], "key 'judge.kind' is not used by `dynrules mi`"),
    ],
)
def test_mi_refuses_bad_keys_naming_them(simulated, args, message):
    result = CliRunner().invoke(main, ["mi", str(simulated), "--truth", "truth", *args])
    assert result.exit_code == 2 and message in result.output, result.output


def test_mi_config_file_names_the_line_of_an_unknown_key(simulated, tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("selection:\n  k: 3\nmi:\n  resampels: 50\n")
    result = CliRunner().invoke(
        main, ["mi", str(simulated), "--truth", "truth", "--config", str(config_file)]
    )
    assert result.exit_code == 2
    assert f"{config_file} line 4: unknown key 'mi.resampels'" in result.output


def test_mi_reports_the_fixed_policy(simulated):
    rules = RatingStore.open(simulated).rule_ids[:3]
    result = CliRunner().invoke(
        main,
        ["mi", str(simulated), "--truth", "truth", "--json", "resamples=50", "policy=fixed"]
        + ["--policy", "fixed", "--rules", ",".join(rules)],
    )
    assert result.exit_code == 2 and "unknown key 'policy'" in result.output  # not mi's key
    result = CliRunner().invoke(
        main,
        ["mi", str(simulated), "--truth", "truth", "--json", "resamples=50"]
        + ["--policy", "fixed", "--rules", ",".join(rules)],
    )
    assert result.exit_code == 0, result.output
    label = json.loads(result.output)["label"]
    assert (label["policy"], label["k"], label["criterion"]) == ("fixed", 3, None)


def test_ablate_takes_config_overrides_and_flags(simulated, tmp_path):
    config_file = tmp_path / "ablate.yaml"
    config_file.write_text(
        "ablate:\n  ks: [1, 2]\n  policies: [adaptive, all, random]\n"
        "mi: {resamples: 50, estimator: plug-in}\nselection: {alpha: 0.25}\n"
    )
    args = ["ablate", str(simulated), "--truth", "truth", "--out", str(tmp_path / "a"), "--json"]
    result = CliRunner().invoke(
        main, [*args, "--config", str(config_file), "policies=adaptive,random", "--k", "3"]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)["rows"]
    assert {(row["policy"], row["k"]) for row in rows} == {("adaptive", 3), ("random", 3)}
    saved = json.loads((tmp_path / "a" / "ablation.json").read_text())
    assert (saved["estimator"], saved["resamples"]) == ("plug-in", 50)
    for extra, message in [
        ("selection.k=3", "key 'selection.k' is not used by `dynrules ablate` (of selection it "),
        ("mi.top=3", "key 'mi.top' is not used by `dynrules ablate`"),
        ("ablate.discout=0.5", "unknown key 'ablate.discout'; did you mean 'ablate.discount'?"),
        ("serve.port=9", "key 'serve.port' is not used by `dynrules ablate`"),
    ]:
        result = CliRunner().invoke(main, [*args, extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)


def test_config_of_mi_and_ablate_loads_back(simulated, tmp_path):
    """`dynrules config COMMAND` writes a file the command takes (unread keys at defaults)."""
    for command, extra in (("mi", []), ("ablate", ["--out", str(tmp_path / "o")])):
        text = CliRunner().invoke(main, ["config", command]).output
        assert "selection:" in text and "mi:" in text
        path = tmp_path / f"{command}.yaml"
        path.write_text(text.replace("resamples: 1000", "resamples: 20"))
        result = CliRunner().invoke(
            main,
            [command, str(simulated), "--truth", "truth", "--config", str(path), "--json"]
            + extra
            + (["--k", "1", "--policies", "adaptive"] if command == "ablate" else []),
        )
        assert result.exit_code == 0, (command, result.output)
