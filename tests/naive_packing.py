"""Slow, obviously-correct twin of kernels.packing: first-fit decreasing on Python lists."""

import numpy as np


def pack(lengths, widths, max_segments):
    """(row, offset, segment per text, row widths): longest first (ties: lower index), each
    into the first open row with room and fewer than ``max_segments`` texts, else a new row."""
    lengths = [int(n) for n in lengths]
    widths = [int(w) for w in np.broadcast_to(widths, (len(lengths),))]
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows = []  # each: {"width", "texts": [text index, ...], "used"}
    row_of, offset_of, segment_of = {}, {}, {}
    for i in order:
        fits = [
            r
            for r, row in enumerate(rows)
            if len(row["texts"]) < max_segments and row["width"] - row["used"] >= lengths[i]
        ]
        if not fits:
            rows.append({"width": widths[i], "texts": [], "used": 0})
        index = fits[0] if fits else len(rows) - 1
        row = rows[index]
        row_of[i], offset_of[i], segment_of[i] = index, row["used"], len(row["texts"]) + 1
        row["texts"].append(i)
        row["used"] += lengths[i]
    n = len(lengths)
    return (
        [row_of[i] for i in range(n)],
        [offset_of[i] for i in range(n)],
        [segment_of[i] for i in range(n)],
        [row["width"] for row in rows],
    )
