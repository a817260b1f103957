"""Command-line options declared once: the configuration tree's flags, and shared options.

The configuration tree (:data:`TREE`) is the one typed source of every setting: its sections
are the :func:`dynrules.settings.section` dataclasses beside the code they configure. A command
that reads sections is decorated with :func:`tree_options`, which adds ``--config FILE`` and one
flag per field (``--top-logprobs``; the field's metadata may name it otherwise, ``--judge`` for
``judge.kind``), with the field's help, its default shown, and ``click.Choice`` for a
``Literal``. A flag's click default is None, so :func:`load_tree` knows which flags were given
and applies them last: defaults < ``--config`` YAML < ``KEY=VALUE`` overrides < flags.
Inputs and outputs (paths, ``--out``, ``--json``, ``--shard``) stay plain click options.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import click

from dynrules.engine.ablate import AblationConfig
from dynrules.engine.judges.config import JudgeConfig
from dynrules.engine.mi import MIConfig
from dynrules.engine.select import SelectionConfig
from dynrules.engine.simulate import SimulationModel
from dynrules.engine.store import DTYPES
from dynrules.pipeline import PipelineConfig
from dynrules.plan import PlanConfig
from dynrules.serve import ServeConfig
from dynrules.settings import Tree, fields, load
from dynrules.train.config import ScoringConfig, TrainConfig, train_tree

# The whole tree: section name → section. A command reads some of them; its YAML file holds
# those sections only (a section the command does not read is refused).
TREE = {
    "judge": JudgeConfig,
    "selection": SelectionConfig,
    "train": TrainConfig,
    "scoring": ScoringConfig,
    "pipeline": PipelineConfig,
    "serve": ServeConfig,
    "simulate": SimulationModel,
    "mi": MIConfig,
    "ablate": AblationConfig,
    "plan": PlanConfig,
}
ALL = None  # every field of a section gets a flag
_PREFIX = "cfg__"


@dataclasses.dataclass(frozen=True)
class CommandTree:
    """A command's sections, which of their fields get flags (ALL or names), and its primary
    section (whose keys may be written bare). ``flags_only``: the command reads only the
    flagged fields of a section named with names (the others are unused keys there).
    ``defaults``: the command's own defaults for fields of a shared section (``Tree.defaults``),
    shown in its flags' help and written by ``dynrules config COMMAND``."""

    command: str
    flags: dict[str, tuple[str, ...] | None]
    primary: str | None = None
    flags_only: bool = False
    defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def tree(self) -> Tree:
        sections = {name: TREE[name] for name in self.flags}
        reads = {}
        if self.flags_only:
            reads = {name: chosen for name, chosen in self.flags.items() if chosen is not ALL}
        if self.primary == "train":
            return dataclasses.replace(
                train_tree(self.command, **{n: c for n, c in sections.items() if n != "train"}),
                known=TREE,
                reads=reads,
                defaults=self.defaults,
            )
        return Tree(
            sections,
            self.primary,
            f"`dynrules {self.command}`",
            known=TREE,
            reads=reads,
            defaults=self.defaults,
        )

    def flagged(self) -> Iterable[tuple[str, str]]:
        """(section, field) of every flag, in declaration order."""
        for name, chosen in self.flags.items():
            for field in fields(TREE[name]):
                if chosen is ALL or field in chosen:
                    yield name, field


def tree_options(spec: CommandTree):
    """Decorator: ``--config FILE`` and the flags of ``spec``'s sections (see the module doc)."""

    def decorate(command):
        seen: dict[str, str] = {}
        for name, field in reversed(list(spec.flagged())):
            info = fields(TREE[name])[field]
            if field in spec.defaults.get(name, {}):
                info = dataclasses.replace(info, default=spec.defaults[name][field])
            flag = "--" + info.flag
            if flag in seen:
                raise AssertionError(f"{spec.command}: {flag} for {name}.{field} and {seen[flag]}")
            seen[flag] = f"{name}.{field}"
            command = _field_option(info, f"{_PREFIX}{name}__{field}", default=None)(command)
        return click.option(
            "--config",
            "config_file",
            type=click.Path(dir_okay=False, exists=True),
            help="YAML file of configuration sections (see docs/configuration.md).",
        )(command)

    return decorate


