"""Tokenizers and length buckets.

A text longer than ``max_length`` always keeps its END, because a preference pair shares its
conversation and differs at the end; right truncation can make chosen and rejected identical
(design.md, pitfalls). Two truncations (:data:`TRUNCATIONS`):

- ``left``: drop tokens from the start (only the end survives);
- ``middle``: keep the first half and the last half and drop the middle, so a long response
  still shows the request and its own opening (where a refusal or compliance is said) as well
  as its end. A reward model that sees a long answer's end only can not tell whether the
  request was benign or harmful.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from dynrules.errors import DynrulesError


@dataclasses.dataclass
class TokenizedTexts:
    """Token ids per text (special tokens included, at most ``max_length``) and truncation count."""

    ids: list[np.ndarray]
    truncated: int

    @property
    def lengths(self) -> np.ndarray:
        return np.array([len(x) for x in self.ids], np.int32)


Truncation = Literal["left", "middle"]
TRUNCATIONS: tuple[Truncation, ...] = get_args(Truncation)


class TextTokenizer:
    """``tokenizers.Tokenizer`` (a tokenizer.json, or one built in memory) with our truncation.

    ``truncation`` is one of :data:`TRUNCATIONS` (see the module doc); a model's loader sets it
    from the model's spec, so training, scoring and serving cut texts the same way.
    ``add_special_tokens`` applies the tokenizer's post-processor ([CLS] … [SEP] for BERT, a
    BOS for Llama 3); texts rendered by a chat template already carry their special tokens,
    so their tokenizer turns it off.
    """

    def __init__(
        self,
        source,
        *,
        pad_id: int | None = None,
        add_special_tokens: bool = True,
        truncation: str = "left",
    ):
        from tokenizers import Tokenizer

        if isinstance(source, str | Path):
            self.path: Path | None = Path(source)
            self._tokenizer = Tokenizer.from_file(str(source))
        else:
            self.path, self._tokenizer = None, source
        self._tokenizer.no_padding()  # padding is ours: to length buckets, with explicit lengths
        self._tokenizer.no_truncation()
        self._max_length: int | None = None
        self.add_special_tokens = add_special_tokens
        self.truncation = truncation
        if pad_id is None:
            pad_id = self._tokenizer.token_to_id("[PAD]")
        self.pad_id = 0 if pad_id is None else pad_id

    def save(self, path: str | Path) -> None:
        """Write the tokenizer as a tokenizer.json: the file it came from, or serialised."""
        if self.path is not None:
            shutil.copyfile(self.path, path)
            return
        self._tokenizer.no_truncation()  # our truncation setting is not part of the tokenizer
        self._max_length = None
        self._tokenizer.save(str(path))

    def id_to_token(self, token_id: int) -> str | None:
        return self._tokenizer.id_to_token(token_id)

    def encode(self, texts: list[str], max_length: int) -> TokenizedTexts:
        if max_length < 3:
            raise DynrulesError(f"max_length must be at least 3, got {max_length}")
        if self.truncation not in TRUNCATIONS:
            raise DynrulesError(f"truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        texts = list(texts)
        if self.truncation == "middle":
            return self._encode_middle(texts, max_length)
        if self._max_length != max_length:
            # direction="left" drops tokens from the start; special tokens are kept.
            self._tokenizer.enable_truncation(max_length, direction="left")
            self._max_length = max_length
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        ids = [np.asarray(e.ids, np.int32) for e in encodings]
        return TokenizedTexts(ids=ids, truncated=sum(1 for e in encodings if e.overflowing))

    def _encode_middle(self, texts: list[str], max_length: int) -> TokenizedTexts:
        if self._max_length is not None:
            self._tokenizer.no_truncation()
            self._max_length = None
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        # Special tokens sit at the ends ([CLS] … [SEP], a BOS), so both halves keep them.
        head = max_length // 2
        ids, truncated = [], 0
        for encoding in encodings:
            text_ids = np.asarray(encoding.ids, np.int32)
            if len(text_ids) > max_length:
                text_ids = np.concatenate([text_ids[:head], text_ids[head - max_length :]])
                truncated += 1
            ids.append(text_ids)
        return TokenizedTexts(ids=ids, truncated=truncated)


def length_buckets(max_length: int, smallest: int = 16) -> list[int]:
    """Padded lengths used for batches: 16, 24, 32, 48, 64, 96, … (powers of two and the
    midpoints between them), capped by ``max_length``.

    A handful of static shapes means a handful of compilations whatever the data, while
    padding stays under a third of any row (sorted batches waste ~15% on typical text).
    """
    buckets, size = [], smallest
    while size < max_length:
        buckets.append(size)
        if size + size // 2 < max_length:
            buckets.append(size + size // 2)
        size *= 2
    return [*buckets, max_length]


def bucket_for(length: int, buckets: list[int]) -> int:
    for size in buckets:
        if length <= size:
            return size
    return buckets[-1]


def pad_batch(
    ids: list[np.ndarray], time: int, rows: int, pad_id: int
) -> tuple[np.ndarray, np.ndarray]:
    """[rows, time] ids and [rows] lengths; rows beyond ``len(ids)`` are one-token fillers.

    Fillers have length 1 (not 0) so that no row is fully masked; their outputs are dropped.
    """
    out = np.full((rows, time), pad_id, np.int32)
    lengths = np.ones(rows, np.int32)
    for row, seq in enumerate(ids):
        out[row, : len(seq)] = seq
        lengths[row] = len(seq)
    return out, lengths


# The most texts a packed row holds: the slot count of the pooling (models.pooling.pool_segments).
ROW_SEGMENTS = 16


def pack_batch(
    ids: list[np.ndarray],
    rows: np.ndarray,
    offsets: np.ndarray,
    segments: np.ndarray,
    shape: tuple[int, int],
    pad_id: int,
) -> dict[str, np.ndarray]:
    """Packed [rows, time] arrays: text i at ``offsets[i]`` of row ``rows[i]`` as segment
    ``segments[i]``.

    ``segments`` holds 1, 2, … for a row's texts and 0 for padding; ``positions`` counts
    0, 1, … within each text (so a text's positions are the same alone or packed).
    """
    out = {
        "ids": np.full(shape, pad_id, np.int32),
        "segments": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
    }
    for seq, row, offset, segment in zip(ids, rows, offsets, segments, strict=True):
        span = slice(offset, offset + len(seq))
        out["ids"][row, span] = seq
        out["segments"][row, span] = segment
        out["positions"][row, span] = np.arange(len(seq))
    return out
