"""Rule-adapter metrics against a NumPy twin, and a tiny end-to-end train → predict → plan."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynrules.train import adapter as adp


def naive_metrics(predicted, oracle, a, b, scale):
    precision, recall, agree = [], [], []
    for p, o, ra, rb in zip(predicted, oracle, a, b, strict=True):
        hits = len(set(p.tolist()) & set(o.tolist()))
        precision.append(hits / len(p))
        recall.append(hits / len(o))
        # differences summed in stored units, then scaled: a tie there is an exact tie
        label = [np.sign(sum(float(ra[i]) - float(rb[i]) for i in s) * scale) for s in (p, o)]
        agree.append(label[0] == label[1])
    return np.mean(precision), np.mean(recall), np.mean(agree)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 30), st.integers(2, 20), st.data())
def test_metrics_match_numpy_twin(n, n_rules, data):
    k_pred = data.draw(st.integers(1, n_rules))
    k_oracle = data.draw(st.integers(1, n_rules))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    a = rng.integers(-127, 128, (n, n_rules)).astype(np.int8)
    b = rng.integers(-127, 128, (n, n_rules)).astype(np.int8)
    predicted = np.stack([rng.permutation(n_rules)[:k_pred] for _ in range(n)])
    oracle = np.stack([rng.permutation(n_rules)[:k_oracle] for _ in range(n)])
    got = adp.adapter_metrics(predicted, oracle, a, b, 1 / 127)
    want = naive_metrics(predicted, oracle, a, b, 1 / 127)
    assert got["precision_at_k"] == pytest.approx(want[0])
    assert got["recall_at_k"] == pytest.approx(want[1])
    assert got["label_agreement"] == pytest.approx(want[2])


def test_metrics_are_per_row_not_flattened():
    # One hit in five per row: precision 0.2, although 96 of 100 cells of each row agree.
    predicted = np.array([[0, 1, 2, 3, 4]])
    oracle = np.array([[4, 5, 6, 7, 8]])
    a = np.zeros((1, 100), np.float32)
    got = adp.adapter_metrics(predicted, oracle, a, a)
    assert got["precision_at_k"] == pytest.approx(0.2) and got["recall_at_k"] == pytest.approx(0.2)


def test_top_k_rules_breaks_ties_by_lower_index():
    logits = np.array([[0.0, 1.0, 1.0, 0.5, 1.0]])
    assert adp.top_k_rules(logits, 3).tolist() == [[1, 2, 4]]


def rated_store(directory, pool, n: int, seed: int = 0):
    """A fully rated store of ``n`` pairs over ``pool`` (random ratings and relevance)."""
    from dynrules.engine.store import PairTableWriter, RatingStore

    rng = np.random.default_rng(seed)
    n_rules = len(pool.ids)
    store = RatingStore.create(directory, pool=pool, n_pairs=n, has_relevance=True)
    store.write_rows(
        0,
        rng.uniform(-1, 1, (n, n_rules)),
        rng.uniform(-1, 1, (n, n_rules)),
        rng.uniform(0, 1, (n, n_rules)),
    )
    writer = PairTableWriter(store.pairs_path)
    writer.write(
        {
            "id": [str(i) for i in range(n)],
            "prompt": [f"question {i}" for i in range(n)],
            "response_a": ["yes, here is how"] * n,
            "response_b": ["no"] * n,
        }
    )
    writer.close()
    return store


@pytest.mark.parametrize("backbone", ["encoder", "decoder"])
def test_train_predict_and_plan(tmp_path, small_pool, backbone):
    from . import decoder_fixtures as fx

    model = str(fx.tiny_hf_decoder(tmp_path / "decoder")) if backbone == "decoder" else ""

    n = 16
    store = rated_store(tmp_path / "store", small_pool, n)
    pairs = store.read_pairs().to_pydict()
    info = adp.train_adapter(
        store,
        tmp_path / "run",
        {"steps": 2, "batch_size": 4, "max_length": 32, "backbone": backbone, "model": model},
        selection=adp.SelectionConfig(k=3),
        progress=False,
    )
    # eval_fraction (default 0.05) holds one pair out; adapter.json records the report.
    assert info.train_pairs == n - 1 and info.held_out_pairs == 1 and np.isfinite(info.final_loss)
    assert info.eval["pairs"] == 1 and 0 <= info.eval["precision_at_k"] <= 1
    assert adp.read_adapter(tmp_path / "run") == info
    assert adp.is_trained(tmp_path / "run", store, info.config, adp.SelectionConfig(k=3))
    records = [
        {"id": i, "prompt": p, "response_a": a, "response_b": b}
        for i, p, a, b in zip(
            pairs["id"], pairs["prompt"], pairs["response_a"], pairs["response_b"], strict=True
        )
    ]
    summary = adp.write_plan(tmp_path / "run", records, 3, tmp_path / "plan.jsonl")
    plan = [json.loads(line) for line in open(tmp_path / "plan.jsonl")]
    assert [p["id"] for p in plan] == pairs["id"]
    assert all(
        len(set(p["rule_ids"])) == 3 and set(p["rule_ids"]) <= set(small_pool.ids) for p in plan
    )
    assert summary.judge_calls_saved == pytest.approx(1 - 3 / 8)


def test_train_adapter_command_resumes_from_its_saved_config(tmp_path, small_pool):
    """train-adapter: a rerun with only --out reuses the saved train section (as train-rm);
    selection keys it does not read are refused; apply-adapter's k is the adapter's own."""
    from click.testing import CliRunner

    from dynrules.cli import main
    from dynrules.errors import DynrulesError

    store = rated_store(tmp_path / "store", small_pool, 16)
    run = tmp_path / "run"
    runner = CliRunner()
    base = ["train-adapter", str(store.path), "--out", str(run)]
    for key in ("selection.ties=a", "selection.seed=3", "selection.policy=random"):
        done = runner.invoke(main, [*base, key])
        assert done.exit_code == 2 and "not used by `dynrules train-adapter`" in done.output, (
            key,
            done.output,
        )
    assert not run.exists()
    train = ["steps=2", "batch_size=4", "max_length=32", "eval_fraction=0"]
    done = runner.invoke(main, [*base, *train, "selection.k=3", "--alpha", "0.25"])
    assert done.exit_code == 0, done.output
    info = adp.read_adapter(run)
    assert (
        info.config["steps"] == 2 and info.selection["k"] == 3 and info.selection["alpha"] == 0.25
    )
    # Rerun with the train section left out: the saved config, not the defaults (which differ).
    done = runner.invoke(main, [*base, "selection.k=3", "--alpha", "0.25"])
    assert done.exit_code == 0, done.output
    assert adp.read_adapter(run).config == info.config
    again = adp.train_adapter(
        store, run, None, selection=adp.SelectionConfig(k=3, alpha=0.25), progress=False
    )
    assert again.config == info.config and again.resumed_from == 2

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(
        "".join(
            json.dumps({"id": str(i), "prompt": f"q{i}", "response_a": "yes", "response_b": "no"})
            + "\n"
            for i in range(4)
        )
    )
    done = runner.invoke(
        main, ["apply-adapter", str(run), str(pairs), "--out", str(tmp_path / "p")]
    )
    assert done.exit_code == 0, done.output
    plan = [json.loads(line) for line in (tmp_path / "p").read_text().splitlines()]
    assert [len(p["rule_ids"]) for p in plan] == [3] * 4

    for text in (
        "{not json",
        json.dumps({**json.loads((run / adp.ADAPTER_FILE).read_text()), "x": 1}),
    ):
        (run / adp.ADAPTER_FILE).write_text(text)
        with pytest.raises(DynrulesError, match="adapter.json"):
            adp.read_adapter(run)
