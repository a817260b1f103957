"""The `dynrules` command group. Thin: parse, validate, call engine/ or train/, print.

Heavy modules (JAX above all) are imported inside the commands that need them, so
`dynrules --help` and the NumPy-only commands start fast.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import click

from dynrules.benchmarks.paths import HH_TEST
from dynrules.cliopts import (
    ALL,
    CommandTree,
    backbone_option,
    dtype_option,
    field_option,
    json_option,
    load_tree,
    overrides_argument,
    pool_option,
    shard_option,
    split_overrides,
    tree_flags,
    tree_options,
)
from dynrules.engine.judges.config import JudgeConfig
from dynrules.engine.select import SelectionConfig
from dynrules.engine.store import CHUNK_ROWS
from dynrules.errors import DynrulesError
from dynrules.output import DEFAULT_LEVEL as DEFAULT_LOG_LEVEL
from dynrules.output import LEVEL_ENV, configure_logging
from dynrules.output import LEVELS as LOG_LEVELS
from dynrules.plan import TRAIN_DEFAULTS as PLAN_TRAIN_DEFAULTS
from dynrules.plan import TRAIN_KEYS as PLAN_TRAIN_KEYS
from dynrules.train.config import ScoringConfig, TrainConfig

log = logging.getLogger(__name__)

# What each command reads from the configuration tree (docs/configuration.md): its sections,
# which of their fields get flags, and the section whose keys may be written bare.
SELECT = CommandTree("select", {"selection": ALL}, primary="selection")
RATE = CommandTree("rate", {"judge": ALL}, primary="judge")
SIMULATE = CommandTree("simulate", {"simulate": ALL}, primary="simulate")
TRAIN_RM = CommandTree("train-rm", {"train": ALL}, primary="train")
TRAIN_ADAPTER = CommandTree(
    "train-adapter",
    {"train": ALL, "selection": ("k", "criterion", "alpha")},
    primary="train",
    flags_only=True,
)
SCORE = CommandTree("score", {"scoring": ALL}, primary="scoring")
EVAL = CommandTree("eval", {"scoring": ALL}, primary="scoring")
SERVE = CommandTree("serve", {"serve": ALL}, primary="serve")
MI = CommandTree(
    "mi",
    {"selection": ("policy", "k", "criterion", "alpha", "rules"), "mi": ALL},
    primary="mi",
    flags_only=True,
)
ABLATE = CommandTree(
    "ablate",
    {
        "selection": ("alpha",),
        "mi": ("estimator", "resamples", "seed", "redundancy_pairs"),
        "ablate": ALL,
    },
    primary="ablate",
    flags_only=True,
)
# plan: the plan section, and the train section's keys that shape the compiled step (at the
# plan's own defaults: bfloat16, full remat).
PLAN = CommandTree(
    "plan",
    {"plan": ALL, "train": PLAN_TRAIN_KEYS},
    primary="plan",
    flags_only=True,
    defaults={"train": PLAN_TRAIN_DEFAULTS},
)
PIPELINE = CommandTree(
    "pipeline",
    {
        "judge": ALL,
        "selection": ("k", "policy", "criterion", "alpha", "ties"),
        "pipeline": ALL,
    },
    primary="pipeline",
)
COMMAND_TREES = {
    spec.command: spec
    for spec in (
        SELECT,
        RATE,
        SIMULATE,
        TRAIN_RM,
        TRAIN_ADAPTER,
        SCORE,
        EVAL,
        SERVE,
        PIPELINE,
        MI,
        ABLATE,
        PLAN,
    )
}


class _Group(click.Group):
    """Turns user-facing errors into one line on stderr and exit code 2, with no traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DynrulesError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)


@click.group(cls=_Group)
@click.version_option(package_name="dynrules")
@click.option(
    "--log-level",
    type=click.Choice(LOG_LEVELS, case_sensitive=False),
    envvar=LEVEL_ENV,
    default=DEFAULT_LOG_LEVEL,
    show_default=True,
    show_envvar=True,
    help="Level of dynrules' diagnostics on stderr (other libraries': WARNING). Results go to "
    "stdout; see output.py for the output policy.",
)
def main(log_level):
    """dynrules: data-adaptive safety rules for training reward models."""
    configure_logging(log_level)


@main.group(cls=_Group)
def bench():
    """Side-by-side benchmarks; each prints its results and the ratios between them."""


def _or_nan(value) -> float:
    """None (an undefined rate, e.g. agreement with no decided labels) printed as nan."""
    return float("nan") if value is None else value


def print_json(result) -> None:
    """A result as one JSON object on stdout: a typed result's ``to_json()`` where it chooses its
    keys, else all its fields; a benchmark's record as it is."""
    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        result = result.to_json() if hasattr(result, "to_json") else dataclasses.asdict(result)
    click.echo(json.dumps(result))


