"""Preference pairs and scoring records in, one documented text template out.

Accepted pair records (JSONL, JSONL.gz or Parquet; or a list of dicts from Python):

- ``{"prompt", "chosen", "rejected"}`` plus optional ``margin``, ``id``, ``subset``,
  ``section`` (what ``dynrules select`` writes, with its ``rule_ids`` ignored);
- Anthropic HH transcripts ``{"chosen", "rejected"}``: full "\\n\\nHuman: …\\n\\nAssistant: …"
  strings with no separate prompt.

Texts are rendered by the model's renderer: :func:`dynrules.models.templates.format_text`
(template ``hh-v1``, the default) or a decoder's chat template.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable
from pathlib import Path

from dynrules.engine.pairs import iter_raw_records
from dynrules.errors import InputError
from dynrules.models.templates import format_text


@dataclasses.dataclass(frozen=True)
class Pair:
    """One preference pair; ``chosen``/``rejected`` are responses (or whole transcripts)."""

    chosen: str
    rejected: str
    prompt: str = ""
    margin: float = 0.0
    id: str | None = None
    subset: str | None = None
    section: str | None = None

    def texts(self, render=format_text) -> tuple[str, str]:
        """(chosen text, rejected text) as ``render(prompt, response)`` makes them."""
        return render(self.prompt, self.chosen), render(self.prompt, self.rejected)


def _text_field(record: dict, name: str, where: dict, *, required: bool) -> str:
    value = record.get(name)
    if value is None:
        if required:
            raise InputError("missing field", field=name, **where)
        return ""
    if not isinstance(value, str):
        raise InputError(f"expected a string, got {type(value).__name__}", field=name, **where)
    return value


def pair_from_record(record: dict, *, path=None, line: int | None = None) -> Pair:
    where = {"path": path, "line": line}
    chosen = _text_field(record, "chosen", where, required=True)
    rejected = _text_field(record, "rejected", where, required=True)
    margin = record.get("margin", 0.0)
    if margin is None:
        margin = 0.0
    if isinstance(margin, bool) or not isinstance(margin, int | float):
        raise InputError(f"expected a number, got {margin!r}", field="margin", **where)
    optional = {}
    for name in ("id", "subset", "section"):
        value = record.get(name)
        optional[name] = None if value is None else str(value)
    return Pair(
        chosen=chosen,
        rejected=rejected,
        prompt=_text_field(record, "prompt", where, required=False),
        margin=float(margin),
        **optional,
    )


def keeps_margin(margin: float, min_margin: float) -> bool:
    """Whether training keeps a pair with this rule margin under ``min_margin`` (train config):
    no margin (a certain label) or one at least that large either way."""
    return margin == 0 or abs(margin) >= min_margin


def load_preferences(source: str | Path | Iterable[dict | Pair]) -> list[Pair]:
    """Pairs from a file or from dicts (a :class:`Pair` among them is taken as it is); errors
    name the file, line and field. Empty is an error."""
    if isinstance(source, str | Path):
        pairs = [pair_from_record(r, path=source, line=n) for n, r in iter_raw_records(source)]
        if not pairs:
            raise InputError("no preference pairs (empty file)", path=source)
        return pairs
    pairs = [
        r if isinstance(r, Pair) else pair_from_record(r, line=n)
        for n, r in enumerate(source, start=1)
    ]
    if not pairs:
        raise InputError("no preference pairs given")
    return pairs


def score_text(record: dict, *, path=None, line: int | None = None, render=format_text) -> str:
    """The text to score for a record: ``prompt`` (optional) + ``response``, or a ``text`` transcript."""
    where = {"path": path, "line": line}
    if "response" in record:
        return render(
            _text_field(record, "prompt", where, required=False),
            _text_field(record, "response", where, required=True),
        )
    if "text" in record:  # a whole transcript: as a response without a separate prompt
        return render("", _text_field(record, "text", where, required=True))
    raise InputError("missing field (or 'text')", field="response", **where)


def preferences_fingerprint(pairs: list[Pair]) -> str:
    """A hash of the pairs' content and order: a run resumes only on the same data."""
    digest = hashlib.sha256()
    for pair in pairs:
        for part in (pair.prompt, pair.chosen, pair.rejected, repr(pair.margin)):
            digest.update(part.encode("utf-8", "surrogatepass"))
            digest.update(b"\x00")
    return digest.hexdigest()[:16]
