"""The configuration tree: one loader (defaults < YAML < overrides < flags), typed choices,
errors that name the key and its source, old run.json files, and the docs that list every key."""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from dynrules import cli, settings
from dynrules.cli import PIPELINE, main
from dynrules.cliopts import TREE
from dynrules.engine.judges.config import JudgeConfig
from dynrules.engine.judges.openai import OpenAIJudge
from dynrules.engine.select import SelectionConfig
from dynrules.errors import DynrulesError
from dynrules.pipeline import PipelineConfig
from dynrules.settings import ConfigError
from dynrules.train.config import GROUPS, TrainConfig, load_config, make_config

ROOT = Path(__file__).resolve().parents[1]

# out/demo/rm-rules/run.json's "config" as `make demo` saved it before the tree (flat keys,
# no truncation key): it must load, to the same values, with new keys at their defaults.
OLD_RUN_CONFIG = {
    "steps": 60,
    "batch_size": 16,
    "grad_accum": 1,
    "max_length": 192,
    "learning_rate": 0.0001,
    "head_learning_rate": 0.003,
    "warmup_ratio": 0.05,
    "weight_decay": 0.01,
    "clip_norm": 1.0,
    "seed": 0,
    "pooling": "",
    "margin_scale": 0.0,
    "label_confidence": 0.75,
    "center_coef": 0.0,
    "dtype": "float32",
    "param_dtype": "float32",
    "remat": "none",
    "packing": True,
    "backbone": "encoder",
    "model": "",
    "checkpoint_every": 15,
    "keep_checkpoints": 3,
    "eval_every": 10,
    "eval_fraction": 0.0,
    "eval_data": "out/demo/validation.jsonl",
    "log_every": 5,
    "mesh": "",
    "distributed": False,
}

# TrainConfig's defaults before the tree: they must not move.
OLD_TRAIN_DEFAULTS = {
    "steps": 1000,
    "batch_size": 32,
    "grad_accum": 1,
    "max_length": 256,
    "learning_rate": 2e-5,
    "head_learning_rate": 0.0,
    "warmup_ratio": 0.05,
    "weight_decay": 0.01,
    "clip_norm": 1.0,
    "seed": 0,
    "pooling": "",
    "margin_scale": 0.0,
    "label_confidence": 0.0,
    "center_coef": 0.0,
    "dtype": "float32",
    "param_dtype": "float32",
    "remat": "none",
    "packing": True,
    "backbone": "encoder",
    "model": "",
    "checkpoint_every": 200,
    "keep_checkpoints": 3,
    "eval_every": 200,
    "eval_fraction": 0.05,
    "eval_data": "",
    "log_every": 10,
    "mesh": "",
    "distributed": False,
}


