"""Command-line options declared once: shared option decorators and options made from config fields.

A config dataclass (SelectionConfig, SimulationModel, PipelineConfig) is the one typed source
of its command's options, the way TRL builds its parser from dataclasses: each field becomes
``--field-name`` with the field's default, and its metadata gives the help, the choices and,
where the flag differs from the field name, the flag (``{"flag": "rules"}``). Tuple fields are
given comma-separated. Choices come from the library's own constants, never from literal lists.
"""

from __future__ import annotations

import dataclasses
import typing

import click

from dynrules.engine.mi import ESTIMATORS
from dynrules.engine.store import DTYPES
from dynrules.kernels.selection import CRITERIA
from dynrules.train.config import BACKBONES


def json_option(help: str = "Print a machine-readable summary."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def dtype_option(help: str = "Stored dtype of a new store."):
    return click.option(
        "--dtype", type=click.Choice(tuple(DTYPES)), default="float32", show_default=True, help=help
    )


def backbone_option(
    help: str = "Reward-model backbone: MiniLM (encoder) or SmolLM2-135M (decoder).",
):
    return click.option(
        "--backbone",
        type=click.Choice(BACKBONES),
        default=BACKBONES[0],
        show_default=True,
        help=help,
    )


mesh_option = click.option(
    "--mesh", default="", help="Device mesh, e.g. data=8 (default: all devices on data)."
)
distributed_option = click.option(
    "--distributed",
    is_flag=True,
    help="Join a multi-process job (TPU pod, SLURM, MPI; `dynrules launch` sets it up locally).",
)
criterion_option = click.option(
    "--criterion",
    type=click.Choice(tuple(CRITERIA)),
    default=None,
    help="Adaptive criterion [default: additive with relevance, else absolute].",
)
estimator_option = click.option(
    "--estimator", type=click.Choice(ESTIMATORS), default=ESTIMATORS[0], show_default=True
)
pool_option = click.option(
    "--pool",
    "pool_source",
    default="default",
    show_default=True,
    help="Rule pool: 'default' or a file.",
)


def _parse_shard(ctx, param, value: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"expected I/N, got {value!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise click.BadParameter(f"need 0 <= I < N, got {value!r}")
    return i, n


def shard_option(help: str):
    """``--shard I/N`` (default 0/1: everything), parsed to (I, N)."""
    return click.option(
        "--shard", default="0/1", show_default=True, callback=_parse_shard, help=help
    )


def _split_commas(item_type):
    def parse(ctx, param, value):
        if isinstance(value, tuple):
            return value
        try:
            return tuple(item_type(part.strip()) for part in value.split(",") if part.strip())
        except ValueError:
            raise click.BadParameter(f"expected comma-separated {item_type.__name__}s") from None

    return parse


def config_options(cls, *, skip: tuple[str, ...] = ()):
    """Decorator: one option per field of the dataclass ``cls`` (see the module doc)."""
    hints = typing.get_type_hints(cls)

    def decorate(command):
        for field in reversed(dataclasses.fields(cls)):
            if field.name in skip or "help" not in field.metadata:
                continue
            meta, default = field.metadata, field.default
            flag = "--" + meta.get("flag", field.name).replace("_", "-")
            kwargs = {"help": meta["help"], "default": default, "show_default": default is not None}
            if "choices" in meta:
                kwargs["type"] = click.Choice(meta["choices"])
            elif isinstance(default, tuple):
                item_type = typing.get_args(hints[field.name])[0]
                kwargs.update(
                    default=",".join(map(str, default)), type=str, callback=_split_commas(item_type)
                )
                kwargs["show_default"] = bool(default)
            elif default is not None:
                kwargs["type"] = type(default)
            command = click.option(flag, field.name, **kwargs)(command)
        return command

    return decorate


def config_from(cls, values: dict):
    """An instance of ``cls`` from the command's keyword arguments (its own fields only)."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{name: value for name, value in values.items() if name in names})
