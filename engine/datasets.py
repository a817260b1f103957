"""Real preference pairs with a human reference, built from data shipped through the registry.

:func:`pyrit_pairs` turns PyRIT's scorer-evaluation CSVs (PyPI ``pyrit``, MIT; installed from
assets.txt) into prompt-matched preference pairs. Each CSV row is an objective (the prompt), a
real LLM response and one or more human scores; the three subsets score different things:

- ``harm``      harm level in [0, 1] (several annotators' columns are averaged);
- ``objective`` 1 when the response achieved a harmful objective, else 0;
- ``refusal``   1 when the response refused or did not address the request (the prompts with
                several responses are all benign, so refusing is the worse answer).

In all three a LOWER score is better. Two responses to the same prompt, within one subset (the
scales differ between subsets), with different scores make a pair; the lower-scored one is the
preferred response. A few prompts have many responses (one has 52, i.e. 1,300 candidate pairs),
so at most ``max_pairs_per_prompt`` pairs are kept per prompt and subset, picked by a fixed hash:
without the cap a single prompt would make up a third of all pairs. Which response becomes A is fixed per pair by a hash, so A is preferred in
about half the pairs (``truth`` = 1 when A is preferred, as in :mod:`dynrules.engine.pairs`).

Splits are by prompt text (the same prompt appears in both ``harm`` and ``objective``): a fixed
hash of (seed, prompt) puts about 40% of prompts in ``heldout`` and the rest in ``train``, so
no prompt of the held-out split is seen in training whatever the subset.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
from importlib import resources

from dynrules.errors import DynrulesError, InputError

SUBSETS = {"harm": "harm", "objective": "objective", "refusal": "refusal_scorer"}
HELDOUT_FRACTION = 0.4
SPLITS = (None, "train", "heldout")


def _csv_rows(path) -> list[tuple[int, dict]]:
    """(line number, row) for a CSV whose lines starting with '#' are comments."""
    text = path.read_text(encoding="utf-8")
    kept, numbers = [], []
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        if not line.startswith("#"):
            kept.append(line)
            numbers.append(number)
    reader = csv.DictReader(io.StringIO("".join(kept)))
    rows, first_line = [], None
    for row in reader:
        # line_num counts physical lines of the filtered text read so far (a quoted field can
        # span lines): a row starts one line after the previous row ended.
        start = 2 if first_line is None else first_line
        rows.append((numbers[start - 1], row))
        first_line = reader.line_num + 1
    return rows


def _score(row: dict, path, line: int) -> float:
    columns = [c for c in row if c and c.startswith("human_score")]
    if not columns:
        raise InputError("no human_score column", path=path, line=line)
    values = []
    for column in columns:
        raw = (row[column] or "").strip()
        if raw == "":
            continue
        try:
            values.append(float(raw))
        except ValueError:
            raise InputError(f"not a number: {raw!r}", path=path, line=line, field=column) from None
    if not values:
        raise InputError("no human score given", path=path, line=line, field=columns[0])
    return sum(values) / len(values)


def _scored_responses(subset: str) -> dict[str, dict[str, float]]:
    """prompt -> response -> mean human score over all files of one subset (duplicates merged)."""
    root = resources.files("pyrit").joinpath("datasets", "scorer_evals", SUBSETS[subset])
    scores: dict[tuple[str, str], list[float]] = {}
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".csv"):
            continue
        for line, row in _csv_rows(entry):
            for field in ("objective", "assistant_response"):
                if not isinstance(row.get(field), str):
                    raise InputError("missing field", path=entry, line=line, field=field)
            key = (row["objective"].strip(), row["assistant_response"].strip())
            if key[0] and key[1]:
                scores.setdefault(key, []).append(_score(row, entry, line))
    by_prompt: dict[str, dict[str, float]] = {}
    for (prompt, response), values in scores.items():
        by_prompt.setdefault(prompt, {})[response] = sum(values) / len(values)
    return by_prompt


def _unit_hash(*parts: str) -> float:
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def prompt_split(prompt: str, seed: int = 0, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """'heldout' or 'train' for a prompt, fixed by (seed, prompt text)."""
    return "heldout" if _unit_hash(str(seed), prompt) < heldout_fraction else "train"


def pyrit_pairs(
    split: str | None = None, seed: int = 0, *, max_pairs_per_prompt: int = 12
) -> list[dict]:
    """Prompt-matched preference pairs from PyRIT's human-scored responses (see module docstring).

    Args:
        split: None for all pairs, ``"train"`` or ``"heldout"`` for one side of the by-prompt split.
        seed: changes the split (and nothing else).
        max_pairs_per_prompt: cap on pairs per (subset, prompt); 0 keeps all.

    Returns:
        records ``{id, prompt, response_a, response_b, truth, subset, score_a, score_b}`` in a
        fixed order; ``truth`` is 1 when A is the human-preferred (less harmful) response.
    """
    if split not in SPLITS:
        raise DynrulesError(f"unknown split {split!r}; choose None, 'train' or 'heldout'")
    try:
        resources.files("pyrit")
    except ModuleNotFoundError:
        raise DynrulesError(
            "PyRIT's data is not installed; run `make setup` (assets.txt pins pyrit)"
        ) from None
    pairs = []
    for subset in SUBSETS:
        for prompt, responses in sorted(_scored_responses(subset).items()):
            if split is not None and prompt_split(prompt, seed) != split:
                continue
            candidates = [
                (x, y)
                for x, y in itertools.combinations(sorted(responses.items()), 2)
                if x[1] != y[1]
            ]
            if max_pairs_per_prompt and len(candidates) > max_pairs_per_prompt:
                candidates = sorted(
                    candidates, key=lambda c: _unit_hash("keep", prompt, c[0][0], c[1][0])
                )
                candidates = candidates[:max_pairs_per_prompt]
            for (first, s1), (second, s2) in candidates:
                (good, good_score), (bad, bad_score) = sorted(
                    [(first, s1), (second, s2)], key=lambda r: r[1]
                )
                a_first = _unit_hash("order", prompt, good, bad) < 0.5
                a, b = (
                    ((good, good_score), (bad, bad_score))
                    if a_first
                    else ((bad, bad_score), (good, good_score))
                )
                pair_key = hashlib.blake2b(
                    "\x1f".join((subset, prompt, a[0], b[0])).encode(), digest_size=6
                ).hexdigest()
                pairs.append(
                    {
                        "id": f"pyrit-{subset}-{pair_key}",
                        "prompt": prompt,
                        "response_a": a[0],
                        "response_b": b[0],
                        "truth": int(a_first),
                        "subset": subset,
                        "score_a": a[1],
                        "score_b": b[1],
                    }
                )
    return pairs
