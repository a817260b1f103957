"""Typed configuration: every setting declared once, every command loading it the same way.

A *section* is a dataclass made by :func:`section` (judge, selection, train, scoring, pipeline,
serve, simulate, mi, ablate, plan; each lives beside the code it configures). Each field is
declared once, with

- its type: ``int``, ``float``, ``bool``, ``str``, ``X | None``, ``tuple[X, ...]``, or a
  ``Literal`` type the library names (``Policy = Literal["adaptive", "all", ...]``; its values
  are ``typing.get_args(Policy)``), so a choice is a type;
- its default, which is the library's default too (the CLI never restates it);
- its help, in ``option(default, help)``; the metadata may add the flag's name (``flag=``) and,
  for a setting that applies to some variants only, ``applies=(field, values)``.

:func:`load` builds a command's sections, lowest precedence first, from

1. the defaults (then ``base``, e.g. the saved config of a run being resumed),
2. a YAML file (``--config FILE``): a mapping of sections (``judge: {top_logprobs: 20}``); the
   command's *primary* section may also be written bare (``steps: 2000`` for ``train-rm``),
3. dotted ``key=value`` overrides (``judge.top_logprobs=20``; bare keys again for the primary
   section),
4. the command-line flags generated from the fields (``cliopts.tree_options``).

An unknown key, a key of a section the command does not read, a setting given, other than its
default, for a variant it does not apply to (``judge.top_logprobs=5`` with the embedded judge),
and one, other than its default, outside the fields a command reads of a section
(``Tree.reads``: ``selection.k=3`` for ``ablate``) are errors that name the key and where it
came from (the file and line, the override, or the flag); so is a value of the wrong type or
outside its choices (``train.remat must be one of none, full, dots, got 'some'``).

Why pydantic 2 (its dataclasses): validation of ``Literal`` choices, numbers, optionals and
nested sections, lax conversion of the strings that overrides and flags give, and unknown keys
refused (``extra="forbid"``), from one well-kept, already-installed library; and its dataclasses
are still standard dataclasses (``dataclasses.fields``, ``asdict`` and ``replace`` work), so
the code that reads a config, and a run's saved ``run.json``, do not change. OmegaConf would add
merging we do not need and checks ``Literal`` only through structured configs of its own; tyro
and draccus would own the command line, which stays click's (``launch``, ``bench``, and
positional inputs); extending the earlier dataclass-to-flags code meant writing validation by hand.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import re
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import pydantic
import pydantic.dataclasses
import yaml

from dynrules.errors import DynrulesError

_SECTION_CONFIG = pydantic.ConfigDict(extra="forbid")
_MISSING = dataclasses.MISSING


class ConfigError(DynrulesError):
    """A configuration key or value that cannot be used; the message names the key and its source."""


def option(
    default: Any = _MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    default_factory: Any = _MISSING,
    applies: tuple[str, tuple[str, ...]] | None = None,
) -> Any:
    """A section field: its default, help and, where it differs from the field, its flag name.

    ``applies=("kind", ("openai",))``: the setting is used only when field ``kind`` is one of
    those values; giving it otherwise is an error (an unused key)."""
    metadata: dict[str, Any] = {"help": help}
    if flag is not None:
        metadata["flag"] = flag
    if applies is not None:
        metadata["applies"] = applies
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_T = typing.TypeVar("_T")


@typing.overload
def section(cls: type[_T], /) -> type[_T]: ...


@typing.overload
def section(*, frozen: bool = False) -> Callable[[type[_T]], type[_T]]: ...


# ``option`` is not among the field specifiers: type checkers read a specifier's default only
# from a ``default=`` keyword, and ``option`` takes it positionally, so they would call every
# field required. Left out, ``x: int = option(3, "...")`` is a field with a default (each
# ``option`` has one, or a ``default_factory``), which is what it is.
@typing.dataclass_transform(field_specifiers=(dataclasses.field,))
def section(
    cls: type[_T] | None = None, /, *, frozen: bool = False
) -> type[_T] | Callable[[type[_T]], type[_T]]:
    """Class decorator: a pydantic dataclass that refuses unknown keys, and whose validation
    errors are :class:`ConfigError` naming the field (``SelectionConfig(policy="x")``)."""

    def make(cls: type[_T]) -> type[_T]:
        made = pydantic.dataclasses.dataclass(cls, frozen=frozen, config=_SECTION_CONFIG)
        init = made.__init__

        @functools.wraps(init)
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            try:
                init(self, *args, **kwargs)
            except pydantic.ValidationError as exc:
                raise ConfigError(_describe(exc, made, name=None, origins={})) from None

        setattr(made, "__init__", __init__)  # noqa: B010 (mypy refuses assigning a method)
        return typing.cast(type[_T], made)  # the class, made a pydantic dataclass

    return make if cls is None else make(cls)


def mesh_text(value):
    """A mesh given as a YAML mapping ({data: 4, fsdp: 2}) as its text form "data=4,fsdp=2"."""
    if isinstance(value, Mapping):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return value


MeshText = typing.Annotated[str, pydantic.BeforeValidator(mesh_text)]


# ------------------------------------------------------------------ reading a section's fields


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    """One field of a section: what the loader, the flag maker and the docs need."""

    name: str
    annotation: Any  # with Annotated metadata removed
    default: Any  # dataclasses.MISSING when it has a factory only
    help: str
    flag: str
    applies: tuple[str, tuple[str, ...]] | None

    @property
    def choices(self) -> tuple | None:
        return literal_choices(self.annotation)

    @property
    def optional(self) -> bool:
        return _is_optional(self.annotation)

    @property
    def kind(self) -> type:
        """The scalar type a flag parses: int, float, bool, str or tuple."""
        inner = _strip_optional(self.annotation)
        if typing.get_origin(inner) is typing.Literal:
            return type(typing.get_args(inner)[0])
        if typing.get_origin(inner) is tuple:
            return tuple
        return inner if isinstance(inner, type) else str

    @property
    def item_type(self) -> type:
        """The item type of a tuple field (that of its choices for a tuple of a ``Literal``)."""
        args = typing.get_args(_strip_optional(self.annotation))
        item = args[0] if args else str
        if typing.get_origin(item) is typing.Literal:
            return type(typing.get_args(item)[0])
        return item if isinstance(item, type) else str

    @property
    def item_choices(self) -> tuple | None:
        """The choices of each item of a tuple field (``tuple[Policy, ...]``)."""
        args = typing.get_args(_strip_optional(self.annotation))
        return literal_choices(args[0]) if self.kind is tuple and args else None


def is_section(tp) -> bool:
    return isinstance(tp, type) and pydantic.dataclasses.is_pydantic_dataclass(tp)


@functools.cache
def fields(cls) -> dict[str, FieldInfo]:
    """The settable fields of section ``cls``, in order (nested sections are not among them:
    they are filled from their own top-level section, see :func:`load`)."""
    out = {}
    for field in dataclasses.fields(cls):
        annotation = cls.__pydantic_fields__[field.name].annotation
        if is_section(annotation):
            continue
        default = field.default
        if default is _MISSING and field.default_factory is not _MISSING:
            default = field.default_factory()
        meta = field.metadata
        out[field.name] = FieldInfo(
            name=field.name,
            annotation=annotation,
            default=default,
            help=meta.get("help", ""),
            flag=meta.get("flag", field.name).replace("_", "-"),
            applies=meta.get("applies"),
        )
    return out


def linked_sections(cls) -> dict[str, type]:
    """Fields of ``cls`` that are whole sections (PipelineConfig.judge): field name → class."""
    return {
        f.name: cls.__pydantic_fields__[f.name].annotation
        for f in dataclasses.fields(cls)
        if is_section(cls.__pydantic_fields__[f.name].annotation)
    }


def literal_choices(annotation) -> tuple | None:
    inner = _strip_optional(annotation)
    if typing.get_origin(inner) is typing.Literal:
        return typing.get_args(inner)
    return None


def _strip_optional(annotation):
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _strip_optional(args[0])
    return annotation


def _is_optional(annotation) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(
        None
    ) in typing.get_args(annotation)


# ------------------------------------------------------------------------------ the loader


@dataclasses.dataclass(frozen=True)
class Tree:
    """What a command reads: its sections (top-level name → class), the section whose keys may
    be written bare, the command's name for messages, and every section of the whole tree (so
    that a key of a section this command does not read is called unused, not unknown)."""

    sections: dict[str, type]
    primary: str | None = None
    command: str = "this command"
    known: dict[str, type] = dataclasses.field(default_factory=dict)
    aliases: dict[str, str] = dataclasses.field(
        default_factory=dict
    )  # "optim.steps": "train.steps"
    # Sections the command reads only some fields of: section → those fields. Another field of
    # such a section, given other than its default, is an unused key (``ablate`` reads
    # ``selection.alpha``, so ``selection.k=3`` is an error there).
    reads: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
    # The command's own defaults for fields of a section it shares (``plan`` compiles in
    # bfloat16 with full remat: ``{"train": {"dtype": "bfloat16", "remat": "full"}}``); they
    # take the fields' defaults' place, below ``base``, in its flags' help and its config file.
    defaults: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def groups(self) -> set[str]:
        """Prefixes of the aliases (``optim``): a YAML mapping under one is walked like a section."""
        return {alias.split(".")[0] for alias in self.aliases}


@dataclasses.dataclass
class _Given:
    value: Any
    origin: str  # "FILE line N", "override 'k=v'", "--flag"
    spelled: str  # the key as the user wrote it


Override = str | tuple[str, Any, str]  # "key=value", or (key, value, origin) from a flag


def load(
    tree: Tree,
    *,
    path: str | Path | None = None,
    overrides: Iterable[Override] = (),
    base: Mapping[str, Mapping] | None = None,
) -> dict[str, Any]:
    """Every section of ``tree``: defaults < ``base`` < YAML file < overrides (in order; flags
    come last as (key, value, origin) items). ``base`` maps a section name to saved values (a
    resumed run's config, with its flat keys); ``tree.aliases`` maps other spellings of a key
    (a group prefix, an old name) to its dotted place in the tree."""
    given: dict[tuple[str, str], _Given] = {}
    if path is not None:
        data, lines = _read_yaml(path)
        for keys, value in _flatten(tree, data):
            origin = f"{path} line {lines.get(keys, '?')}"
            _assign(tree, keys, value, origin, given, tree.aliases)
    for item in overrides:
        if isinstance(item, tuple):
            key, value, origin = item
        else:
            key, sep, value = item.partition("=")
            key, value, origin = key.strip(), value.strip(), f"override {item!r}"
            if not sep or not key:
                raise ConfigError(f"override {item!r}: expected key=value")
        _assign(tree, tuple(key.split(".")), value, origin, given, tree.aliases)

    built: dict[str, Any] = {}
    for name, cls in tree.sections.items():
        values = {**tree.defaults.get(name, {}), **((base or {}).get(name) or {})}
        _check_base(tree, name, cls, values)
        origins = {}
        for (section_name, field), setting in given.items():
            if section_name == name:
                values[field] = _from_text(fields(cls)[field], setting.value)
                origins[field] = setting
        try:
            built[name] = pydantic.TypeAdapter(cls).validate_python(values)
        except pydantic.ValidationError as exc:
            raise ConfigError(_describe(exc, cls, name=name, origins=origins)) from None
        _check_applies(name, cls, built[name], origins)
        _check_reads(tree, name, cls, built[name], origins)
    for name, instance in list(built.items()):
        links = {
            field: built[field]
            for field in linked_sections(type(instance))
            if field in built and getattr(instance, field) != built[field]
        }
        if links:
            built[name] = dataclasses.replace(instance, **links)
    return built


def _check_base(tree: Tree, name: str, cls, values: dict) -> None:
    unknown = sorted(set(values) - set(fields(cls)) - set(linked_sections(cls)))
    if unknown:
        raise ConfigError(f"saved {name} config: unknown key {unknown[0]!r}")


def _read_yaml(path) -> tuple[Any, dict[tuple[str, ...], int]]:
    """The file's data and, for keys up to two levels deep, the line each is on (1-based)."""
    try:
        text = Path(path).read_text()
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from exc
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    lines: dict[tuple[str, ...], int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            lines[(key_node.value,)] = key_node.start_mark.line + 1
            if isinstance(value_node, yaml.MappingNode):
                for sub_key, _ in value_node.value:
                    lines[(key_node.value, sub_key.value)] = sub_key.start_mark.line + 1
    return data, lines


def _flatten(tree: Tree, data: dict) -> Iterable[tuple[tuple[str, ...], Any]]:
    """(key path, value) of a YAML mapping: a section's mapping is walked one level down; a field
    of the primary section (even one whose value is a mapping, like a mesh) is kept whole."""
    primary = fields(tree.sections[tree.primary]) if tree.primary else {}
    for key, value in data.items():
        key = str(key)
        walk = key in _all_sections(tree) or key in tree.groups
        if isinstance(value, dict) and walk and (key not in primary or key in tree.groups):
            for sub_key, sub_value in value.items():
                yield (key, str(sub_key)), sub_value
        else:
            yield (key,), value


def _all_sections(tree: Tree) -> dict[str, type]:
    return {**tree.known, **tree.sections}


def _assign(tree: Tree, keys, value, origin: str, given: dict, aliases: dict) -> None:
    spelled = ".".join(keys)
    if spelled in aliases:
        keys = tuple(aliases[spelled].split("."))
    if len(keys) == 1 and tree.primary and keys[0] in fields(tree.sections[tree.primary]):
        keys = (tree.primary, keys[0])
    if len(keys) == 2 and keys[0] in tree.sections:
        name, field = keys
        if field in fields(tree.sections[name]):
            given[(name, field)] = _Given(value, origin, spelled)
            return
        raise ConfigError(
            f"{origin}: unknown key {spelled!r}"
            + _suggest(field, fields(tree.sections[name]), f"{name}.")
        )
    if keys[0] in tree.known and keys[0] not in tree.sections:
        reads = ", ".join(tree.sections)
        raise ConfigError(
            f"{origin}: key {spelled!r} is not used by {tree.command} (it reads: {reads})"
        )
    if len(keys) == 1 and keys[0] in tree.sections:
        raise ConfigError(f"{origin}: {spelled!r} is a section; give its keys ({spelled}.KEY)")
    valid = [f"{n}.{f}" for n, cls in tree.sections.items() for f in fields(cls)]
    if tree.primary:
        valid = list(fields(tree.sections[tree.primary])) + valid
    raise ConfigError(f"{origin}: unknown key {spelled!r}" + _suggest(spelled, valid, ""))


def _suggest(key: str, valid: Iterable[str], prefix: str) -> str:
    valid = [prefix + v for v in valid]
    close = difflib.get_close_matches(prefix + key, valid, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} Valid keys: {', '.join(valid)}"


_NULL_WORDS = ("null", "none", "~")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _from_text(info: FieldInfo, value):
    """A value given as text (override, flag, YAML string) in the form the field's type takes:
    null words for optional fields, comma-separated tuples, integers written 1e3. A plain
    ``str`` field whose default is ``""`` (unset) takes null (YAML ``~``, ``null``; the null
    words) as that default."""
    unset_str = info.annotation is str and info.default == ""
    if value is None and unset_str:
        return ""
    if not isinstance(value, str):
        return value
    text = value.strip()
    choices = info.choices or ()
    if info.optional and text.lower() in _NULL_WORDS and text.lower() not in choices:
        return None
    if unset_str and text.lower() in _NULL_WORDS:
        return ""
    if info.kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if info.kind is int and _NUMBER.fullmatch(text) and not text.lstrip("+-").isdigit():
        number = float(text)
        return int(number) if number.is_integer() else text
    return text


def _describe(exc: pydantic.ValidationError, cls, *, name: str | None, origins: dict) -> str:
    """One line for the first error: where the value came from, the key, what was wrong."""
    error = exc.errors(include_url=False)[0]
    loc = [str(part) for part in error["loc"]]
    field = loc[0] if loc else ""
    item = origins.get(field)
    key = item.spelled if item else (f"{name}.{field}" if name else field)
    where = f"{item.origin}: " if item else (f"{name}: " if name and not field else "")
    value = error.get("input")
    info = fields(cls).get(field)
    kind = error["type"]
    if kind == "literal_error" and info is not None and info.choices:
        choices = ", ".join(str(c) for c in info.choices)
        return f"{where}{key} must be one of {choices}, got {value!r}"
    if kind == "literal_error" and info is not None and info.item_choices:
        choices = ", ".join(str(c) for c in info.item_choices)
        return f"{where}{key}: each item must be one of {choices}, got {value!r}"
    if kind == "unexpected_keyword_argument":
        return f"{where}unknown key {key!r}" + _suggest(field, fields(cls), "")
    if kind.startswith(("int_", "float_", "bool_", "string_")) and info is not None:
        type_name = {"int": "int", "float": "float", "bool": "true or false", "string": "str"}
        return f"{where}{key} must be {type_name[kind.split('_')[0]]}, got {value!r}"
    message = error["msg"]
    if kind == "value_error":
        message = message.removeprefix("Value error, ")
    return f"{where}{key}: {message[0].lower() + message[1:]}, got {value!r}"


def _check_applies(name: str, cls, instance, origins: dict) -> None:
    for field, item in origins.items():
        applies = fields(cls)[field].applies
        if applies is None or getattr(instance, field) == fields(cls)[field].default:
            continue  # a setting at its default changes nothing, wherever it is given
        selector, values = applies
        current = getattr(instance, selector)
        if current not in values:
            raise ConfigError(
                f"{item.origin}: {item.spelled} applies to {name}.{selector} "
                f"{' or '.join(values)}, not {current!r}"
            )


def _check_reads(tree: Tree, name: str, cls, instance, origins: dict) -> None:
    if name not in tree.reads:
        return
    for field, item in origins.items():
        if field in tree.reads[name] or getattr(instance, field) == fields(cls)[field].default:
            continue
        reads = ", ".join(f"{name}.{f}" for f in tree.reads[name])
        raise ConfigError(
            f"{item.origin}: key {item.spelled!r} is not used by {tree.command} "
            f"(of {name} it reads {reads})"
        )


def to_dict(instance) -> dict:
    """A section's values as plain data (tuples as lists), e.g. for a YAML file or a report."""
    return json_ready(dataclasses.asdict(instance))


def json_ready(value):
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


# ------------------------------------------------------------------------- documentation


def _type_text(info: FieldInfo) -> str:
    if info.choices:
        text = " \\| ".join(f"`{c}`" for c in info.choices)
    elif info.item_choices:
        text = "list of " + " \\| ".join(f"`{c}`" for c in info.item_choices)
    elif info.kind is tuple:
        text = f"list of {info.item_type.__name__}"
    else:
        text = info.kind.__name__
    return text + (" or null" if info.optional else "")


def _default_text(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "(none)"
    return '""' if value == "" else str(value)


def _with_defaults(cls, defaults: Mapping[str, Any]) -> Iterable[FieldInfo]:
    """The fields of ``cls``, their defaults replaced by a command's own (``Tree.defaults``)."""
    for info in fields(cls).values():
        if info.name in defaults:
            info = dataclasses.replace(info, default=defaults[info.name])
        yield info


def reference_markdown(
    tree: Mapping[str, type], defaults: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """One table per section: key, flag, type (choices), default, help. docs/configuration.md
    holds this text between its markers; `dynrules config --markdown` prints it. ``defaults``:
    a command's own (``Tree.defaults``), shown in place of the fields'."""
    out = []
    for name, cls in tree.items():
        doc = (cls.__doc__ or "").strip().splitlines()[0]
        out += [f"### `{name}`", "", doc, "", "| key | flag | type | default | meaning |"]
        out.append("|---|---|---|---|---|")
        for info in _with_defaults(cls, (defaults or {}).get(name, {})):
            help_text = info.help.replace("|", "\\|")
            out.append(
                f"| `{info.name}` | `--{info.flag}` | {_type_text(info)} | "
                f"`{_default_text(info.default)}` | {help_text} |"
            )
        out.append("")
    return "\n".join(out)


def defaults_yaml(
    tree: Mapping[str, type], defaults: Mapping[str, Mapping[str, Any]] | None = None
) -> str:
    """Every section at its defaults (a command's own, ``defaults``, where it has them) as a YAML
    file for ``--config``, each key's help a comment."""
    lines = []
    for name, cls in tree.items():
        lines.append(f"{name}:")
        for info in _with_defaults(cls, (defaults or {}).get(name, {})):
            value = json_ready(info.default)
            text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")
            text = text.removesuffix("...").strip()
            lines.append(f"  {info.name}: {text}  # {info.help}".rstrip(" #"))
    return "\n".join(lines) + "\n"
