"""Texts tokenized once across the processes of a job.

Every process needs the token length of every text, to plan the same length-bucketed batches
(a global batch has one padded width, so all hosts must agree on it); each process needs the
token ids only of its own rows of each batch. So process p tokenizes a contiguous 1/N share of
the texts and keeps those ids, the lengths (and truncation counts) are exchanged once, and ids
of texts outside the share are tokenized when one of this process's rows needs them. On one
process the share is everything and nothing is tokenized twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dynrules.models.tokenizer import TextTokenizer
from dynrules.train import sharding as shd


class SharedTokens:
    """Lengths of all texts everywhere; ids of any text on demand (the share's cached)."""

    def __init__(self, texts: Sequence[str], tokenizer: TextTokenizer, max_length: int):
        self.texts, self.tokenizer, self.max_length = texts, tokenizer, max_length
        start, stop = shd.block_range(len(texts))
        encoded = tokenizer.encode([texts[i] for i in range(start, stop)], max_length)
        self._ids = dict(zip(range(start, stop), encoded.ids, strict=True))
        self.lengths = shd.gather_blocks(encoded.lengths, len(texts))
        self.truncated = shd.total(encoded.truncated)

    def __len__(self) -> int:
        return len(self.texts)

    def ids(self, indices: Sequence[int]) -> list[np.ndarray]:
        """Token ids of the texts at ``indices`` (the same ids whichever process asks)."""
        missing = [i for i in dict.fromkeys(indices) if i not in self._ids]
        fresh = {}
        if missing:
            encoded = self.tokenizer.encode([self.texts[i] for i in missing], self.max_length)
            fresh = dict(zip(missing, encoded.ids, strict=True))
        return [self._ids[i] if i in self._ids else fresh[i] for i in indices]