@main.command("config")
@click.argument("command", required=False, type=click.Choice(sorted(COMMAND_TREES)))
@click.option(
    "--markdown", is_flag=True, help="Print the reference of every key (docs/configuration.md)."
)
def config_command(command, markdown):
    """Print the configuration tree at its defaults, as YAML with each key's help: for COMMAND,
    the sections it reads (a file for its --config); without, every section."""
    from dynrules.cliopts import TREE
    from dynrules.settings import defaults_yaml, reference_markdown

    tree = None if command is None else COMMAND_TREES[command].tree
    sections = TREE if tree is None else tree.sections
    defaults = None if tree is None else tree.defaults
    text = reference_markdown(sections, defaults) if markdown else defaults_yaml(sections, defaults)
    click.echo(text, nl=False)


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Rating store directory to create.",
)
@pool_option
@dtype_option("Stored dtype.")
@json_option()
def ingest(input_path, out, pool_source, dtype, as_json):
    """Ingest scored pairs (JSONL or Parquet) into a rating store."""
    from dynrules.engine.ingest import ingest as run_ingest
    from dynrules.engine.pool import load_pool

    summary = run_ingest(
        input_path, out, pool=load_pool(pool_source), dtype=dtype, progress=not as_json
    )
    print_json(summary) if as_json else click.echo(
        f"ingested {summary.pairs} pairs x {summary.rules} rules ({dtype}) into {out} in {summary.seconds} s"
    )


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@overrides_argument
@tree_options(SELECT)
@shard_option("Select only worker I's share of N (chunk-aligned rows; outputs concatenate).")
@click.option("--pool", "pool_source", default=None, help="Check the store against this rule pool.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Labelled pairs JSONL (prompt, chosen, rejected, margin).",
)
@json_option()
def select(store_path, overrides, shard, pool_source, out, as_json, **params):
    """Select rules per pair, label the pairs and write them for reward-model training."""
    from dynrules.engine.pool import load_pool
    from dynrules.engine.select import run_selection
    from dynrules.engine.store import RatingStore

    store = RatingStore.open(store_path, pool=load_pool(pool_source) if pool_source else None)
    config = load_tree(SELECT, params, overrides)["selection"]
    summary = run_selection(store, config, out, shard=shard, progress=not as_json)
    if summary.rated_cells < summary.cells:
        log.warning(
            "%s of %s cells are rated (a plan, or failed cells); an unrated cell has d = 0 and "
            "adds nothing to a margin",
            f"{summary.rated_cells:,}",
            f"{summary.cells:,}",
        )
    if as_json:
        print_json(summary)
    else:
        click.echo(
            f"{summary.pairs} pairs: {summary.preferred_a} prefer A, {summary.preferred_b} prefer B, "
            f"{summary.ties} ties; {summary.labelled} labelled pairs"
            + (f" written to {out}" if out else "")
            + f" ({summary.seconds} s)"
        )


@bench.command("selection")
@click.option("--pairs", "n_pairs", default=1_000_000, show_default=True)
@click.option("--rules", "n_rules", default=100, show_default=True)
@field_option(SelectionConfig, "k")
@json_option()
def bench_selection(n_pairs, n_rules, k, as_json):
    """Selection throughput: pandas loop, NumPy, our kernel (memory, store) and the roofline."""
    from dynrules.benchmarks.selection import bench_selection as run

    result = run(n_pairs, n_rules, k)
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(
            f"{name:>20}: {value:>14,.0f} pairs/s  {result['cpu_ns_per_pair'][name]:>9.1f} CPU ns/pair"
        )
    for name, value in result["ratios"].items():
        click.echo(f"{name:>50}: {value:.3f} (per CPU-second {result['ratios_cpu'][name]:.3f})")


@main.command("train-rm")
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(file_okay=False),
    help="Run directory; an existing run resumes from its last checkpoint.",
)
@tree_options(TRAIN_RM)
@json_option()
@overrides_argument
def train_rm(pairs, out_dir, as_json, overrides, **params):
    """Train a Bradley-Terry reward model on preference pairs (JSONL/Parquet, HH transcripts too).

    Settings: the train section (docs/training.md), from --config, KEY=VALUE and the flags; a
    resumed run starts from its saved config."""
    from dynrules.train.sharding import is_writer
    from dynrules.train.trainer import resolve_config, train_reward_model

    config_file, flags = tree_flags(TRAIN_RM, params)
    config = resolve_config(out_dir, TRAIN_RM.tree, config_file, [*overrides, *flags])["train"]
    result = train_reward_model(pairs, out_dir, config, progress=not as_json)
    if not is_writer():  # in a multi-process job process 0 speaks for all
        return
    if as_json:
        print_json(result)
    else:
        accuracy = f", held-out accuracy {result.eval['accuracy']:.3f}" if result.eval else ""
        kept = "" if result.exported_step == result.steps else f" (step {result.exported_step}'s)"
        click.echo(
            f"trained {result.steps} steps{accuracy}; model{kept} in {result.model_dir}; "
            f"truncated texts: {result.truncated['train']} train, {result.truncated['eval']} eval"
        )


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="Scored JSONL to write.",
)
@overrides_argument
@tree_options(SCORE)
@json_option()
def score(run, input_path, out_path, overrides, as_json, **params):
    """Add a "reward" to every prompt/response (or text) record of INPUT with RUN's reward model."""
    from dynrules.train.scoring import score_file
    from dynrules.train.sharding import is_writer

    config = load_tree(SCORE, params, overrides)["scoring"]
    summary = score_file(
        run,
        input_path,
        out_path,
        batch_size=config.batch_size,
        mesh=config.mesh,
        distributed=config.distributed,
    )
    if not is_writer():
        return
    print_json(summary) if as_json else click.echo(
        f"scored {summary.records} records into {out_path} in {summary.seconds:.1f} s "
        f"({summary.truncated} texts truncated)"
    )


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@overrides_argument
@tree_options(SERVE)
def serve(run, overrides, **params):
    """Serve RUN's reward model over HTTP for RL loops (/v1/rewards, OpenRLHF's /get_reward).

    Binds 127.0.0.1 unless --host says otherwise; stops cleanly on SIGTERM.
    """
    from dynrules.serve import serve as run_server

    run_server(run, load_tree(SERVE, params, overrides)["serve"])


