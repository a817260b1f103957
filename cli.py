"""The `dynrules` command group. Thin: parse, validate, call engine/ or train/, print.

Heavy modules (JAX above all) are imported inside the commands that need them, so
`dynrules --help` and the NumPy-only commands start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from dynrules.errors import DynrulesError


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
def main():
    """dynrules: data-adaptive safety rules for training reward models."""


@main.group(cls=_Group)
def bench():
    """Side-by-side benchmarks; each prints its results and the ratios between them."""


def _or_nan(value) -> float:
    """None (an undefined rate, e.g. agreement with no decided labels) printed as nan."""
    return float("nan") if value is None else value


def print_json(obj) -> None:
    click.echo(json.dumps(obj, sort_keys=False))


def _parse_shard(value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"need 0 <= I < N, got {value!r}")
    return i, n


@main.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Rating store directory to create.",
)
@click.option(
    "--pool",
    "pool_source",
    default="default",
    show_default=True,
    help="Rule pool: 'default' or a file.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "int8"]),
    default="float32",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def ingest(input_path, out, pool_source, dtype, as_json):
    """Ingest scored pairs (JSONL or Parquet) into a rating store."""
    from dynrules.engine.ingest import ingest as run_ingest
    from dynrules.engine.pool import load_pool

    summary = run_ingest(
        input_path, out, pool=load_pool(pool_source), dtype=dtype, progress=not as_json
    )
    print_json(summary) if as_json else click.echo(
        f"ingested {summary['pairs']} pairs x {summary['rules']} rules ({dtype}) into {out} in {summary['seconds']} s"
    )


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--k", default=5, show_default=True, help="Rules selected per pair.")
@click.option(
    "--policy",
    type=click.Choice(["adaptive", "all", "random", "fixed"]),
    default="adaptive",
    show_default=True,
)
@click.option(
    "--criterion",
    type=click.Choice(["additive", "product", "absolute"]),
    default=None,
    help="Adaptive criterion [default: additive with relevance, else absolute].",
)
@click.option(
    "--alpha", default=0.5, show_default=True, help="Weight of |d| in the additive criterion."
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random policy.")
@click.option("--rules", default="", help="Comma-separated rule ids for the fixed policy.")
@click.option(
    "--ties",
    type=click.Choice(["drop", "a", "b"]),
    default="drop",
    show_default=True,
    help="Exact ties: leave out, or give to A or to B (the published behaviour).",
)
@click.option(
    "--shard", default="0/1", callback=lambda c, p, v: _parse_shard(v), help="Process slice I of N."
)
@click.option("--pool", "pool_source", default=None, help="Check the store against this rule pool.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Labelled pairs JSONL (prompt, chosen, rejected, margin).",
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def select(
    store_path, k, policy, criterion, alpha, seed, rules, ties, shard, pool_source, out, as_json
):
    """Select rules per pair, label the pairs and write them for reward-model training."""
    from dynrules.engine.pool import load_pool
    from dynrules.engine.select import SelectionConfig, run_selection
    from dynrules.engine.store import RatingStore

    store = RatingStore.open(store_path, pool=load_pool(pool_source) if pool_source else None)
    config = SelectionConfig(
        policy=policy,
        k=k,
        criterion=criterion,
        alpha=alpha,
        seed=seed,
        rules=tuple(r for r in rules.split(",") if r),
        ties=ties,
    )
    summary = run_selection(store, config, out, shard=shard, progress=not as_json)
    if summary["rated_cells"] < summary["cells"]:
        click.echo(
            f"note: {summary['rated_cells']:,} of {summary['cells']:,} cells are rated (a plan, or "
            "failed cells); an unrated cell has d = 0 and adds nothing to a margin",
            err=True,
        )
    if as_json:
        print_json({key: summary[key] for key in ("pairs", "labelled", "ties", "seconds")})
    else:
        click.echo(
            f"{summary['pairs']} pairs: {summary['preferred_a']} prefer A, {summary['preferred_b']} prefer B, "
            f"{summary['ties']} ties; {summary['labelled']} labelled pairs"
            + (f" written to {out}" if out else "")
            + f" ({summary['seconds']} s)"
        )


@bench.command("selection")
@click.option("--pairs", "n_pairs", default=1_000_000, show_default=True)
@click.option("--rules", "n_rules", default=100, show_default=True)
@click.option("--k", default=5, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_selection(n_pairs, n_rules, k, as_json):
    """Selection throughput: pandas loop, NumPy, our kernel (memory, store) and the roofline."""
    from dynrules.engine.benchmarks import bench_selection as run

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
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of config keys."
)
@click.option(
    "--distributed", is_flag=True, help="Call jax.distributed.initialize() first (multi-host)."
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def train_rm(pairs, out_dir, config_file, distributed, as_json, overrides):
    """Train a Bradley-Terry reward model on preference pairs (JSONL/Parquet, HH transcripts too)."""
    from dynrules.train.trainer import resolve_config, train_reward_model

    config = resolve_config(
        out_dir, config_file, overrides + (("distributed=true",) if distributed else ())
    )
    result = train_reward_model(pairs, out_dir, config, progress=not as_json)
    summary = {
        "run": str(result.run_dir),
        "model": str(result.model_dir),
        "steps": result.steps,
        "resumed_from": result.resumed_from,
        "train": result.train,
        "eval": result.eval,
        "truncated": result.truncated,
    }
    if as_json:
        print_json(summary)
    else:
        accuracy = f", held-out accuracy {result.eval['accuracy']:.3f}" if result.eval else ""
        click.echo(
            f"trained {result.steps} steps{accuracy}; model in {result.model_dir}; "
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
@click.option("--batch-size", default=64, show_default=True)
@click.option("--mesh", default="", help="Device mesh, e.g. data=8 (default: all devices on data).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def score(run, input_path, out_path, batch_size, mesh, as_json):
    """Add a "reward" to every prompt/response (or text) record of INPUT with RUN's reward model."""
    from dynrules.train.scoring import score_file

    summary = score_file(run, input_path, out_path, batch_size=batch_size, mesh=mesh)
    print_json(summary) if as_json else click.echo(
        f"scored {summary['records']} records into {out_path} in {summary['seconds']:.1f} s "
        f"({summary['truncated']} texts truncated)"
    )