def _pipeline_config(monkeypatch, *args) -> PipelineConfig:
    """The PipelineConfig `dynrules pipeline ARGS` would run with (the job itself stubbed)."""
    seen = {}

    def fake_run(out_dir, pairs_path, config):
        seen.update(config=config, pairs=pairs_path)
        return SimpleNamespace(reward_model={})

    monkeypatch.setattr("dynrules.pipeline.run_pipeline", fake_run)
    result = CliRunner().invoke(main, ["pipeline", *map(str, args)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen["config"]


def _fail(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 2, result.output
    return result.output


def test_precedence_defaults_yaml_overrides_flags(tmp_path, monkeypatch):
    config_file = tmp_path / "run.yaml"
    config_file.write_text(
        "judge:\n  kind: openai\n  base_url: http://yaml\n  model: m\n  top_logprobs: 5\n"
        "  concurrency: 3\n  timeout: 7\n"
        "selection: {k: 3, alpha: 0.25}\n"
        "rm_steps: 11\nbatch_size: 8\n"
    )
    config = _pipeline_config(
        monkeypatch,
        "--config",
        config_file,
        "judge.top_logprobs=10",
        "judge.concurrency=4",
        "selection.k=4",
        "pipeline.batch_size=6",
        "ablate_ks=1,3",
        "--concurrency",
        "2",
        "--k",
        "7",
    )
    judge, selection = config.judge, config.selection
    assert judge.endpoint == "completions"  # default
    assert (judge.kind, judge.base_url, judge.timeout) == ("openai", "http://yaml", 7.0)  # YAML
    assert judge.top_logprobs == 10  # override over YAML
    assert judge.concurrency == 2  # flag over override over YAML
    assert (selection.k, selection.alpha) == (7, 0.25)
    assert (config.rm_steps, config.batch_size, config.ablate_ks) == (11, 6, (1, 3))
    assert config.adapter_steps == PipelineConfig().adapter_steps


def test_pipeline_reaches_every_judge_option(monkeypatch):
    config = _pipeline_config(
        monkeypatch,
        "--judge",
        "openai",
        "--base-url",
        "http://localhost:8000/v1",
        "--model",
        "judge-70b",
        "--api-key-env",
        "MY_KEY",
        "--endpoint",
        "chat",
        "--template",
        "question-last",
        "--top-logprobs",
        "20",
        "--concurrency",
        "8",
        "--timeout",
        "30",
        "--max-retries",
        "2",
    )
    assert config.judge == JudgeConfig(
        kind="openai",
        base_url="http://localhost:8000/v1",
        model="judge-70b",
        api_key_env="MY_KEY",
        endpoint="chat",
        template="question-last",
        top_logprobs=20,
        concurrency=8,
        timeout=30,
        max_retries=2,
    )
    options = config.judge.judge_options()
    assert options["require_key"] and options["api_key_env"] == "MY_KEY"
    jax = _pipeline_config(
        monkeypatch, "--judge", "jax", "--model", "m.gguf", "--judge-mesh", "fsdp=2"
    )
    assert (jax.judge.mesh, jax.judge.dtype) == ("fsdp=2", "float32")
    assert _pipeline_config(monkeypatch, "judge.dtype=bfloat16", "judge.kind=jax").judge.dtype == (
        "bfloat16"
    )


def test_pipeline_help_shows_the_judge_options():
    result = CliRunner().invoke(main, ["pipeline", "--help"])
    assert result.exit_code == 0
    for flag in (
        "--judge [embedded|openai|jax]",
        "--base-url",
        "--model",
        "--api-key-env",
        "--endpoint [completions|chat]",
        "--prompts-per-request",
        "--top-logprobs",
        "--template",
        "--concurrency",
        "--timeout",
        "--max-retries",
        "--judge-dtype [float32|bfloat16]",
        "--judge-mesh",
        "--config",
        "--policy [adaptive|all|random|fixed]",
    ):
        assert flag in result.output, flag
    assert "[KEY=VALUE]..." in result.output


def test_unknown_key_names_the_file_line_and_a_near_key(tmp_path):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text("judge:\n  kind: embedded\n  top_logprob: 20\n")
    output = _fail("pipeline", "--config", config_file)
    assert f"{config_file} line 3: unknown key 'judge.top_logprob'" in output
    assert "did you mean 'judge.top_logprobs'?" in output
    output = _fail("pipeline", "judge.bogus=1")
    assert "override 'judge.bogus=1': unknown key 'judge.bogus'" in output
    with pytest.raises(DynrulesError, match="unknown key 'stpes'; did you mean 'steps'"):
        load_config(None, ["stpes=3"])


def test_a_key_the_command_does_not_read_is_an_error(tmp_path):
    output = _fail("pipeline", "serve.port=9")
    assert "key 'serve.port' is not used by `dynrules pipeline`" in output
    config_file = tmp_path / "c.yaml"
    config_file.write_text("rm_steps: 3\n\ntrain:\n  steps: 5\n")
    output = _fail("pipeline", "--config", config_file)
    assert f"{config_file} line 4: key 'train.steps' is not used by `dynrules pipeline`" in output
    # A setting of another judge: unused, so refused rather than ignored.
    output = _fail("pipeline", "judge.top_logprobs=5")
    assert "judge.top_logprobs applies to judge.kind openai, not 'embedded'" in output
    output = _fail("rate", "pairs.jsonl", "--out", "store", "--judge-dtype", "bfloat16")
    assert "--judge-dtype: judge.dtype applies to judge.kind jax, not 'embedded'" in output


def test_literal_choices_are_refused_clearly():
    output = _fail("pipeline", "judge.endpoint=grpc")
    assert "judge.endpoint must be one of completions, chat, got 'grpc'" in output
    output = _fail("pipeline", "--policy", "zscore")
    assert "'zscore' is not one of 'adaptive', 'all', 'random', 'fixed'" in output
    with pytest.raises(ConfigError, match="policy must be one of adaptive, all, random, fixed"):
        SelectionConfig(policy="zscore")
    with pytest.raises(
        DynrulesError, match="'remat=some': remat must be one of none, full, dots, got 'some'"
    ):
        load_config(None, ["remat=some"])
    with pytest.raises(DynrulesError, match="steps must be int, got 'many'"):
        load_config(None, ["steps=many"])


def test_text_values_take_the_fields_types(tmp_path):
    tree = PIPELINE.tree
    built = settings.load(
        tree,
        overrides=[
            "judge.kind=openai",
            "judge.concurrency=null",
            "selection.rules=a, b",
            "rm_steps=1e2",
            "selection.criterion=none",
        ],
    )
    assert built["judge"].concurrency is None and built["selection"].criterion is None
    assert built["selection"].rules == ("a", "b") and built["pipeline"].rm_steps == 100
    path = tmp_path / "rm.yaml"
    path.write_text(
        "optim:\n  learning_rate: 3.0e-5\nrun: {mesh: {data: 4, fsdp: 2}}\nsteps: 1e3\n"
    )
    config = load_config(path, ["model.remat=yes", "train.seed=4"])
    assert (config.learning_rate, config.mesh, config.steps) == (3e-5, "data=4,fsdp=2", 1000)
    assert (config.remat, config.seed) == ("full", 4)


def test_null_leaves_an_unset_string_field_at_its_empty_default(tmp_path):
    """``train.model=null`` is not the checkpoint "null"; YAML ``model: null`` / ``eval_data: ~``
    (old files) still load, as the default ""."""
    for word in ("null", "None", "~"):
        config = load_config(None, [f"train.model={word}", f"eval_data={word}"])
        assert (config.model, config.eval_data) == ("", "")
    path = tmp_path / "rm.yaml"
    path.write_text("model: null\neval_data: ~\nsteps: 3\n")
    config = load_config(path)
    assert (config.model, config.eval_data, config.steps) == ("", "", 3)
    assert load_config(None, ["model=some/dir"]).model == "some/dir"


def test_old_run_json_loads_and_resumes_with_the_same_values():
    config = make_config(OLD_RUN_CONFIG)
    saved = config.to_dict()
    assert {k: saved[k] for k in OLD_RUN_CONFIG} == OLD_RUN_CONFIG
    new_keys = set(saved) - set(OLD_RUN_CONFIG)
    assert all(saved[k] == getattr(TrainConfig(), k) for k in new_keys)  # defaults: old behaviour
    # The CLI's path: the saved config is the base, overrides go on top.
    resumed = load_config(None, ["steps=90"], base=OLD_RUN_CONFIG)
    assert resumed.steps == 90 and resumed.eval_data == "out/demo/validation.jsonl"
    demo = ROOT / "out" / "demo" / "rm-rules" / "run.json"
    if demo.is_file():
        import json

        assert make_config(json.loads(demo.read_text())["config"]).to_dict()["steps"] > 0


def test_defaults_did_not_move_and_are_declared_once():
    defaults = TrainConfig().to_dict()
    assert {k: defaults[k] for k in OLD_TRAIN_DEFAULTS} == OLD_TRAIN_DEFAULTS
    judge = JudgeConfig()
    signature = inspect.signature(OpenAIJudge).parameters
    for name in ("endpoint", "top_logprobs", "timeout", "max_retries", "concurrency"):
        assert signature[name].default == getattr(judge, name), name
    assert SelectionConfig() == SelectionConfig("adaptive", 5, None, 0.5, 0, (), "drop")
    grouped = [key for keys in GROUPS.values() for key in keys]
    assert sorted(grouped) == sorted(TrainConfig.keys())  # every train key in one group


def test_choices_come_from_the_implementations():
    from dynrules.models import choices, classifier, llama, pooling

    assert choices.REMAT == tuple(llama.REMAT_POLICIES)
    assert choices.DTYPES == tuple(classifier.COMPUTE_DTYPES)
    assert choices.POOLINGS == pooling.POOLING_MODES


@pytest.mark.slow
def test_encoder_remat_dots_works_and_changes_no_number():
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from dynrules.models import bert

    config = bert.BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 50
    lengths = jnp.array([6, 4])
    weights = jax.random.normal(jax.random.key(1), (2, 6, 16))
    grads = {}
    for remat in ("none", "full", "dots"):
        encoder = bert.BertEncoder(config, rngs=nnx.Rngs(0), remat=remat)
        graph, params = nnx.split(encoder)

        def loss(p, graph=graph):
            return (nnx.merge(graph, p)(ids, lengths) * weights).sum()

        grads[remat] = jax.tree.leaves(jax.grad(loss)(params))
    flat = {remat: np.concatenate([np.ravel(g) for g in leaves]) for remat, leaves in grads.items()}
    scale = float(np.abs(flat["none"]).max())
    for remat in ("full", "dots"):  # recomputation moves only float rounding
        np.testing.assert_allclose(flat[remat], flat["none"], rtol=0, atol=1e-5 * scale)
    with pytest.raises(DynrulesError, match="remat must be one of none, full, dots"):
        bert.BertEncoder(config, rngs=nnx.Rngs(0), remat="some")


def test_docs_reference_is_the_tree():
    """docs/configuration.md's reference is what `dynrules config --markdown` prints."""
    text = (ROOT / "docs" / "configuration.md").read_text()
    start = text.index("-->\n", text.index("<!-- reference:")) + len("-->\n")
    block = text[start : text.index("<!-- end of reference -->")].strip()
    assert block == settings.reference_markdown(TREE).strip(), (
        "regenerate the reference in docs/configuration.md with `dynrules config --markdown`"
    )


def test_every_tree_command_takes_config_and_overrides():
    for spec in (
        cli.SELECT,
        cli.RATE,
        cli.SIMULATE,
        cli.TRAIN_RM,
        cli.TRAIN_ADAPTER,
        cli.MI,
        cli.ABLATE,
        cli.PLAN,
    ):
        command = main.commands[spec.command]
        names = {p.name for p in command.params}
        assert {"config_file", "overrides"} <= names, spec.command
    assert dataclasses.is_dataclass(PipelineConfig)


def test_a_command_reading_some_fields_refuses_the_others_unless_at_default():
    tree = cli.ABLATE.tree
    assert tree.reads["selection"] == ("alpha",)
    built = settings.load(tree, overrides=["selection.alpha=0.25", "selection.k=5", "ks=1-R"])
    assert (built["selection"].alpha, built["ablate"].ks) == (0.25, "1-R")  # k=5: its default
    with pytest.raises(ConfigError, match=r"'selection.k=3': key 'selection.k' is not used by"):
        settings.load(tree, overrides=["selection.k=3"])
    built = settings.load(tree, overrides=["policies=greedy, all", "ablate.ks=1"])
    assert built["ablate"].policies == ("greedy", "all")
    with pytest.raises(ConfigError, match="ablate.ks: bad k list '1,x'"):
        settings.load(tree, overrides=["ablate.ks=1,x"])


def test_tuple_of_choices_is_documented_with_its_choices():
    from dynrules.engine.ablate import ABLATION_POLICIES, AblationConfig

    info = settings.fields(AblationConfig)["policies"]
    assert info.item_choices == ABLATION_POLICIES and info.item_type is str
    assert "| `policies` | `--policies` | list of `adaptive` \\| `zscore`" in (
        settings.reference_markdown({"ablate": AblationConfig})
    )


def test_bench_options_take_the_trees_fields():
    """A bench option that is a tree setting takes its type, choices and help from the field."""
    from dynrules.models.choices import DTYPES, REMAT
    from dynrules.train.config import SCORE_BATCH_SIZE

    def option(command, name):
        return next(p for p in main.commands["bench"].commands[command].params if p.name == name)

    assert option("score", "batch_size").default == SCORE_BATCH_SIZE
    assert option("selection", "k").default == SelectionConfig().k
    assert tuple(option("mfu", "dtype").type.choices) == DTYPES
    assert tuple(option("mfu", "remat").type.choices) == REMAT
    assert option("judge-local", "dtype").opts == ["--judge-dtype"]


def _plan_sections(monkeypatch, *args):
    """The plan and train sections `dynrules plan ARGS` would compile with (the compile stubbed)."""
    seen = {}

    def fake_plan(config, train):
        seen.update(plan=config, train=train)
        return {"stubbed": True}

    monkeypatch.setattr("dynrules.plan.plan_with", fake_plan)
    result = CliRunner().invoke(main, ["plan", *map(str, args), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return seen["plan"], seen["train"]


def test_plan_precedence_defaults_yaml_overrides_flags(tmp_path, monkeypatch):
    plan, train = _plan_sections(monkeypatch, "--model", "llama-3.2-1b", "--topology", "v5e-8")
    assert (plan.seq, plan.batch, plan.task, plan.mesh) == (2048, 64, "train", "")
    # The plan's own defaults for the train section's keys, not train-rm's (float32, none).
    assert (train.dtype, train.param_dtype, train.remat, train.attention) == (
        "bfloat16",
        "float32",
        "full",
        "auto",
    )
    config_file = tmp_path / "plan.yaml"
    config_file.write_text(
        "model: llama-3.2-1b\ntopology: v5e-8\nseq: 1024\nbatch: 32\n"
        "train: {remat: dots, attention: splash, param_dtype: bfloat16}\n"
    )
    plan, train = _plan_sections(
        monkeypatch,
        "--config",
        config_file,
        "seq=512",
        "plan.mesh=fsdp=4",
        "train.attention=xla",
        "--seq",
        "256",
        "--topology",
        "cpu:4",
    )
    assert (plan.model, plan.batch) == ("llama-3.2-1b", 32)  # YAML
    assert (plan.topology, plan.seq) == ("cpu:4", 256)  # flag over override over YAML
    assert (plan.mesh, plan.grad_accum) == ("fsdp=4", 1)  # override; default
    assert (train.remat, train.param_dtype, train.dtype) == ("dots", "bfloat16", "bfloat16")
    assert train.attention == "xla"  # override over YAML
    _, train = _plan_sections(monkeypatch, "--config", config_file, "--attention", "cudnn")
    assert train.attention == "cudnn"
    # `dynrules config plan` writes the plan's defaults, and its file loads back.
    written = CliRunner().invoke(main, ["config", "plan"])
    assert written.exit_code == 0 and "  dtype: bfloat16  #" in written.output
    (tmp_path / "all.yaml").write_text(written.output)
    built = settings.load(cli.PLAN.tree, path=tmp_path / "all.yaml")
    assert (built["train"].dtype, built["train"].remat) == ("bfloat16", "full")
    markdown = CliRunner().invoke(main, ["config", "plan", "--markdown"]).output
    assert "| `remat` | `--remat` | `none` \\| `full` \\| `dots` | `full` |" in markdown


def test_plan_refuses_unknown_and_unused_keys():
    base = ("plan", "--model", "llama-3.2-1b", "--topology", "v5e-8")
    output = _fail(*base, "plan.sequence=5")
    assert "override 'plan.sequence=5': unknown key 'plan.sequence'" in output
    assert "did you mean 'plan.seq'?" in output
    output = _fail(*base, "train.steps=5")
    assert "key 'train.steps' is not used by `dynrules plan` (of train it reads train.dtype" in (
        output
    )
    output = _fail(*base, "--pairs", "5")
    assert "--pairs: plan.pairs applies to plan.task judge, not 'train'" in output
    output = _fail(*base, "--task", "judge", "--remat", "dots")
    assert "train.remat applies to plan.task train, not 'judge'" in output
    output = _fail(*base, "--attention", "flash")
    assert (
        "'flash' is not one of 'auto', 'xla', 'splash', 'pallas_gpu', 'cudnn', 'segment_cpu'"
        in output
    )
    assert "plan.model is required" in _fail("plan", "--topology", "v5e-8")