@main.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(dir_okay=False))
@overrides_argument
@tree_options(EVAL)
@json_option("Print the machine-readable report.")
def eval_rm(run, data, overrides, as_json, **params):
    """Pairwise accuracy of RUN's reward model on DATA (ties wrong), per subset and section."""
    from dynrules.train.evaluate import evaluate
    from dynrules.train.sharding import is_writer

    config = load_tree(EVAL, params, overrides)["scoring"]
    report = evaluate(
        run, data, batch_size=config.batch_size, mesh=config.mesh, distributed=config.distributed
    )
    if not is_writer():
        return
    if as_json:
        print_json(report)
        return
    click.echo(
        f"{report.pairs} pairs: accuracy {report.accuracy:.4f} (length-only baseline "
        f"{report.length_baseline:.4f}); reward mean {report.reward_mean:.4f} std {report.reward_std:.4f}; "
        f"{report.truncated} texts truncated"
    )
    for kind, groups in (("section", report.sections), ("subset", report.subsets)):
        for name, group in groups.items():
            click.echo(
                f"  {kind} {name}: {group.accuracy:.4f} over {group.pairs} pairs "
                f"(length-only {group.length_baseline:.4f})"
            )


@main.command("plan")
@overrides_argument
@tree_options(PLAN)
@json_option("Print the plan as one JSON object.")
def plan_command(overrides, as_json, **params):
    """Compile the reward-model training step (or the judge's forward) ahead of time for
    TOPOLOGY: memory, fit, FLOPs (and, for the judge, ratings/s and the chips a job needs).

    The plan section, and the train section's dtype (judge: the weights' too), param_dtype,
    remat and attention (auto: splash on a TPU topology, XLA's on cpu:N)."""
    from dynrules.plan import plan_with, render_plan

    tree = load_tree(PLAN, params, overrides)
    result = plan_with(tree["plan"], tree["train"])
    print_json(result) if as_json else click.echo(render_plan(result))


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option(
    "--processes", "-n", required=True, type=click.IntRange(min=1), help="Processes to start."
)
@click.option(
    "--devices-per-process",
    type=click.IntRange(min=1),
    default=None,
    help="Forced CPU devices per process (XLA_FLAGS); default: what JAX finds.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def launch(processes, devices_per_process, command):
    """Run a dynrules COMMAND as N local processes of one JAX job (dynrules launch -n 2 -- train-rm …).

    Each process sees JAX_COORDINATOR_ADDRESS (127.0.0.1 and a free port), JAX_NUM_PROCESSES and
    JAX_PROCESS_ID; its output is prefixed [I]. Fails if any process fails, and then stops the rest.
    """
    from dynrules.launch import launch as run_job

    sys.exit(run_job(command, processes, devices_per_process=devices_per_process))


@main.command()
@click.argument("pairs_path", metavar="PAIRS", type=click.Path(dir_okay=False))
@overrides_argument
@pool_option
@tree_options(RATE)
@click.option(
    "--plan",
    type=click.Path(dir_okay=False),
    help='JSONL of {"id", "rule_ids"}: rate only these rules per pair.',
)
@dtype_option()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Rating store: created, or continued.",
)
@shard_option("Rate only worker I's share of N; the last worker to finish folds the store.")
@click.option(
    "--chunk-rows",
    default=CHUNK_ROWS,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rows per stored chunk of a new store (the unit of reads and of --shard).",
)
@json_option('Print {"rated", "skipped_done", "failed", "seconds"}.')
def rate(
    pairs_path, overrides, pool_source, plan, dtype, out, shard, chunk_rows, as_json, **params
):
    """Rate pairs (JSONL/Parquet, or HH transcripts) on every rule, resumably, into a rating store.

    Settings: the judge section (docs/judges.md), from --config, KEY=VALUE and the flags."""
    from dynrules.engine.judges.runner import rate_pairs
    from dynrules.engine.pool import load_pool
    from dynrules.pipeline import open_judge

    judge_config = load_tree(RATE, params, overrides)["judge"]
    pool = load_pool(pool_source)
    with open_judge(judge_config, pool) as judge:
        summary = rate_pairs(
            pairs_path,
            out,
            pool=pool,
            judge=judge,
            plan=plan,
            dtype=dtype,
            progress=not as_json,
            shard=shard,
            chunk_rows=chunk_rows,
        )
    if as_json:
        print_json(summary)
    else:
        lo, hi = summary.rows
        state = (
            f"store {out} has {summary.done:,} of {summary.pairs * summary.rules:,} cells done"
            if summary.done is not None
            else f"rows {lo}–{hi} of {out} done; the last worker to finish folds the store"
        )
        click.echo(
            f"rated {summary.rated:,} cells, skipped {summary.skipped_done:,} already done, "
            f"{summary.failed:,} failed in {summary.seconds} s; {state}"
            + (f" (failure reasons in {summary.failures_file})" if summary.failed else "")
        )


