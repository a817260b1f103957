"""The `dynrules` command group. Thin: parse, validate, call engine/ or train/, print.

Heavy modules (JAX above all) are imported inside the commands that need them, so
`dynrules --help` and the NumPy-only commands start fast.
"""

from __future__ import annotations

import json
import sys

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
@click.option("--out", required=True, type=click.Path(file_okay=False), help="Rating store directory to create.")
@click.option("--pool", "pool_source", default="default", show_default=True, help="Rule pool: 'default' or a file.")
@click.option("--dtype", type=click.Choice(["float32", "float16", "int8"]), default="float32", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def ingest(input_path, out, pool_source, dtype, as_json):
    """Ingest scored pairs (JSONL or Parquet) into a rating store."""
    from dynrules.engine.ingest import ingest as run_ingest
    from dynrules.engine.pool import load_pool

    summary = run_ingest(input_path, out, pool=load_pool(pool_source), dtype=dtype, progress=not as_json)
    print_json(summary) if as_json else click.echo(
        f"ingested {summary['pairs']} pairs x {summary['rules']} rules ({dtype}) into {out} in {summary['seconds']} s")


@main.command()
@click.argument("store_path", metavar="STORE", type=click.Path(file_okay=False))
@click.option("--k", default=5, show_default=True, help="Rules selected per pair.")
@click.option("--policy", type=click.Choice(["adaptive", "all", "random", "fixed"]), default="adaptive", show_default=True)
@click.option("--criterion", type=click.Choice(["additive", "product", "absolute"]), default=None,
              help="Adaptive criterion [default: additive with relevance, else absolute].")
@click.option("--alpha", default=0.5, show_default=True, help="Weight of |d| in the additive criterion.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random policy.")
@click.option("--rules", default="", help="Comma-separated rule ids for the fixed policy.")
@click.option("--ties", type=click.Choice(["drop", "a", "b"]), default="drop", show_default=True,
              help="Exact ties: leave out, or give to A or to B (the published behaviour).")
@click.option("--shard", default="0/1", callback=lambda c, p, v: _parse_shard(v), help="Process slice I of N.")
@click.option("--pool", "pool_source", default=None, help="Check the store against this rule pool.")
@click.option("--out", type=click.Path(dir_okay=False), help="Labelled pairs JSONL (prompt, chosen, rejected, margin).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def select(store_path, k, policy, criterion, alpha, seed, rules, ties, shard, pool_source, out, as_json):
    """Select rules per pair, label the pairs and write them for reward-model training."""
    from dynrules.engine.pool import load_pool
    from dynrules.engine.select import SelectionConfig, run_selection
    from dynrules.engine.store import RatingStore

    store = RatingStore.open(store_path, pool=load_pool(pool_source) if pool_source else None)
    config = SelectionConfig(policy=policy, k=k, criterion=criterion, alpha=alpha, seed=seed,
                             rules=tuple(r for r in rules.split(",") if r), ties=ties)
    summary = run_selection(store, config, out, shard=shard, progress=not as_json)
    if as_json:
        print_json({key: summary[key] for key in ("pairs", "labelled", "ties", "seconds")})
    else:
        click.echo(f"{summary['pairs']} pairs: {summary['preferred_a']} prefer A, {summary['preferred_b']} prefer B, "
                   f"{summary['ties']} ties; {summary['labelled']} labelled pairs"
                   + (f" written to {out}" if out else "") + f" ({summary['seconds']} s)")


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
        click.echo(f"{name:>18}: {value:>14,.0f} pairs/s")
    for name, value in result["ratios"].items():
        click.echo(f"{name:>36}: {value:.3f}")


@main.command()
@click.option("--pairs", "n_pairs", default=1_000_000, show_default=True)
@click.option("--rules", "n_rules", default=100, show_default=True)
@click.option("--k", default=5, show_default=True)
@click.option("--out", "out_dir", default="out/demo-random", show_default=True, type=click.Path(file_okay=False))
def demo(n_pairs, n_rules, k, out_dir):
    """Ingest -> select -> label on RANDOM ratings: a throughput demonstration, nothing more."""
    from pathlib import Path

    from dynrules.engine.ingest import ingest as run_ingest
    from dynrules.engine.pool import RulePool, load_pool
    from dynrules.engine.select import SelectionConfig, run_selection
    from dynrules.engine.store import RatingStore
    from dynrules.engine.synthetic import write_random_pairs

    click.echo("NOTE: these ratings are uniform random numbers, not judgements of any text; the labels below "
               "only show that the machinery works and how fast it runs.")
    out = Path(out_dir)
    pool = load_pool()
    pool = pool if n_rules == len(pool) else RulePool("random", pool.rules[:n_rules])
    parquet = write_random_pairs(out / "random-pairs.parquet", n_pairs, len(pool))
    ingested = run_ingest(parquet, out / "store", pool=pool)
    click.echo(f"ingest: {ingested['pairs']:,} pairs in {ingested['seconds']} s "
               f"({ingested['pairs'] / ingested['seconds']:,.0f} pairs/s)")
    store = RatingStore.open(out / "store", pool=pool)
    selected = run_selection(store, SelectionConfig(k=k), out / "labelled.jsonl")
    click.echo(f"select+label+write: {selected['pairs']:,} pairs in {selected['seconds']} s "
               f"({selected['pairs'] / selected['seconds']:,.0f} pairs/s)")
    click.echo(f"labels: A preferred {selected['preferred_a']:,}, B preferred {selected['preferred_b']:,}, "
               f"ties {selected['ties']:,}; {selected['labelled']:,} labelled pairs in {out / 'labelled.jsonl'}")


@main.command("train-rm")
@click.argument("pairs", type=click.Path(dir_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Run directory; an existing run resumes from its last checkpoint.")
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="YAML file of config keys.")
@click.option("--distributed", is_flag=True, help="Call jax.distributed.initialize() first (multi-host).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
@click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")
def train_rm(pairs, out_dir, config_file, distributed, as_json, overrides):
    """Train a Bradley-Terry reward model on preference pairs (JSONL/Parquet, HH transcripts too)."""
    from dynrules.train.trainer import resolve_config, train_reward_model

    config = resolve_config(out_dir, config_file, overrides + (("distributed=true",) if distributed else ()))
    result = train_reward_model(pairs, out_dir, config, progress=not as_json)
    summary = {"run": str(result.run_dir), "model": str(result.model_dir), "steps": result.steps,
               "resumed_from": result.resumed_from, "train": result.train, "eval": result.eval,
               "truncated": result.truncated}
    if as_json:
        print_json(summary)
    else:
        accuracy = f", held-out accuracy {result.eval['accuracy']:.3f}" if result.eval else ""
        click.echo(f"trained {result.steps} steps{accuracy}; model in {result.model_dir}; "
                   f"truncated texts: {result.truncated['train']} train, {result.truncated['eval']} eval")


@main.command()
@click.argument("run", type=click.Path(exists=True, file_okay=False))
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False), help="Scored JSONL to write.")
@click.option("--batch-size", default=64, show_default=True)
@click.option("--mesh", default="", help="Device mesh, e.g. data=8 (default: all devices on data).")
@click.option("--json", "as_json", is_flag=True, help="Print a machine-readable summary.")
def score(run, input_path, out_path, batch_size, mesh, as_json):
    """Add a "reward" to every prompt/response (or text) record of INPUT with RUN's reward model."""
    from dynrules.train.scoring import score_file

    summary = score_file(run, input_path, out_path, batch_size=batch_size, mesh=mesh)
    print_json(summary) if as_json else click.echo(
        f"scored {summary['records']} records into {out_path} in {summary['seconds']:.1f} s "
        f"({summary['truncated']} texts truncated)")


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
        print_json({key: report[key] for key in ("pairs", "accuracy", "length_baseline", "reward_mean",
                                                 "reward_std", "subsets", "sections")})
        return
    click.echo(f"{report['pairs']} pairs: accuracy {report['accuracy']:.4f} (length-only baseline "
               f"{report['length_baseline']:.4f}); reward mean {report['reward_mean']:.4f} std {report['reward_std']:.4f}; "
               f"{report['truncated']} texts truncated")
    for kind in ("subsets", "sections"):
        for name, value in report[kind].items():
            click.echo(f"  {kind[:-1]} {name}: {value:.4f}")