@main.command("eval")
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("data", type=click.Path(dir_okay=False))
@click.option("--batch-size", default=64, show_default=True)
@click.option("--mesh", default="", help="Device mesh, e.g. data=8 (default: all devices on data).")
@click.option("--json", "as_json", is_flag=True, help="Print the machine-readable report.")
def eval_rm(run, data, batch_size, mesh, as_json):
    """Pairwise accuracy of RUN's reward model on DATA (ties wrong), per subset and section."""
    from dynrules.train.evaluate import evaluate

    report = evaluate(run, data, batch_size=batch_size, mesh=mesh)
    if as_json:
        print_json(
            {
                key: report[key]
                for key in (
                    "pairs",
                    "accuracy",
                    "length_baseline",
                    "reward_mean",
                    "reward_std",
                    "subsets",
                    "sections",
                )
            }
        )
        return
    click.echo(
        f"{report['pairs']} pairs: accuracy {report['accuracy']:.4f} (length-only baseline "
        f"{report['length_baseline']:.4f}); reward mean {report['reward_mean']:.4f} std {report['reward_std']:.4f}; "
        f"{report['truncated']} texts truncated"
    )
    for kind in ("subsets", "sections"):
        for name, value in report[kind].items():
            click.echo(f"  {kind[:-1]} {name}: {value:.4f}")