@main.command()
@click.option(
    "--pairs", "n_pairs", required=True, type=click.IntRange(min=1), help="Pairs to draw."
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Rating store directory to create.",
)
@click.option("--seed", default=0, show_default=True)
@overrides_argument
@tree_options(SIMULATE)
@dtype_option("Stored dtype.")
@json_option()
def simulate(n_pairs, out, seed, overrides, dtype, as_json, **params):
    """Draw a rating store from the generative model (truth stored as the pair field 'truth')."""
    from dynrules.engine.simulate import simulate as run_simulate

    model = load_tree(SIMULATE, params, overrides)["simulate"]
    summary = run_simulate(out, n_pairs, model, seed=seed, dtype=dtype)
    print_json(summary) if as_json else click.echo(
        f"simulated {summary.pairs:,} pairs x {summary.rules} rules ({summary.a_better:,} with A better, "
        f"{summary.duplicates} duplicated rules) into {out} in {summary.seconds} s"
    )


@main.command("mi")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@overrides_argument
@click.option(
    "--truth", required=True, help="Pair field holding the truth: 1 when A is better, 0 when B is."
)
@tree_options(MI)
@json_option()
def mi_command(store_path, overrides, truth, as_json, **params):
    """Mutual information between rule votes / a policy's label and the truth, in bits (the mi
    section; the selection section's policy, k, criterion, alpha and rules pick the label)."""
    from dynrules.engine.mi import mi_report

    tree = load_tree(MI, params, overrides)
    config = tree["mi"]
    report = mi_report(store_path, truth, tree["selection"], config)
    if as_json:
        print_json(report)
        return
    rules = report.rules
    click.echo(f"{report.pairs:,} pairs; per-rule I(vote; {truth}) in bits ({report.estimator}):")
    top = config.top
    shown = rules if len(rules) <= 2 * top else [*rules[:top], None, *rules[-top:]]
    for rule in shown:
        if rule is None:
            click.echo(f"  … {len(rules) - 2 * top} more …")
            continue
        click.echo(f"  {rule.id:>24}  {rule.mi_bits:9.5f}  p = {rule.p_value:.3g}")
    label = report.label
    click.echo(
        f"label of {label.policy}"
        + (f" ({label.criterion})" if label.criterion else "")
        + f", k = {label.k}: I = {label.mi_bits:.4f} bits [{label.ci_low:.4f}, {label.ci_high:.4f}]"
        + f", agreement {_or_nan(label.agreement):.4f}, ties {label.ties:,}"
    )
    for pair in report.redundant[:3]:
        click.echo(f"redundant: {pair.a} ~ {pair.b} ({pair.redundancy:.3f})")


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@overrides_argument
@click.option(
    "--truth", required=True, help="Pair field holding the truth: 1 when A is better, 0 when B is."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Directory for table and plots."
)
@tree_options(ABLATE)
@json_option("Print the rows as JSON.")
def ablate(store_path, overrides, truth, out, as_json, **params):
    """Compare selection policies x k against the truth: Markdown, JSON and PNG plots in --out
    (the ablate section; the mi section's estimator and intervals, the selection's alpha)."""
    from dynrules.engine.ablate import ablate_with
    from dynrules.report import write_ablation_report

    tree = load_tree(ABLATE, params, overrides)
    result = ablate_with(store_path, truth, tree["ablate"], tree["mi"], tree["selection"])
    written = write_ablation_report(result, out)
    if as_json:
        print_json(result)
        return
    for row in result.rows:
        name = row.policy + (f" ({row.criterion})" if row.criterion else "")
        click.echo(
            f"{name:>20} k={row.k:<4} agreement {_or_nan(row.agreement):.4f}  "
            f"I = {row.mi_bits:.4f} [{row.ci_low:.4f}, {row.ci_high:.4f}] bits  ties {row.ties:,}"
        )
    click.echo("wrote " + ", ".join(str(path) for path in written))


