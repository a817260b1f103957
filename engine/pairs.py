"""Reading preference pairs: JSONL (optionally gzipped) or Parquet, three record shapes.

- published names: prompt, responseA, responseB [, scoresA, scoresB, relevance]
- our names:       prompt, response_a, response_b [, scores_a, scores_b, relevance]
- HH transcripts:  chosen, rejected as "\\n\\nHuman: … \\n\\nAssistant: …" strings

Every reader yields records with our names. An HH pair is split at the last turn the two
transcripts share: the shared conversation becomes the prompt and the two final assistant
turns the responses. Which of the two becomes A is decided per pair by a fixed hash, so that
A is the human-preferred response in about half the pairs; the field ``truth`` says which
(1 when A is the human-preferred response, 0 when B is).
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq

from dynrules.errors import InputError

PUBLISHED_NAMES = {
    "responseA": "response_a",
    "responseB": "response_b",
    "scoresA": "scores_a",
    "scoresB": "scores_b",
}
TEXT_FIELDS = ("prompt", "response_a", "response_b")
SCORE_FIELDS = ("scores_a", "scores_b", "relevance")
ASSISTANT = "\n\nAssistant:"


def is_parquet(path: Path) -> bool:
    return Path(path).suffix.lower() in (".parquet", ".pq")


def iter_raw_records(path) -> Iterator[tuple[int, dict]]:
    """(line or row number from 1, record) for each record of a JSONL or Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no such file", path=path)
    if is_parquet(path):
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for corrupt files
            raise InputError(f"cannot read Parquet: {exc}", path=path) from None
        number = 0
        for batch in pf.iter_batches(batch_size=4096):
            for record in batch.to_pylist():
                number += 1
                yield number, record
        if number == 0:
            raise InputError("empty file: no records", path=path)
        return
    opener = gzip.open if path.suffix == ".gz" else open
    seen = False
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise InputError(f"malformed JSON: {exc.msg}", path=path, line=number) from None
                if not isinstance(record, dict):
                    raise InputError("each line must be a JSON object", path=path, line=number)
                seen = True
                yield number, record
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read: {exc}", path=path) from None
    if not seen:
        raise InputError("empty file: no records", path=path)


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str]:
    """(prompt, chosen response, rejected response) from two HH transcripts."""
    shared = 0
    limit = min(len(chosen), len(rejected))
    while shared < limit and chosen[shared] == rejected[shared]:
        shared += 1
    # The last assistant turn that lies wholly inside the shared prefix starts the responses.
    cut = chosen.rfind(ASSISTANT, 0, shared)
    if cut < 0:
        return "", chosen, rejected
    cut += len(ASSISTANT)
    return chosen[:cut], chosen[cut:].strip(), rejected[cut:].strip()


def a_is_chosen(key: str) -> bool:
    """Deterministic, balanced choice of whether the human-preferred response goes first."""
    return hashlib.blake2b(key.encode(), digest_size=1).digest()[0] % 2 == 0


def normalize(record: dict, position: int, path, line: int) -> dict:
    """A record with our field names, an ``id``, and HH transcripts split into a pair."""
    record = {PUBLISHED_NAMES.get(k, k): v for k, v in record.items()}
    if "response_a" not in record and "chosen" in record and "rejected" in record:
        chosen, rejected = record.pop("chosen"), record.pop("rejected")
        for name, value in (("chosen", chosen), ("rejected", rejected)):
            if not isinstance(value, str):
                raise InputError("must be a string", path=path, line=line, field=name)
        if "prompt" in record:
            prompt, good, bad = record["prompt"], chosen, rejected
        else:
            prompt, good, bad = split_hh(chosen, rejected)
        first = a_is_chosen(f"{position}:{prompt}")
        record.update(
            prompt=prompt, response_a=good if first else bad, response_b=bad if first else good
        )
        record["truth"] = int(first)
    for name in TEXT_FIELDS:
        if name not in record:
            raise InputError("missing field", path=path, line=line, field=name)
        if not isinstance(record[name], str):
            raise InputError("must be a string", path=path, line=line, field=name)
    record["id"] = str(record.get("id", position))
    return record


def iter_pairs(path) -> Iterator[tuple[int, dict]]:
    """(line number, normalised pair record) for each pair of a file."""
    for position, (line, record) in enumerate(iter_raw_records(path)):
        yield line, normalize(record, position, path, line)


def load_pairs(path) -> list[dict]:
    """All pairs of a file, normalised (for inputs that fit in memory: texts to rate or train on)."""
    return [record for _, record in iter_pairs(path)]


def extra_fields(record: dict) -> dict:
    """The scalar fields beyond texts and scores, kept as pair metadata (for example ``truth``)."""
    return {
        k: v
        for k, v in record.items()
        if k not in TEXT_FIELDS
        and k not in SCORE_FIELDS
        and k != "id"
        and (v is None or isinstance(v, (str, int, float, bool)))
    }
