"""Random rating sets for demos and benchmarks. The ratings mean nothing: they are uniform noise."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from dynrules.engine.atomic import atomic_path


def write_random_pairs(path, n_pairs: int, n_rules: int, *, seed: int = 0, batch: int = 65536) -> Path:
    """Parquet of ``n_pairs`` pairs with uniform random scores and relevance (published column names)."""
    rng = np.random.default_rng(seed)
    schema = pa.schema([
        ("id", pa.string()), ("prompt", pa.string()), ("responseA", pa.string()), ("responseB", pa.string()),
        ("scoresA", pa.list_(pa.float32(), n_rules)), ("scoresB", pa.list_(pa.float32(), n_rules)),
        ("relevance", pa.list_(pa.float32(), n_rules)),
    ])
    with atomic_path(path) as tmp, pq.ParquetWriter(tmp, schema) as writer:
        for lo in range(0, n_pairs, batch):
            n = min(batch, n_pairs - lo)
            ids = [str(i) for i in range(lo, lo + n)]

            def scores(low):
                flat = rng.uniform(low, 1, n * n_rules).astype(np.float32)
                return pa.FixedSizeListArray.from_arrays(pa.array(flat), n_rules)

            writer.write_table(pa.table({
                "id": ids, "prompt": [f"random prompt {i}" for i in ids],
                "responseA": [f"random response A {i}" for i in ids], "responseB": [f"random response B {i}" for i in ids],
                "scoresA": scores(-1.0), "scoresB": scores(-1.0), "relevance": scores(0.0),
            }, schema=schema))
    return Path(path)