@bench.command("mi")
@click.option(
    "--pairs", "n_pairs", default=1_000_000, show_default=True, type=click.IntRange(min=1)
)
@click.option("--rules", "n_rules", default=100, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--sklearn-pairs",
    default=20_000,
    show_default=True,
    help="Subsample for the scikit-learn loop.",
)
@json_option()
def bench_mi(n_pairs, n_rules, sklearn_pairs, as_json):
    """Per-rule MI: scikit-learn loop, our counting kernel and the read roofline; interval cost."""
    from dynrules.benchmarks.mi import bench_mi as run

    result = run(n_pairs, n_rules, sklearn_pairs=sklearn_pairs)
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(f"{name:>14}: {value:>14,.0f} pairs/s")
    click.echo(
        f"{'point':>14}: {result['point_seconds']:.4f} s; with 1,000-resample intervals for every rule: "
        f"{result['interval_1000_seconds']:.4f} s"
    )
    for name, value in result["ratios"].items():
        click.echo(f"{name:>24}: {value:.3f}")


@main.command("train-adapter")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@overrides_argument
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Adapter run directory."
)
@tree_options(TRAIN_ADAPTER)
def train_adapter_command(store_path, overrides, out, **params):
    """Train the rule adapter on a fully rated STORE (the train section as in train-rm, a resumed
    run starting from its saved config; the selection's k, criterion and alpha pick the oracle's
    rules, its targets)."""
    from dynrules.train.adapter import train_adapter
    from dynrules.train.sharding import is_writer
    from dynrules.train.trainer import resolve_config

    config_file, flags = tree_flags(TRAIN_ADAPTER, params)
    tree = resolve_config(out, TRAIN_ADAPTER.tree, config_file, [*overrides, *flags])
    info = train_adapter(store_path, out, tree["train"], selection=tree["selection"])
    if not is_writer():  # in a multi-process job process 0 speaks for all
        return
    click.echo(
        f"adapter trained on {info.train_pairs} pairs, {info.steps} steps, final BCE "
        f"{info.final_loss:.4f}; written to {out}"
    )


@main.command("apply-adapter")
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, exists=True))
@click.argument("pairs_path", metavar="PAIRS", type=click.Path(dir_okay=False))
@click.option(
    "--k",
    type=int,
    default=None,
    help="Rules per pair in the plan.  [default: the k the adapter was trained with]",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Plan JSONL: {id, rule_ids} per pair.",
)
@json_option()
def apply_adapter_command(run_dir, pairs_path, k, out, as_json):
    """Predict each pair's k critical rules: a plan for `dynrules rate --plan`."""
    from dynrules.engine.pairs import load_pairs
    from dynrules.train.adapter import read_adapter, write_plan

    if k is None:
        k = read_adapter(run_dir).selection["k"]
    summary = write_plan(run_dir, load_pairs(pairs_path), k, out)
    print_json(summary) if as_json else click.echo(
        f"plan for {summary.pairs} pairs x {k} rules written to {out}: {summary.judge_calls} judge calls "
        f"instead of {summary.judge_calls_full_pool} ({summary.judge_calls_saved:.0%} saved)"
    )


@main.command()
@click.argument("args", nargs=-1, metavar="[PAIRS] [KEY=VALUE]...")
@click.option(
    "--out", "out_dir", default="out/pipeline", show_default=True, type=click.Path(file_okay=False)
)
@tree_options(PIPELINE)
def pipeline(args, out_dir, **params):
    """The main job: rate -> select -> ablate -> adapter -> reward model -> evaluate -> report.

    PAIRS defaults to the embedded PyRIT pairs (real responses, human harm scores). Settings:
    the pipeline, judge and selection sections, from --config, KEY=VALUE and the flags.
    """
    from dynrules.pipeline import run_pipeline

    paths, overrides = split_overrides(args, inputs=1)
    pairs_path = paths[0] if paths else None
    if pairs_path is not None and not Path(pairs_path).is_file():
        raise click.BadParameter(f"{pairs_path!r} is not a file", param_hint="PAIRS")
    config = load_tree(PIPELINE, params, overrides)["pipeline"]
    report = run_pipeline(out_dir, pairs_path, config)
    rm = report.reward_model
    if "accuracy" in rm:
        click.echo(
            f"reward model on held-out pairs: {rm['accuracy']:.3f} (rule labels), "
            f"{rm['human_label_accuracy']:.3f} (human labels), {rm['length_baseline']:.3f} (length only)"
        )
    click.echo(f"report: {Path(out_dir).resolve() / 'report.md'}")
    click.echo(str(Path(out_dir).resolve()))


def _api_key(judge: JudgeConfig) -> str | None:
    """The openai judge's API key, from the variable its section names (or the default one);
    a variable named there must be set."""
    import os

    key = judge.judge_options()
    api_key = os.environ.get(key["api_key_env"])
    if key["require_key"] and not api_key:
        raise DynrulesError(
            f"environment variable {key['api_key_env']} is not set (it should hold the API key)"
        )
    return api_key


