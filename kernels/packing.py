"""Packing variable-length texts into fixed-width rows (padding-free batches).

First-fit decreasing: texts are placed longest first, each into the first row opened so far
that has room for it (and fewer than ``max_segments`` texts), else into a new row. A row's
width is fixed when it opens: the width its opening text asks for (``widths``), so one pass
can open wide rows for long texts and let short texts fill their tails. First-fit decreasing
uses at most 11/9 of the optimal row count plus one (Dósa 2007); with many short texts it is
near-optimal in practice.

A text's place is (row, offset, segment): it occupies ``row[offset : offset + length]`` and is
segment ``segment`` (1, 2, … in the order the row received its texts; 0 is padding).
"""

import dataclasses

import numba
import numpy as np

from .config import EXACT


@numba.njit(**EXACT)
def first_fit(lengths, widths, max_segments, out_row, out_offset, out_segment, row_width):
    """Place texts in the given order (callers sort longest first); returns the rows opened.

    ``lengths[i] <= widths[i]``; ``out_row``, ``out_offset``, ``out_segment`` [n] receive each
    text's place, ``row_width`` [n] the widths of the rows opened (the first ``rows`` entries).
    """
    n = lengths.shape[0]
    used = np.zeros(n, np.int64)
    count = np.zeros(n, np.int64)
    rows = 0
    for i in range(n):
        length = lengths[i]
        target = rows
        for r in range(rows):
            if count[r] < max_segments and row_width[r] - used[r] >= length:
                target = r
                break
        if target == rows:
            row_width[rows] = widths[i]
            rows += 1
        out_row[i] = target
        out_offset[i] = used[target]
        out_segment[i] = count[target] + 1
        used[target] += length
        count[target] += 1
    return rows


@dataclasses.dataclass(frozen=True)
class Packing:
    """Where each text goes: ``row``, ``offset``, ``segment`` [n]; ``widths`` [rows] per row."""

    row: np.ndarray
    offset: np.ndarray
    segment: np.ndarray
    widths: np.ndarray

    @property
    def rows(self) -> int:
        return len(self.widths)


def pack(lengths: np.ndarray, widths: np.ndarray | int, max_segments: int) -> Packing:
    """First-fit decreasing placement of texts of ``lengths`` (ties: lower index first).

    ``widths`` is each text's row width if it opens a row (one int: every row that wide). Rows
    come out in the order they were opened: widest first when widths grow with length.
    """
    lengths = np.asarray(lengths, np.int64)
    widths = np.broadcast_to(np.asarray(widths, np.int64), lengths.shape)
    if max_segments < 1:
        raise ValueError(f"max_segments must be at least 1, got {max_segments}")
    if np.any(lengths < 1) or np.any(lengths > widths):
        raise ValueError("every text needs 1 ≤ length ≤ its row width")
    order = np.argsort(-lengths, kind="stable")
    n = len(lengths)
    row, offset, segment = (np.zeros(n, np.int64) for _ in range(3))
    row_width = np.zeros(n, np.int64)
    rows = first_fit(
        lengths[order],
        np.ascontiguousarray(widths[order]),
        max_segments,
        row,
        offset,
        segment,
        row_width,
    )
    placed = Packing(
        row=np.empty(n, np.int64),
        offset=np.empty(n, np.int64),
        segment=np.empty(n, np.int64),
        widths=row_width[:rows].copy(),
    )
    for out, sorted_values in zip(
        (placed.row, placed.offset, placed.segment), (row, offset, segment), strict=True
    ):
        out[order] = sorted_values
    return placed