def _field_option(info, param: str, *, default=dataclasses.MISSING, **extra):
    """A click option for one field; ``default`` None makes it a flag that only says 'given'."""
    shown = info.default
    if isinstance(shown, tuple):
        shown = ",".join(map(str, shown))
    kwargs: dict = {"help": info.help}
    if default is None and shown is not None and shown != "" and shown is not dataclasses.MISSING:
        shown = str(shown).lower() if isinstance(shown, bool) else shown
        kwargs["help"] = f"{info.help}  [default: {shown}]".strip()
    elif default is not None:
        kwargs["show_default"] = shown is not None and shown != ""
    if info.choices:
        kwargs["type"] = click.Choice([str(c) for c in info.choices])
    elif info.kind is tuple:
        kwargs["type"] = str
        kwargs["metavar"] = f"{info.item_type.__name__.upper()},…"
    elif info.kind in (int, float, str):
        kwargs["type"] = info.kind
    if default is dataclasses.MISSING:
        default = ",".join(map(str, info.default)) if info.kind is tuple else info.default
    kwargs.update(default=default, **extra)
    decls = ["--" + info.flag]
    if info.kind is bool:
        decls = [f"--{info.flag}/--no-{info.flag}"]
    return click.option(*decls, param, **kwargs)


def field_option(cls, field: str, **extra):
    """A plain click option (its real default) for one field of a section: for a command that
    takes a setting without reading the whole section (``mi --criterion``)."""
    info = fields(cls)[field]
    return _field_option(info, field, **extra)


def tree_flags(spec: CommandTree, params: dict) -> tuple[str | None, list[tuple[str, object, str]]]:
    """(``--config`` file, the flags given as (dotted key, value, '--flag')), popped from
    ``params``, the command's keyword arguments."""
    config_file = params.pop("config_file", None)
    flags = []
    for key in [k for k in params if k.startswith(_PREFIX)]:
        value = params.pop(key)
        name, field = key.removeprefix(_PREFIX).split("__")
        if value is not None:
            flags.append((f"{name}.{field}", value, "--" + fields(TREE[name])[field].flag))
    return config_file, flags


def load_tree(spec: CommandTree, params: dict, overrides=(), *, base=None) -> dict:
    """The command's sections, section name → instance: defaults < ``base`` < the ``--config``
    YAML < ``overrides`` < the flags given (both popped from ``params``)."""
    config_file, flags = tree_flags(spec, params)
    return load(spec.tree, path=config_file, overrides=[*overrides, *flags], base=base)


def split_overrides(args: tuple[str, ...], inputs: int) -> tuple[list[str], list[str]]:
    """Positional arguments split into up to ``inputs`` inputs (paths) and KEY=VALUE overrides:
    an argument is an override when the part before its first '=' is a dotted name."""
    paths, overrides = [], []
    for arg in args:
        key = arg.partition("=")[0]
        if "=" in arg and all(part.isidentifier() for part in key.split(".")):
            overrides.append(arg)
        else:
            paths.append(arg)
    if len(paths) > inputs:
        raise click.UsageError(f"unexpected argument {paths[inputs]!r} (overrides are KEY=VALUE)")
    return paths, overrides


overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


def json_option(help: str = "Print a machine-readable summary."):
    return click.option("--json", "as_json", is_flag=True, help=help)


def dtype_option(help: str = "Stored dtype of a new store."):
    return click.option(
        "--dtype", type=click.Choice(tuple(DTYPES)), default="float32", show_default=True, help=help
    )


def backbone_option(help: str | None = None):
    """``--backbone`` of the train section (its choices and default), with its own help."""
    return field_option(TrainConfig, "backbone", **({"help": help} if help else {}))


pool_option = click.option(
    "--pool",
    "pool_source",
    default=fields(PipelineConfig)["pool"].default,
    show_default=True,
    help=fields(PipelineConfig)["pool"].help,
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