@main.command()
@click.argument("pairs_path", metavar="PAIRS", type=click.Path(dir_okay=False))
@click.option(
    "--pool",
    "pool_source",
    default="default",
    show_default=True,
    help="Rule pool: 'default' or a file.",
)
@click.option(
    "--judge",
    "judge_kind",
    type=click.Choice(["embedded", "openai"]),
    default="embedded",
    show_default=True,
    help="Offline embedded judge, or an LLM behind an OpenAI-compatible API.",
)
@click.option("--base-url", help="API root of the openai judge, e.g. http://localhost:8000/v1.")
@click.option("--model", help="Model name served at --base-url.")
@click.option(
    "--api-key-env",
    default="OPENAI_API_KEY",
    show_default=True,
    help="Environment variable holding the API key (unset is fine for local servers; never printed or stored).",
)
@click.option(
    "--endpoint",
    type=click.Choice(["completions", "chat"]),
    default="completions",
    show_default=True,
    help="completions batches several rule questions per request; chat sends one per request.",
)
@click.option(
    "--template",
    default="default",
    show_default=True,
    help="'default' (conversation first), 'published-order' (rule first) or a file with {prompt}, {response}, {rule}.",
)
@click.option(
    "--concurrency", default=16, show_default=True, help="Requests in flight (openai judge)."
)
@click.option(
    "--timeout",
    default=60.0,
    show_default=True,
    help="Seconds per request before a retry (openai judge).",
)
@click.option(
    "--max-retries", default=5, show_default=True, help="Retries per request on 429/5xx/timeouts."
)
@click.option(
    "--plan",
    type=click.Path(dir_okay=False),
    help='JSONL of {"id", "rule_ids"}: rate only these rules per pair.',
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "int8"]),
    default="float32",
    show_default=True,
    help="Stored dtype of a new store.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Rating store: created, or continued.",
)
@click.option(
    "--json", "as_json", is_flag=True, help='Print {"rated", "skipped_done", "failed", "seconds"}.'
)
def rate(
    pairs_path,
    pool_source,
    judge_kind,
    base_url,
    model,
    api_key_env,
    endpoint,
    template,
    concurrency,
    timeout,
    max_retries,
    plan,
    dtype,
    out,
    as_json,
):
    """Rate pairs (JSONL/Parquet, or HH transcripts) on every rule, resumably, into a rating store."""
    from dynrules.engine.judges import make_judge
    from dynrules.engine.judges.runner import rate_pairs
    from dynrules.engine.pool import load_pool

    pool = load_pool(pool_source)
    explicit_key = click.get_current_context().get_parameter_source("api_key_env").name != "DEFAULT"
    options = (
        dict(
            endpoint=endpoint,
            template=template,
            concurrency=concurrency,
            timeout=timeout,
            max_retries=max_retries,
        )
        if judge_kind == "openai"
        else {}
    )
    with make_judge(
        judge_kind,
        pool,
        base_url=base_url,
        model=model,
        api_key_env=api_key_env,
        require_key=explicit_key,
        **options,
    ) as judge:
        summary = rate_pairs(
            pairs_path, out, pool=pool, judge=judge, plan=plan, dtype=dtype, progress=not as_json
        )
    if as_json:
        print_json({key: summary[key] for key in ("rated", "skipped_done", "failed", "seconds")})
    else:
        click.echo(
            f"rated {summary['rated']:,} cells, skipped {summary['skipped_done']:,} already done, "
            f"{summary['failed']:,} failed in {summary['seconds']} s; store {out} has "
            f"{summary['done']:,} of {summary['pairs'] * summary['rules']:,} cells done"
            + (f" (failure reasons in {summary['failures_file']})" if summary["failed"] else "")
        )


@main.command()
@click.option(
    "--pairs", "n_pairs", required=True, type=click.IntRange(min=1), help="Pairs to draw."
)
@click.option(
    "--rules",
    "n_rules",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Rules R.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Rating store directory to create.",
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--relevance-rate", default=0.1, show_default=True, help="Mean per-rule relevance rate μ."
)
@click.option(
    "--relevance-concentration",
    default=2.0,
    show_default=True,
    help="κ of the per-pair relevance Beta.",
)
@click.option("--slope", default=2.0, show_default=True, help="β of g(|d|) = σ(β|d|).")
@click.option(
    "--noise", default=0.25, show_default=True, help="τ: irrelevant rules' discrepancy noise scale."
)
@click.option(
    "--noise-spread",
    default=0.0,
    show_default=True,
    help="Log-normal spread of per-rule noise scales.",
)
@click.option(
    "--duplicates",
    default=0,
    show_default=True,
    help="Rules that duplicate the most relevant ones.",
)
@click.option(
    "--duplicate-noise",
    default=0.05,
    show_default=True,
    help="η: a duplicate's extra discrepancy noise.",
)
@click.option(
    "--position-bias",
    default=0.0,
    show_default=True,
    help="b: added to every discrepancy (favours A).",
)
@click.option("--prior", default=0.5, show_default=True, help="P(A is better).")
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "int8"]),
    default="float32",
    show_default=True,
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def simulate(
    n_pairs,
    n_rules,
    out,
    seed,
    relevance_rate,
    relevance_concentration,
    slope,
    noise,
    noise_spread,
    duplicates,
    duplicate_noise,
    position_bias,
    prior,
    dtype,
    as_json,
):
    """Draw a rating store from the generative model (truth stored as the pair field 'truth')."""
    from dynrules.engine.simulate import SimulationModel
    from dynrules.engine.simulate import simulate as run_simulate

    model = SimulationModel(
        n_rules=n_rules,
        relevance_rate=relevance_rate,
        relevance_concentration=relevance_concentration,
        slope=slope,
        noise=noise,
        noise_spread=noise_spread,
        duplicates=duplicates,
        duplicate_noise=duplicate_noise,
        position_bias=position_bias,
        prior=prior,
    )
    summary = run_simulate(out, n_pairs, model, seed=seed, dtype=dtype)
    print_json(summary) if as_json else click.echo(
        f"simulated {summary['pairs']:,} pairs x {summary['rules']} rules ({summary['a_better']:,} with A better, "
        f"{summary['duplicates']} duplicated rules) into {out} in {summary['seconds']} s"
    )


