"""Rule pools: the ordered list of safety rules that ratings, selection and the adapter index.

A pool's identity is its ``content_hash``: SHA-256 over the ordered (id, text, polarity)
triples. Rating stores and checkpoints record it, so ratings made against one pool are never
read against another. The pool name and categories are labels only and do not change the hash;
reordering, renaming or rewording a rule does, and so does flipping its polarity (a judge scores
helpfulness rules the other way).

Sources accepted by :func:`load_pool`:

- ``None`` or ``"default"``: the packaged 100-rule pool (``engine/data/default_pool.yaml``);
- ``.yaml`` / ``.yml`` / ``.json``: a mapping with a ``rules`` list (and optional ``name``) or
  a bare list; each rule is ``{id, text, category?, polarity?}``;
- anything else: plain text, one rule per non-empty line, ``#`` starts a comment line, ids
  ``rule_001``, ``rule_002``, … by position.

Rule text is stripped and internal whitespace collapsed to single spaces, so re-wrapping a
YAML file does not change the hash.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from dynrules.errors import InputError

POLARITIES = ("harm", "helpfulness")
DEFAULT_RESOURCE = "data/default_pool.yaml"


@dataclass(frozen=True)
class Rule:
    id: str
    category: str
    text: str
    polarity: str = "harm"


@dataclass(frozen=True)
class RulePool:
    name: str
    rules: tuple[Rule, ...]

    def __len__(self) -> int:
        return len(self.rules)

    def __iter__(self):
        return iter(self.rules)

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(r.id for r in self.rules)

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(r.text for r in self.rules)

    @property
    def categories(self) -> tuple[str, ...]:
        return tuple(r.category for r in self.rules)

    @functools.cached_property
    def _index(self) -> dict[str, int]:
        return {r.id: i for i, r in enumerate(self.rules)}

    def index_of(self, rule_id: str) -> int:
        try:
            return self._index[rule_id]
        except KeyError:
            raise KeyError(f"rule id {rule_id!r} is not in pool {self.name!r}") from None

    @functools.cached_property
    def content_hash(self) -> str:
        canon = json.dumps(
            [[r.id, r.text, r.polarity] for r in self.rules],
            ensure_ascii=False,
            separators=(",", ":"),
        )
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def to_dict(self) -> dict:
        return {"name": self.name, "hash": self.content_hash, "ids": list(self.ids)}


def load_pool(source: str | os.PathLike | None = None) -> RulePool:
    """Load and validate a rule pool (see the module docstring for accepted sources)."""
    if source is None or (isinstance(source, str) and source == "default"):
        return _default_pool()
    path = Path(source)
    if not path.is_file():
        raise InputError("rule pool file not found", path=path)
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read rule pool: {e}", path=path) from None
    return _parse(raw, path, path.suffix.lower())


@functools.lru_cache(maxsize=1)
def _default_pool() -> RulePool:
    raw = resources.files("dynrules.engine").joinpath(DEFAULT_RESOURCE).read_text(encoding="utf-8")
    return _parse(raw, DEFAULT_RESOURCE, ".yaml")


def _parse(raw: str, path, suffix: str) -> RulePool:
    name = Path(str(path)).stem
    if suffix in (".yaml", ".yml", ".json"):
        try:
            data = json.loads(raw) if suffix == ".json" else yaml.safe_load(raw)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise InputError(f"cannot parse rule pool: {e}", path=path) from None
        if isinstance(data, dict):
            name = str(data.get("name") or name)
            data = data.get("rules")
        if data is None:
            raise InputError("empty rule pool (no 'rules' list)", path=path)
        if not isinstance(data, list):
            raise InputError("expected a 'rules' list or a bare list of rules", path=path)
        entries: list[tuple[str, int | None, Any]] = [
            (f"rule {i}", None, e) for i, e in enumerate(data, 1)
        ]
    else:
        entries, n = [], 0
        for lineno, line in enumerate(raw.splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                n += 1
                entries.append((f"line {lineno}", lineno, {"id": f"rule_{n:03d}", "text": line}))
    if not entries:
        raise InputError("empty rule pool: no rules found", path=path)
    return RulePool(name, tuple(_validate(entries, path)))


def _validate(entries, path) -> list[Rule]:
    rules: list[Rule] = []
    seen_ids: dict[str, str] = {}
    seen_texts: dict[str, str] = {}
    for where, line, e in entries:
        if not isinstance(e, dict):
            _fail(
                path,
                where,
                line,
                f"expected a mapping with 'id' and 'text', got {type(e).__name__}",
            )
        rid = e.get("id")
        if rid is None or not str(rid).strip():
            _fail(path, where, line, "rule has no id", "id")
        rid = str(rid).strip()
        if line is None:
            where = f"{where} (id {rid!r})"
        text = e.get("text")
        if not isinstance(text, str) or not text.strip():
            msg = "rule has no text" if text is None else "rule text is empty or not a string"
            _fail(path, where, line, msg, "text")
        text = " ".join(text.split())
        polarity = str(e.get("polarity", "harm"))
        if polarity not in POLARITIES:
            _fail(
                path,
                where,
                line,
                f"unknown polarity {polarity!r} (expected one of: {', '.join(POLARITIES)})",
                "polarity",
            )
        if rid in seen_ids:
            _fail(path, where, line, f"duplicate id {rid!r} (first used at {seen_ids[rid]})", "id")
        key = text.casefold()
        if key in seen_texts:
            _fail(path, where, line, f"duplicate text: same rule text as {seen_texts[key]}", "text")
        seen_ids[rid] = seen_texts[key] = where
        rules.append(Rule(rid, str(e.get("category") or "custom"), text, polarity))
    return rules


def _fail(path, where: str, line: int | None, msg: str, field: str | None = None):
    raise InputError(f"{where}: {msg}", path=path, line=line, field=field)
