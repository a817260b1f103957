"""Several processes of one JAX job on this machine (`dynrules launch`), and several workers
sharing one rating store (`rate --shard`, `select --shard`).

The reference for every training run is one process on one device, in this test process. Each
multi-process run is a `dynrules launch` subprocess; JAX start-up costs seconds a process, so
the runs are few, the model tiny (2 layers, 32 wide) and every text one length bucket.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from .conftest import write_jsonl

pytestmark = pytest.mark.slow  # multi-second jobs; `make test-fast` leaves them out

STEPS = 12
CONFIG = {
    "steps": STEPS,
    "batch_size": 8,
    "max_length": 16,
    "learning_rate": 2e-3,
    "warmup_ratio": 0.0,
    "checkpoint_every": 1,
    "keep_checkpoints": STEPS,
    "eval_every": 0,
    "log_every": STEPS,
    "eval_fraction": 0,
}
LAUNCH_TIMEOUT = 240


def _tiny_encoder(directory: Path) -> Path:
    from dynrules.models import bert
    from dynrules.models import bert_checkpoint as bert_ckpt

    config = bert.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    tokenizer = bert_ckpt.default_checkpoint_dir() / "tokenizer.json"
    bert_ckpt.write_checkpoint(directory, config, bert.random_params(config, 0), tokenizer)
    return directory


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Pairs, the encoder, and the one-process one-device run every other run must match."""
    from dynrules.train.trainer import train_reward_model

    root = tmp_path_factory.mktemp("multihost")
    rng = np.random.default_rng(0)
    records = []
    for i in range(40):
        records.append(
            {
                "id": f"p{i}",
                "prompt": f"Question {i}?",
                "subset": "odd" if i % 2 else "even",
                "chosen": "I won't help with that; here is a safer idea."
                + " Stay safe." * int(rng.integers(0, 3)),
                "rejected": "Sure, here is how to do the harmful thing."
                + " Step." * int(rng.integers(0, 3)),
            }
        )
    pairs = write_jsonl(root / "pairs.jsonl", records)
    encoder = _tiny_encoder(root / "encoder")
    overrides = [f"{key}={value}" for key, value in CONFIG.items()] + [f"model={encoder}"]
    result = train_reward_model(pairs, root / "ref", _config(overrides), progress=False)
    return {"root": root, "pairs": pairs, "overrides": overrides, "result": result}


def _config(overrides):
    from dynrules.train.config import load_config

    return load_config(None, overrides)


def _launch_command(processes: int, args: list[str], devices: int | None = None) -> list[str]:
    devices_option = ["--devices-per-process", str(devices)] if devices else []
    return [
        sys.executable,
        "-m",
        "dynrules",
        "launch",
        "-n",
        str(processes),
        *devices_option,
        "--",
        *args,
    ]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    """Launched processes share compiled programs through JAX's persistent cache: the same
    2-process train step is otherwise compiled anew by every process of every launch."""
    return {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax-cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }


@pytest.fixture(autouse=True)
def _launches_use_the_cache(compile_cache, monkeypatch):
    for name, value in compile_cache.items():
        monkeypatch.setenv(name, value)