@main.command("mi")
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option(
    "--truth", required=True, help="Pair field holding the truth: 1 when A is better, 0 when B is."
)
@click.option(
    "--policy",
    type=click.Choice(["adaptive", "all", "random"]),
    default="adaptive",
    show_default=True,
    help="Policy whose label MI is reported.",
)
@click.option("--k", default=5, show_default=True)
@click.option(
    "--criterion",
    type=click.Choice(["additive", "product", "absolute"]),
    default=None,
    help="Adaptive criterion [default: additive with relevance, else absolute].",
)
@click.option("--alpha", default=0.5, show_default=True)
@click.option(
    "--seed", default=0, show_default=True, help="Seed of the random policy and of the resampling."
)
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(min=10))
@click.option(
    "--estimator",
    type=click.Choice(["miller-madow", "plug-in"]),
    default="miller-madow",
    show_default=True,
)
@click.option(
    "--top", default=10, show_default=True, help="Rules shown at the top and at the bottom."
)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def mi_command(
    store_path, truth, policy, k, criterion, alpha, seed, resamples, estimator, top, as_json
):
    """Mutual information between rule votes / a policy's label and the truth, in bits."""
    from dynrules.engine.mi import mi_report

    report = mi_report(
        store_path,
        truth,
        policy=policy,
        k=k,
        criterion=criterion,
        alpha=alpha,
        seed=seed,
        resamples=resamples,
        estimator=estimator,
    )
    if as_json:
        print_json(report)
        return
    rules = report["rules"]
    click.echo(f"{report['pairs']:,} pairs; per-rule I(vote; {truth}) in bits ({estimator}):")
    shown = rules if len(rules) <= 2 * top else rules[:top] + [None] + rules[-top:]
    for rule in shown:
        if rule is None:
            click.echo(f"  … {len(rules) - 2 * top} more …")
            continue
        click.echo(f"  {rule['id']:>24}  {rule['mi_bits']:9.5f}  p = {rule['p_value']:.3g}")
    label = report["label"]
    click.echo(
        f"label of {policy}"
        + (f" ({label['criterion']})" if label["criterion"] else "")
        + f", k = {label['k']}: I = {label['mi_bits']:.4f} bits [{label['ci_low']:.4f}, {label['ci_high']:.4f}]"
        + f", agreement {_or_nan(label['agreement']):.4f}, ties {label['ties']:,}"
    )
    for pair in report["redundant"][:3]:
        click.echo(f"redundant: {pair['a']} ~ {pair['b']} ({pair['redundancy']:.3f})")


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option(
    "--truth", required=True, help="Pair field holding the truth: 1 when A is better, 0 when B is."
)
@click.option(
    "--k", "k_list", default="1,3,5,10", show_default=True, help="ks to compare: 1,3,5,10 or 1-10."
)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Directory for table and plots."
)
@click.option(
    "--policies",
    default=",".join(("adaptive", "zscore", "greedy", "all", "random", "fixed")),
    show_default=True,
    help="Comma-separated policies.",
)
@click.option("--alpha", default=0.5, show_default=True)
@click.option(
    "--discount",
    default=1.0,
    show_default=True,
    help="Greedy policy's redundancy discount in [0, 1].",
)
@click.option("--seed", default=0, show_default=True)
@click.option("--resamples", default=1000, show_default=True, type=click.IntRange(min=10))
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def ablate(store_path, truth, k_list, out, policies, alpha, discount, seed, resamples, as_json):
    """Compare selection policies x k against the truth: Markdown, JSON and PNG plots in --out."""
    from dynrules.engine.ablate import ablate as run_ablate
    from dynrules.engine.ablate import parse_ks, write_report
    from dynrules.engine.mi import open_store

    store = open_store(store_path)
    result = run_ablate(
        store,
        truth,
        parse_ks(k_list, store.n_rules),
        alpha=alpha,
        discount=discount,
        seed=seed,
        resamples=resamples,
        policies=tuple(p.strip() for p in policies.split(",") if p.strip()),
    )
    written = write_report(result, out)
    if as_json:
        print_json({"rows": result["rows"]})
        return
    for row in result["rows"]:
        name = row["policy"] + (f" ({row['criterion']})" if row["criterion"] else "")
        click.echo(
            f"{name:>20} k={row['k']:<4} agreement {_or_nan(row['agreement']):.4f}  "
            f"I = {row['mi_bits']:.4f} [{row['ci_low']:.4f}, {row['ci_high']:.4f}] bits  ties {row['ties']:,}"
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
@click.option("--json", "as_json", is_flag=True)
def bench_mi(n_pairs, n_rules, sklearn_pairs, as_json):
    """Per-rule MI: scikit-learn loop, our counting kernel and the read roofline; interval cost."""
    from dynrules.engine.mi_bench import bench_mi as run

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
@click.argument("overrides", nargs=-1)
@click.option(
    "--out", required=True, type=click.Path(file_okay=False), help="Adapter run directory."
)
@click.option(
    "--k", default=5, show_default=True, help="Size of the oracle's selected set (the targets)."
)
@click.option("--criterion", type=click.Choice(["additive", "product", "absolute"]), default=None)
@click.option(
    "--config", "config_file", type=click.Path(dir_okay=False), help="YAML training config."
)
def train_adapter_command(store_path, overrides, out, k, criterion, config_file):
    """Train the rule adapter on a fully rated STORE (key=value overrides as in train-rm)."""
    from dynrules.engine.select import SelectionConfig
    from dynrules.train.adapter import train_adapter
    from dynrules.train.config import load_config

    config = load_config(config_file, overrides)
    info = train_adapter(
        store_path, out, config, selection=SelectionConfig(k=k, criterion=criterion)
    )
    click.echo(
        f"adapter trained on {info['train_pairs']} pairs, {info['steps']} steps, final BCE "
        f"{info['final_loss']:.4f}; written to {out}"
    )


@main.command("apply-adapter")
@click.argument("run_dir", metavar="RUN", type=click.Path(file_okay=False, exists=True))
@click.argument("pairs_path", metavar="PAIRS", type=click.Path(dir_okay=False))
@click.option("--k", default=5, show_default=True, help="Rules per pair in the plan.")
@click.option(
    "--out",
    required=True,
    type=click.Path(dir_okay=False),
    help="Plan JSONL: {id, rule_ids} per pair.",
)
@click.option("--json", "as_json", is_flag=True)
def apply_adapter_command(run_dir, pairs_path, k, out, as_json):
    """Predict each pair's k critical rules: a plan for `dynrules rate --plan`."""
    from dynrules.engine.pairs import load_pairs
    from dynrules.train.adapter import write_plan

    summary = write_plan(run_dir, load_pairs(pairs_path), k, out)
    print_json(summary) if as_json else click.echo(
        f"plan for {summary['pairs']} pairs x {k} rules written to {out}: {summary['judge_calls']} judge calls "
        f"instead of {summary['judge_calls_full_pool']} ({summary['judge_calls_saved']:.0%} saved)"
    )


@main.command()
@click.argument(
    "pairs_path", metavar="[PAIRS]", required=False, type=click.Path(dir_okay=False, exists=True)
)
@click.option(
    "--out", "out_dir", default="out/pipeline", show_default=True, type=click.Path(file_okay=False)
)
@click.option("--k", default=5, show_default=True)
@click.option(
    "--policy",
    type=click.Choice(["adaptive", "all", "random", "fixed"]),
    default="adaptive",
    show_default=True,
)
@click.option("--criterion", type=click.Choice(["additive", "product", "absolute"]), default=None)
@click.option(
    "--judge", type=click.Choice(["embedded", "openai"]), default="embedded", show_default=True
)
@click.option("--base-url", default=None, help="OpenAI-compatible server (openai judge).")
@click.option("--model", default=None, help="Model name on that server (openai judge).")
@click.option("--api-key-env", default=None, help="Environment variable holding the API key.")
@click.option(
    "--rm-steps", default=60, show_default=True, help="Reward-model training steps (each model)."
)
@click.option("--adapter-steps", default=60, show_default=True, help="Rule-adapter training steps.")
@click.option("--seed", default=0, show_default=True)
def pipeline(
    pairs_path,
    out_dir,
    k,
    policy,
    criterion,
    judge,
    base_url,
    model,
    api_key_env,
    rm_steps,
    adapter_steps,
    seed,
):
    """The main job: rate -> select -> ablate -> adapter -> reward model -> evaluate -> report.

    PAIRS defaults to the embedded PyRIT pairs (real responses, human harm scores).
    """
    from dynrules.train.pipeline import PipelineConfig, run_pipeline

    options = {
        k_: v
        for k_, v in (("base_url", base_url), ("model", model), ("api_key_env", api_key_env))
        if v
    }
    config = PipelineConfig(
        k=k,
        policy=policy,
        criterion=criterion,
        judge=judge,
        judge_options=options,
        rm_steps=rm_steps,
        adapter_steps=adapter_steps,
        seed=seed,
    )
    report = run_pipeline(out_dir, pairs_path, config)
    rm = report["reward_model"]
    if "accuracy" in rm:
        click.echo(
            f"reward model on held-out pairs: {rm['accuracy']:.3f} (rule labels), "
            f"{rm['human_label_accuracy']:.3f} (human labels), {rm['length_baseline']:.3f} (length only)"
        )
    click.echo(f"report: {Path(out_dir).resolve() / 'report.md'}")
    click.echo(str(Path(out_dir).resolve()))


@bench.command("judge")
@click.option(
    "--client-pairs",
    default=400,
    show_default=True,
    help="Pairs rated on every rule by the client.",
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
@click.option("--json", "as_json", is_flag=True)
def bench_judge(client_pairs, embedded_pairs, prefix_pairs, as_json):
    """Judge client ratings/s vs a zero-latency loopback server, prefix sharing, embedded ratings/s."""
    from dynrules.engine.judges.bench import bench_judge as run

    result = run(
        client_pairs=client_pairs, embedded_pairs=embedded_pairs, prefix_pairs=prefix_pairs
    )
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(f"{name:>34}: {value:>12,.4g}")


@bench.command("train")
@click.option("--pairs-per-step", default=8, show_default=True)
@click.option("--max-length", default=128, show_default=True)
@click.option("--seconds", default=20.0, show_default=True, help="Timed seconds per side.")
@click.option("--json", "as_json", is_flag=True)
def bench_train_rm(pairs_per_step, max_length, seconds, as_json):
    """Reward-model training pairs/s: JAX vs the same MiniLM model in PyTorch (same batches)."""
    from dynrules.train.bench import bench_train

    result = bench_train(pairs_per_step=pairs_per_step, max_length=max_length, seconds=seconds)
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(f"{name:>18}: {value:>10.2f} pairs/s")
    click.echo(f"{'jax / torch':>18}: {result['ratios']['jax_over_torch']:.2f}x")


@bench.command("score")
@click.option("--pairs", "n_pairs", default=256, show_default=True)
@click.option("--batch-size", default=64, show_default=True)
@click.option("--max-length", default=256, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def bench_score_rm(n_pairs, batch_size, max_length, as_json):
    """Reward-model scoring pairs/s: JAX vs the same MiniLM model in PyTorch (same batches)."""
    from dynrules.train.bench import bench_score

    result = bench_score(pairs=n_pairs, batch_size=batch_size, max_length=max_length)
    if as_json:
        print_json(result)
        return
    for name, value in result["results"].items():
        click.echo(f"{name:>18}: {value:>10.2f} pairs/s")
    click.echo(f"{'jax / torch':>18}: {result['ratios']['jax_over_torch']:.2f}x")
