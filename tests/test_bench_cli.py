"""`dynrules bench …`: one home for every benchmark, each command's help, and the MFU and numerics
benchmarks at a tiny size (a made-up decoder shape, on the CPU)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynrules.benchmarks import paths
from dynrules.benchmarks.run_all import BENCHMARKS
from dynrules.cli import bench, main
from dynrules.errors import DynrulesError
from dynrules.models import presets
from dynrules.models.llama import LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
# Modules of dynrules.benchmarks that are not benchmarks themselves.
NOT_BENCHMARKS = {"__init__", "paths", "run_all", "llamacpp", "llama_server", "openrlhf_remote_rm"}
TINY = LlamaConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    max_position_embeddings=64,
)


@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(presets.PRESETS, "tiny-test", TINY)
    return "tiny-test"


def invoke(*args: str) -> dict:
    result = CliRunner().invoke(main, ["bench", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(bench.commands))
def test_every_bench_command_has_help(name):
    result = CliRunner().invoke(main, ["bench", name, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"Usage: main bench {name} ")


def test_every_benchmark_module_is_a_bench_command():
    """One home: each benchmark module in benchmarks/ is reached by some `dynrules bench` command,
    and `make bench` runs only commands that exist."""
    modules = {path.stem for path in (ROOT / "benchmarks").glob("*.py")} - NOT_BENCHMARKS
    reached = set(
        re.findall(r"from dynrules\.benchmarks\.(\w+) import", (ROOT / "cli.py").read_text())
    )
    reached |= set(
        re.findall(r"from dynrules\.benchmarks import (\w+)", (ROOT / "cli.py").read_text())
    )
    assert modules <= reached, f"no `dynrules bench` command for {sorted(modules - reached)}"
    assert {args[0] for args in BENCHMARKS.values()} <= set(bench.commands)
    assert not (ROOT / "bench").exists()


def test_hh_data_path_is_declared_once():
    assert paths.HH_TEST.name == "hh-rlhf-harmless-base-test.jsonl.gz"
    assert paths.HH_TEST.parent == ROOT.parent / "shared" / "data"
    written = [
        path.relative_to(ROOT)
        for folder in ("benchmarks", "tests")
        for path in (ROOT / folder).rglob("*.py")
        if path not in (ROOT / "benchmarks" / "paths.py", Path(__file__).resolve())
        and "hh-rlhf-harmless" in path.read_text()
    ]
    assert not written, f"the HH file's name is written out in {written}: use benchmarks.paths"


def test_missing_hh_file_says_how_to_pass_it(tmp_path):
    with pytest.raises(DynrulesError, match="--data"):
        paths.hh_test(tmp_path / "absent.jsonl.gz")
    result = CliRunner().invoke(
        main, ["bench", "profile-step", "--data", str(tmp_path / "absent.jsonl.gz")]
    )
    assert result.exit_code == 2 and "pass --data PATH" in result.output


def test_bench_mfu_tiny(tiny_preset):
    out = invoke(
        "mfu",
        *("--preset", tiny_preset, "--seq", "16", "--pairs-per-step", "1", "--steps", "2"),
        *("--dtype", "float32", "--remat", "none", "--peak-tflops", "1"),
    )
    assert out["benchmark"] == "train_mfu"
    assert out["setup"] | {"preset": tiny_preset, "seq": 16, "steps": 2} == out["setup"]
    results = out["results"]
    assert results["tokens_per_s"] > 0 and results["step_seconds"] > 0
    assert results["peak_tflops"] == 1
    assert results["mfu"] == pytest.approx(results["model_tflops_per_s"])


@pytest.mark.slow
def test_bench_numerics_tiny(tiny_preset):
    out = invoke(
        "numerics",
        *("--preset", tiny_preset, "--seq", "16", "--pairs-per-step", "2", "--steps", "3"),
        *("--batches", "2"),
    )
    assert out["benchmark"] == "bf16_numerics"
    results = out["results"]
    assert len(results["losses_float32"]) == len(results["losses_bfloat16"]) == 3
    assert 0 <= results["pair_order_agreement"] <= 1
    assert results["max_reward_difference"] < 10 * results["reward_std_float32"] + 1


def test_unknown_preset_is_a_clear_error():
    result = CliRunner().invoke(main, ["bench", "mfu", "--preset", "nope"])
    assert result.exit_code == 2 and "unknown model preset 'nope'" in result.output


def test_plan_table_from_saved_results():
    result = CliRunner().invoke(main, ["bench", "plan-table", "--table"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("| model | params |") and "| llama-3.1-70b |" in result.output