@bench.command("judge")
@click.option(
    "--base-url",
    default=None,
    help="Measure against this OpenAI-compatible server instead of the loopback one.",
)
@click.option("--model", default=None, help="Model name served at --base-url.")
@field_option(JudgeConfig, "endpoint")
@field_option(JudgeConfig, "api_key_env")
@click.option(
    "--client-pairs",
    type=click.IntRange(min=1),
    default=None,
    help="Pairs rated by the client [default: 400 on the loopback server, 4 on --base-url].",
)
@click.option(
    "--rules",
    "n_rules",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="With --base-url: rules of the default pool asked per pair.",
)
@click.option(
    "--repeats",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="With --base-url: timed runs per request pattern (the best counts).",
)
@click.option(
    "--embedded-pairs",
    default=64,
    show_default=True,
    help="Pairs rated on every rule by the embedded judge.",
)
@click.option(
    "--prefix-pairs", default=50, show_default=True, help="Pairs for the shared-prefix fractions."
)
@json_option()
def bench_judge(
    base_url,
    model,
    endpoint,
    api_key_env,
    client_pairs,
    n_rules,
    repeats,
    embedded_pairs,
    prefix_pairs,
    as_json,
):
    """Judge client ratings/s (loopback server, or a real one with --base-url), prefix sharing,
    embedded ratings/s."""
    from dynrules.benchmarks import judge as judge_bench

    if base_url:
        if not model:
            raise DynrulesError("--base-url needs --model")
        result = judge_bench.bench_judge_server(
            base_url=base_url,
            model=model,
            endpoint=endpoint,
            api_key=_api_key(JudgeConfig(kind="openai", api_key_env=api_key_env)),
            n_pairs=client_pairs or 4,
            n_rules=n_rules,
            repeats=repeats,
            prefix_pairs=prefix_pairs,
        )
    else:
        result = judge_bench.bench_judge(
            client_pairs=client_pairs or 400,
            embedded_pairs=embedded_pairs,
            prefix_pairs=prefix_pairs,
        )
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(f"{name:>38}: {value:>12,.4g}")


@bench.command("judge-local")
@click.option(
    "--model",
    default=None,
    help="A .gguf file or Hugging Face model directory "
    "[default: the pinned SmolLM2-135M-Instruct GGUF].",
)
@click.option(
    "--pairs",
    "n_pairs",
    type=click.IntRange(min=1),
    default=2,
    show_default=True,
    help="PyRIT pairs rated (both responses, every rule).",
)
@click.option(
    "--rules",
    "n_rules",
    type=click.IntRange(min=1),
    default=None,
    help="First rules of the default pool [default: all].",
)
@field_option(JudgeConfig, "dtype")
@click.option("--no-llamacpp", is_flag=True, help="Skip llama.cpp's server even if installed.")
@json_option()
def bench_judge_local(model, n_pairs, n_rules, dtype, no_llamacpp, as_json):
    """The in-process JAX judge: one pass per response against a pass per rule and against
    llama.cpp's server on the same GGUF, ratings/s and score differences."""
    from dynrules.benchmarks.judge import bench_judge_local as run_bench

    result = run_bench(
        model, n_pairs=n_pairs, n_rules=n_rules, dtype=dtype, llamacpp=not no_llamacpp
    )
    if as_json:
        print_json(result)
        return
    for name, value in result.items():
        if not isinstance(value, dict | str):
            click.echo(f"{name:>28}: {value}")
    for name, ratio in result["ratios"].items():
        click.echo(f"{name:>28}: {ratio}x")


HH_DATA_OPTION = click.option(
    "--data",
    type=click.Path(dir_okay=False),
    default=None,
    help=f"HH harmless-base test pairs [default: {HH_TEST}].",
)


def _echo_reward_bench(result: dict) -> None:
    for name, rates in result["results"].items():
        click.echo(
            f"{name:>14}: {rates['pairs_per_s']:>8.2f} pairs/s {rates['real_tokens_per_s']:>9.0f} "
            f"real tokens/s ({rates['real_over_computed_tokens']:.0%} of computed tokens real)"
        )
    for name, ratio in result["ratios"].items():
        click.echo(f"{name:>20}: {ratio:.2f}x")


@bench.command("train")
@backbone_option()
@click.option("--pairs-per-step", default=8, show_default=True)
@field_option(TrainConfig, "max_length", default=512)
@click.option("--steps", default=6, show_default=True, help="Distinct steps of pairs, cycled.")
@click.option("--seconds", default=20.0, show_default=True, help="Timed seconds per side.")
@HH_DATA_OPTION
@json_option()
def bench_train_rm(backbone, pairs_per_step, max_length, steps, seconds, data, as_json):
    """Reward-model training on HH pairs: JAX packed and unpacked vs PyTorch's padded batches."""
    from dynrules.benchmarks.rewardmodel import bench_train

    result = bench_train(
        backbone=backbone,
        pairs_per_step=pairs_per_step,
        max_length=max_length,
        steps=steps,
        seconds=seconds,
        data=data,
    )
    if as_json:
        print_json(result)
        return
    _echo_reward_bench(result)