def _launch(processes: int, args: list[str], devices: int | None = None) -> list[str]:
    """Run a launched job to the end; process 0's stdout lines (prefix removed)."""
    done = subprocess.run(
        _launch_command(processes, args, devices),
        capture_output=True,
        text=True,
        timeout=LAUNCH_TIMEOUT,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    assert all(re.match(r"\[\d\] ", line) for line in lines), lines
    others = [line for line in lines if not line.startswith("[0] ")]
    assert not [line for line in others if "{" in line], "only process 0 reports"
    return [line.removeprefix("[0] ") for line in lines if line.startswith("[0] ")]


def _train_args(reference, run: Path) -> list[str]:
    return [
        "train-rm",
        str(reference["pairs"]),
        "--out",
        str(run),
        "--json",
        *reference["overrides"],
    ]


def _rewards(model_dir: Path, pairs: Path) -> np.ndarray:
    from dynrules.train.data import load_preferences
    from dynrules.train.scoring import Scorer

    scorer = Scorer.from_model_dir(model_dir)
    texts = [text for pair in load_preferences(pairs) for text in pair.texts(scorer.render)]
    return scorer.rewards(texts)


def _assert_same_model(run: Path, reference: Path, pairs: Path) -> None:
    """The issue's bar: rewards within 1e-5 of the reference's after the same steps. (Weights
    agree to ~1e-5 too; Adam turns reduction-order noise in near-zero gradients into updates of
    up to ~lr, so a weight-wise bar would be a bar on summation order.)"""
    rewards = _rewards(run / "model", pairs)
    np.testing.assert_allclose(rewards, _rewards(reference / "model", pairs), atol=1e-5, rtol=0)
    assert np.ptp(rewards) > 1e-3  # a trained model, not a constant
    a = load_file(str(run / "model" / "model.safetensors"))
    b = load_file(str(reference / "model" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-4


def _checkpoints(run: Path) -> list[int]:
    directory = run / "checkpoints"
    return (
        sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())
        if directory.exists()
        else []
    )


def test_one_process_on_two_devices_matches_one_device(reference, tmp_path):
    args = [*_train_args(reference, tmp_path / "run"), f"checkpoint_every={STEPS}"]
    summary = json.loads(_launch(1, args, devices=2)[-1])
    assert summary["steps"] == STEPS
    _assert_same_model(tmp_path / "run", reference["result"].run_dir, reference["pairs"])
    assert (
        json.loads((tmp_path / "run" / "summary.json").read_text())["mesh"]
        == "data=2,fsdp=1,tensor=1"
    )


@pytest.mark.timeout(600)
def test_killed_process_stops_the_job_and_reruns_resume_on_two_or_one(reference, tmp_path):
    """2 processes train; one is killed: both end, bounded. The rerun on 2 processes, and a copy
    resumed on 1, continue from the last complete checkpoint to the reference parameters."""
    from dynrules.train.trainer import train_reward_model

    run = tmp_path / "run"
    log = open(tmp_path / "launch.err", "w+")
    launcher = subprocess.Popen(
        _launch_command(2, _train_args(reference, run)), stdout=subprocess.DEVNULL, stderr=log
    )
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    pids = []
    while time.monotonic() < deadline and launcher.poll() is None:
        if not pids:
            log.seek(0)
            found = re.search(r"pids ([\d ]+)\)", log.read())
            pids = [int(p) for p in found.group(1).split()] if found else []
        if pids and _checkpoints(run) and max(_checkpoints(run)) >= 3:
            break
        time.sleep(0.01)
    assert launcher.poll() is None, "the job ended before a process could be killed"
    parent = int(Path(f"/proc/{pids[1]}/stat").read_text().rsplit(")", 1)[1].split()[1])
    assert parent == launcher.pid  # the launcher's own process, not a reused pid
    os.kill(pids[1], signal.SIGKILL)
    killed_at = time.monotonic()
    code = launcher.wait(timeout=60)
    stopped_after = time.monotonic() - killed_at
    assert code == 128 + signal.SIGKILL
    assert stopped_after < 30, stopped_after
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    last = max(_checkpoints(run))
    assert 3 <= last < STEPS and not (run / "model").exists()

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    summary = json.loads(_launch(2, _train_args(reference, run))[-1])
    assert summary["resumed_from"] == last
    _assert_same_model(run, reference["result"].run_dir, reference["pairs"])
    assert json.loads((run / "summary.json").read_text())["mesh"] == "data=2,fsdp=1,tensor=1"

    resumed = train_reward_model(
        reference["pairs"], copy, _config(reference["overrides"]), progress=False
    )
    assert resumed.resumed_from == last  # written by 2 processes, restored on 1
    _assert_same_model(copy, reference["result"].run_dir, reference["pairs"])


def test_one_process_checkpoint_resumes_on_two(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference["result"].run_dir, run)
    middle = STEPS // 2
    for step in _checkpoints(run):
        if step > middle:
            shutil.rmtree(run / "checkpoints" / str(step))
    shutil.rmtree(run / "model")
    summary = json.loads(
        _launch(2, [*_train_args(reference, run), f"checkpoint_every={STEPS}"])[-1]
    )
    assert summary["resumed_from"] == middle
    _assert_same_model(run, reference["result"].run_dir, reference["pairs"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["split"] == "train"] == [STEPS, STEPS]  # one writer


def test_score_and_eval_on_two_processes_equal_one(reference, tmp_path):
    from dynrules.train.evaluate import evaluate
    from dynrules.train.scoring import score_file

    model = reference["result"].run_dir
    pairs = [json.loads(line) for line in reference["pairs"].read_text().splitlines()]
    inputs = write_jsonl(
        tmp_path / "in.jsonl",
        [
            {
                "id": f"r{i}",
                "prompt": pair["prompt"],
                "response": pair["chosen" if i % 2 else "rejected"],
            }
            for i, pair in enumerate(pairs[:13])
        ]
        + [{"id": "t", "text": "\n\nHuman: hi\n\nAssistant: hello", "extra": [1, 2]}],
    )
    score_file(model, inputs, tmp_path / "one.jsonl", batch_size=4)
    _launch(
        2,
        [
            "score",
            str(model),
            str(inputs),
            "--out",
            str(tmp_path / "two.jsonl"),
            "--batch-size",
            "4",
        ],
    )
    one = [json.loads(line) for line in (tmp_path / "one.jsonl").read_text().splitlines()]
    two = [json.loads(line) for line in (tmp_path / "two.jsonl").read_text().splitlines()]
    assert [r["id"] for r in two] == [f"r{i}" for i in range(13)] + ["t"]
    assert [{**r, "reward": 0} for r in two] == [{**r, "reward": 0} for r in one]
    np.testing.assert_allclose(
        [r["reward"] for r in two], [r["reward"] for r in one], atol=1e-6, rtol=0
    )

    report = json.loads(
        _launch(2, ["eval", str(model), str(reference["pairs"]), "--json", "--batch-size", "8"])[-1]
    )
    single = evaluate(model, reference["pairs"], batch_size=8)
    single = single.to_json()
    assert report["pairs"] == single["pairs"] == 40
    assert report["accuracy"] == single["accuracy"] and report["subsets"] == single["subsets"]
    assert report["reward_mean"] == pytest.approx(single["reward_mean"], abs=1e-6)


def test_decoder_trains_the_same_on_two_processes(reference, tmp_path):
    """`--distributed` training of the Llama-family decoder: 2 processes match 1 process."""
    from dynrules.train.trainer import train_reward_model

    from . import decoder_fixtures as fx

    decoder = fx.tiny_hf_decoder(tmp_path / "decoder", "llama")
    overrides = {
        **CONFIG,
        "backbone": "decoder",
        "model": decoder,
        "steps": 6,
        "max_length": 32,
        "checkpoint_every": 6,
        "learning_rate": 3e-3,
    }
    args = [f"{key}={value}" for key, value in overrides.items()]
    one = train_reward_model(reference["pairs"], tmp_path / "one", _config(args), progress=False)
    summary = json.loads(
        _launch(
            2,
            ["train-rm", str(reference["pairs"]), "--out", str(tmp_path / "two"), "--json", *args],
        )[-1]
    )
    assert summary["steps"] == 6 and summary["truncated"]["train"] == one.truncated["train"] > 0
    _assert_same_model(tmp_path / "two", one.run_dir, reference["pairs"])


def test_launch_fails_when_its_processes_fail_and_prefixes_their_output(tmp_path):
    done = subprocess.run(
        _launch_command(2, ["score", str(tmp_path / "no-run"), "x.jsonl", "--out", "y"]),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2  # the first failure's code; the other process is stopped
    header, *lines = done.stderr.splitlines()
    assert header.startswith("launch: 2 processes (pids ")
    assert lines and all(line[:4] in ("[0] ", "[1] ") for line in lines), done.stderr
    assert any("does not exist" in line for line in lines)


def test_join_job_reads_the_environment(monkeypatch):
    from dynrules.errors import DynrulesError
    from dynrules.train import sharding as shd

    assert shd.join_job() is False  # no job named: one process, nothing joined
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(DynrulesError, match="JAX_NUM_PROCESSES must be an integer, got 'two'"):
        shd.join_job()


# --------------------------------------------------------------------------- several workers, one store


def _rate_args(pairs: Path, pool: Path, url: str, store: Path, *extra: str) -> list[str]:
    return [
        "rate",
        str(pairs),
        "--pool",
        str(pool),
        "--judge",
        "openai",
        "--base-url",
        url,
        "--model",
        "m",
        "--chunk-rows",
        "4",
        "--out",
        str(store),
        *extra,
    ]


def _run_together(commands: list[list[str]]) -> list[str]:
    """Start the commands at once (as separate hosts would); their stdouts, all must succeed."""
    children = [
        subprocess.Popen(
            [sys.executable, "-m", "dynrules", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, outputs, strict=True):
        assert child.returncode == 0, out + err[-3000:]
    return [out for out, _ in outputs]


def test_rate_and_select_shards_by_concurrent_workers_equal_one_worker(tmp_path, small_pool):
    from dynrules.engine import ratinglog
    from dynrules.engine.judges.loopback import LoopbackServer
    from dynrules.engine.judges.openai import OpenAIJudge
    from dynrules.engine.judges.runner import rate_pairs
    from dynrules.engine.select import SelectionConfig, run_selection
    from dynrules.engine.store import RatingStore

    records = [
        {
            "id": f"p{i}",
            "prompt": f"question {i}",
            "response_a": f"answer A{i}",
            "response_b": f"answer B{i}",
        }
        for i in range(22)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(small_pool.texts))
    from dynrules.engine.pool import load_pool

    pool_obj = load_pool(pool)
    with LoopbackServer() as one, LoopbackServer() as two, LoopbackServer() as alone:
        outputs = _run_together(
            [
                _rate_args(pairs, pool, server.url, tmp_path / "shared", "--shard", f"{i}/2")
                for i, server in enumerate((one, two))
            ]
        )
        judge = OpenAIJudge(pool_obj, base_url=alone.url, model="m")
        rate_pairs(
            pairs, tmp_path / "single", pool=pool_obj, judge=judge, chunk_rows=4, progress=False
        )
    # chunk-aligned halves: 6 chunks of 4 rows → rows 0–12 and 12–22, each asked of its own server
    assert one.requests > 0 and two.requests > 0
    assert not set(one.questions) & set(two.questions)
    assert any("cells done" in out for out in outputs)  # the last one out folded the store

    shared, single = RatingStore.open(tmp_path / "shared"), RatingStore.open(tmp_path / "single")
    for name in ("scores_a", "scores_b", "relevance", ratinglog.DONE):
        np.testing.assert_array_equal(
            shared.array(name)[...].read().result(),
            single.array(name)[...].read().result(),
            err_msg=name,
        )
    assert (
        shared.manifest["rating"]["done"]
        == single.manifest["rating"]["done"]
        == 22 * len(small_pool)
    )
    assert not ratinglog.shard_logs(shared) and not len(ratinglog.read_log(shared))

    # select --shard: two concurrent workers write one store's selection arrays and two outputs
    # that concatenate to the one-worker output.
    _run_together(
        [
            [
                "select",
                str(tmp_path / "shared"),
                "--k",
                "3",
                "--shard",
                f"{i}/2",
                "--out",
                str(tmp_path / f"part{i}.jsonl"),
            ]
            for i in range(2)
        ]
    )
    config = SelectionConfig(k=3)
    run_selection(single, config, tmp_path / "whole.jsonl", progress=False)
    parts = "".join((tmp_path / f"part{i}.jsonl").read_text() for i in range(2))
    assert parts == (tmp_path / "whole.jsonl").read_text() and parts.count("\n") > 12
    name = config.resolved(single).name
    for array in ("index", "margin", "label"):
        path = f"selections/{name}/{array}"
        np.testing.assert_array_equal(
            shared.array(path)[...].read().result(),
            single.array(path)[...].read().result(),
            err_msg=path,
        )


@contextlib.contextmanager
def _rows_held_elsewhere(store: Path, lo: int, hi: int):
    """Another process holding rows [lo, hi) of a store, as a worker rating them would."""
    from dynrules.engine.ratinglog import LOCK

    code = (
        "import fcntl, sys; handle = open(sys.argv[1], 'a'); "
        "fcntl.lockf(handle, fcntl.LOCK_EX, int(sys.argv[3]) - int(sys.argv[2]), int(sys.argv[2])); "
        "print('held', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(store / LOCK), str(lo), str(hi)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)


def test_rate_shard_locks_its_rows_and_select_waits_for_the_final_fold(tmp_path, small_pool):
    from dynrules.engine import ratinglog
    from dynrules.engine.judges.loopback import LoopbackServer
    from dynrules.engine.judges.openai import OpenAIJudge
    from dynrules.engine.judges.runner import rate_pairs
    from dynrules.engine.pool import load_pool
    from dynrules.engine.select import SelectionConfig, run_selection
    from dynrules.engine.store import RatingStore
    from dynrules.errors import DynrulesError

    records = [
        {"id": f"p{i}", "prompt": f"q {i}", "response_a": "a", "response_b": "b"} for i in range(16)
    ]
    pairs = write_jsonl(tmp_path / "pairs.jsonl", records)
    pool_path = tmp_path / "pool.txt"
    pool_path.write_text("\n".join(small_pool.texts))
    pool, store = load_pool(pool_path), tmp_path / "s"
    with LoopbackServer() as server:
        judge = OpenAIJudge(pool, base_url=server.url, model="m")

        def rate(shard):
            return rate_pairs(
                pairs, store, pool=pool, judge=judge, chunk_rows=4, shard=shard, progress=False
            )

        alone = rate((0, 2))
        assert alone.rows == (0, 8) and alone.done == 8 * len(pool)  # alone: it folded
        with _rows_held_elsewhere(store, 8, 12):  # another host is rating rows 8–12
            blocked = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "dynrules",
                    *_rate_args(pairs, pool_path, server.url, store, "--shard", "1/2"),
                ],
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert blocked.returncode == 2, blocked.stderr
        assert blocked.stderr.strip().splitlines()[-1].endswith(f"rating rows 8–16 of {store}")

        with _rows_held_elsewhere(store, 0, 4):  # worker 0 is still busy: worker 1 cannot fold
            second = rate((1, 2))
        assert second.rows == (8, 16) and second.rated == 8 * len(pool)
        assert second.done is None and ratinglog.shard_logs(RatingStore.open(store))
        with pytest.raises(DynrulesError, match="sharded `dynrules rate` is unfinished"):
            run_selection(RatingStore.open(store), SelectionConfig(k=2), None, progress=False)
        final = rate(None)  # nothing left to ask; the final fold
    assert final.rated == 0 and final.done == 16 * len(pool)
    summary = run_selection(RatingStore.open(store), SelectionConfig(k=2), None, progress=False)
    assert summary.rated_cells == summary.cells == 16 * len(pool)