@bench.command("score")
@backbone_option()
@click.option("--pairs", "n_pairs", default=256, show_default=True)
@field_option(ScoringConfig, "batch_size")
@field_option(TrainConfig, "max_length", default=512)
@HH_DATA_OPTION
@json_option()
def bench_score_rm(backbone, n_pairs, batch_size, max_length, data, as_json):
    """Reward-model scoring on HH pairs: JAX packed and unpacked vs PyTorch's padded batches."""
    from dynrules.benchmarks.rewardmodel import bench_score

    result = bench_score(
        backbone=backbone, pairs=n_pairs, batch_size=batch_size, max_length=max_length, data=data
    )
    if as_json:
        print_json(result)
        return
    _echo_reward_bench(result)


@bench.command("serve")
@click.option("--clients", default=64, show_default=True, help="Concurrent clients.")
@click.option(
    "--requests", default=20, show_default=True, help="Requests (one pair each) a client."
)
@click.option("--c1-requests", default=64, show_default=True, help="Requests of the lone client.")
@field_option(TrainConfig, "max_length", default=256)
@json_option()
def bench_serve(clients, requests, c1_requests, max_length, as_json):
    """Reward server pairs/s at 1 and many clients vs offline scoring of the same model."""
    from dynrules.benchmarks.serve import bench_serve as run

    result = run(clients=clients, requests=requests, c1_requests=c1_requests, max_length=max_length)
    if as_json:
        print_json(result)
        return
    for name in ("offline_pairs_per_s", "server_pairs_per_s_c1", "server_pairs_per_s_c64"):
        click.echo(f"{name:>24}: {result[name]:>10.2f}")
    click.echo(f"{'c64 / offline':>24}: {result['c64_over_offline']:.2f}x")
    click.echo(f"{'p50 / p99 (c64)':>24}: {result['p50_ms']:.0f} / {result['p99_ms']:.0f} ms")
    click.echo(f"{'failed':>24}: {result['failed']}")


@bench.command("multihost")
@click.option("--pairs-per-step", default=8, show_default=True)
@field_option(TrainConfig, "max_length", default=128)
@field_option(TrainConfig, "steps", default=20)
@field_option(TrainConfig, "log_every", default=5, help="Steps per measured window.")
@field_option(TrainConfig, "model", help="Encoder checkpoint directory [default: MiniLM].")
@click.option("--repeats", default=2, show_default=True, help="Runs per side, in turn; best kept.")
@json_option()
def bench_multihost_command(pairs_per_step, max_length, steps, log_every, model, repeats, as_json):
    """Training pairs/s: 1 process x 2 devices vs 2 processes x 1 device (dynrules launch)."""
    from dynrules.benchmarks.multihost import bench_multihost

    result = bench_multihost(
        pairs_per_step=pairs_per_step,
        max_length=max_length,
        steps=steps,
        log_every=log_every,
        model=model,
        repeats=repeats,
    )
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(
            f"{name:>24}: {value:>10.2f} pairs/s (final loss {result['final_loss'][name]:.4f})"
        )
    click.echo(f"{'2 processes / 1':>24}: {result['ratios']['two_processes_over_one']:.2f}x")


PRESET_OPTION_HELP = (
    "A named decoder shape (llama-3.2-1b, llama-3.2-3b, llama-3.1-8b, llama-3.1-70b, smollm2-135m)."
)


@bench.command("mfu")
@click.option("--preset", default="llama-3.2-1b", show_default=True, help=PRESET_OPTION_HELP)
@click.option("--seq", default=2048, show_default=True, type=click.IntRange(min=1))
@click.option("--pairs-per-step", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=10, show_default=True, type=click.IntRange(min=1))
@field_option(TrainConfig, "dtype", default="bfloat16")
@field_option(TrainConfig, "param_dtype")
@field_option(TrainConfig, "remat", default="full")
@click.option(
    "--peak-tflops",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="The device's peak bf16 TFLOP/s [default: from its name, for known GPUs and TPUs].",
)
@click.option(
    "--against-torch",
    is_flag=True,
    help="Also time transformers' LlamaForSequenceClassification of the same shape (CUDA).",
)
@json_option()
def bench_mfu(
    preset,
    seq,
    pairs_per_step,
    steps,
    dtype,
    param_dtype,
    remat,
    peak_tflops,
    against_torch,
    as_json,
):
    """Training tokens/s and model FLOPs utilisation of a random decoder reward model of a named
    shape on one device (a GPU or TPU; on a CPU MFU is not computed)."""
    from dynrules.benchmarks.rewardmodel import bench_train_mfu

    result = bench_train_mfu(
        preset=preset,
        seq=seq,
        pairs_per_step=pairs_per_step,
        steps=steps,
        dtype=dtype,
        param_dtype=param_dtype,
        remat=remat,
        peak_tflops=peak_tflops,
        against_torch=against_torch,
    )
    if as_json:
        print_json(result)
        return
    for name, value in {**result["results"], **result.get("ratios", {})}.items():
        click.echo(f"{name:>20}: {'-' if value is None else f'{value:,.4g}'}")
    if "torch_error" in result:
        click.echo(f"{'torch_error':>20}: {result['torch_error']}")


@bench.command("numerics")
@click.option("--preset", default="llama-3.2-1b", show_default=True, help=PRESET_OPTION_HELP)
@click.option("--seq", default=512, show_default=True, type=click.IntRange(min=1))
@click.option("--pairs-per-step", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--steps", default=20, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--batches",
    default=4,
    show_default=True,
    type=click.IntRange(min=1),
    help="Distinct random batches, cycled.",
)
@json_option()
def bench_numerics(preset, seq, pairs_per_step, steps, batches, as_json):
    """bf16 against float32 compute from the same float32 master weights: rewards before
    training, then the training loss step by step."""
    from dynrules.benchmarks.rewardmodel import bench_bf16_numerics

    result = bench_bf16_numerics(
        preset=preset, seq=seq, pairs_per_step=pairs_per_step, steps=steps, batches=batches
    )
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(f"{name:>22}: {value}")


@bench.command("profile-step")
@backbone_option()
@field_option(TrainConfig, "packing")
@click.option("--pairs-per-step", default=8, show_default=True, type=click.IntRange(min=1))
@field_option(TrainConfig, "max_length", default=512, type=click.IntRange(min=1))
@HH_DATA_OPTION
@json_option()
def bench_profile_step(backbone, packing, pairs_per_step, max_length, data, as_json):
    """Where one reward-model training step on HH pairs spends its time, by kind of XLA
    operation (a jax.profiler trace)."""
    from dynrules.benchmarks.profile_step import profile

    result = profile(backbone, packing, pairs_per_step, max_length, data)
    if as_json:
        print_json(result)
        return
    click.echo(
        f"step {result['step_seconds']:.3f} s, batch {result['batch_shape']}, "
        f"{result['real_over_computed_tokens']:.0%} of computed tokens real"
    )
    for name, share in result["share_of_operation_time"].items():
        click.echo(f"{share:>7.1%}  {name}")


@bench.command("hh-pipeline")
@click.option("--out", default="out/hh-pipeline", show_default=True, type=click.Path())
@click.option("--rm-steps", default=120, show_default=True, type=click.IntRange(min=1))
@click.option("--adapter-steps", default=100, show_default=True, type=click.IntRange(min=1))
@HH_DATA_OPTION
@json_option()
def bench_hh_pipeline_command(out, rm_steps, adapter_steps, data, as_json):
    """The whole pipeline on the HH pairs, split in halves by prompt, scored against the human
    labels; the summary also goes to benchmarks/results/hh_pipeline.json."""
    from dynrules.benchmarks.hh_pipeline import bench_hh_pipeline

    summary = bench_hh_pipeline(out, rm_steps=rm_steps, adapter_steps=adapter_steps, data=data)
    if as_json:
        print_json(summary)
        return
    click.echo(json.dumps(summary["reward_model"], indent=2))


@bench.command("hh-decoder")
@click.option("--out", default="out/hh-decoder", show_default=True, type=click.Path())
@click.option("--steps", default=150, show_default=True, type=click.IntRange(min=1))
@field_option(TrainConfig, "batch_size", default=8, type=click.IntRange(min=1))
@field_option(TrainConfig, "max_length", default=192, type=click.IntRange(min=1))
@click.option(
    "--backbones",
    default="encoder,decoder",
    show_default=True,
    help="Comma-separated backbones to train.",
)
@HH_DATA_OPTION
@json_option()
def bench_hh_decoder_command(out, steps, batch_size, max_length, backbones, data, as_json):
    """Decoder against encoder reward model on HH pairs at the same step budget; resumes from
    benchmarks/results/hh_decoder.json."""
    from dynrules.benchmarks.hh_decoder import RECIPES, bench_hh_decoder

    names = tuple(name.strip() for name in backbones.split(",") if name.strip())
    if not names or set(names) - set(RECIPES):
        raise DynrulesError(f"--backbones: a comma-separated list of {', '.join(RECIPES)}")
    summary = bench_hh_decoder(
        out,
        steps=steps,
        batch_size=batch_size,
        max_length=max_length,
        backbones=names,
        data=data,
    )
    if as_json:
        print_json(summary)
        return
    click.echo(json.dumps(summary, indent=2))


@bench.command("judge-agreement")
@click.option(
    "--hh-pairs",
    "hh_pairs_limit",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="First N HH test pairs (0: all 2,312).",
)
@HH_DATA_OPTION
@json_option()
def bench_judge_agreement_command(hh_pairs_limit, data, as_json):
    """The embedded judge's adaptive top-5 labels against human labels (PyRIT held-out pairs and
    the HH pairs, when there), with intervals."""
    from dynrules.benchmarks.judge_agreement import bench_judge_agreement

    result = bench_judge_agreement(hh_pairs_limit=hh_pairs_limit, data=data)
    if as_json:
        print_json(result)
        return
    click.echo(json.dumps(result, indent=2))


@bench.command("plan-table")
@click.option("--table", "table_only", is_flag=True, help="Only print the saved table.")
def bench_plan_table(table_only):
    """The planning table: `dynrules plan` for 1B-70B reward models on TPU slices, one fresh
    process an entry, kept in benchmarks/results/plan.json (a rerun resumes); then the table."""
    from dynrules.benchmarks.plan_table import plan_table

    click.echo(plan_table(compile_missing=not table_only))
