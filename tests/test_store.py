"""Rating store round trips, chunked streaming, clamping and the pool check."""

import numpy as np
import pytest

from dynrules.engine.pool import Rule, RulePool
from dynrules.engine.store import RatingStore, quantize
from dynrules.errors import InputError


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_round_trip_each_dtype(tmp_path, small_pool, dtype):
    rng = np.random.default_rng(0)
    a, b, rel = (
        rng.uniform(-1, 1, (300, 8)),
        rng.uniform(-1, 1, (300, 8)),
        rng.uniform(0, 1, (300, 8)),
    )
    store = RatingStore.create(
        tmp_path / "s", pool=small_pool, dtype=dtype, has_relevance=True, chunk_rows=64
    )
    store.append(a[:100], b[:100], rel[:100])
    store.append(a[100:], b[100:], rel[100:])
    store.write_manifest()
    reopened = RatingStore.open(tmp_path / "s", pool=small_pool)
    assert reopened.n_pairs == 300 and reopened.dtype == dtype
    chunks = list(reopened.iter_chunks(rows=64))
    assert [c.start for c in chunks] == [0, 64, 128, 192, 256]
    got_a = np.concatenate([c.scores_a for c in chunks]) * reopened.scale
    got_rel = np.concatenate([c.relevance for c in chunks]) * reopened.scale
    tolerance = {"float32": 1e-7, "float16": 1e-3, "int8": 0.5 / 127 + 1e-7}[dtype]
    assert np.abs(got_a - a).max() <= tolerance
    assert np.abs(got_rel - rel).max() <= tolerance
    np.testing.assert_array_equal(
        reopened.read(250, 10_000).scores_b, quantize(b[250:], dtype)
    )  # clamped
    # Reused buffers: the same chunks, each valid until the next is asked for.
    reused = [
        (c.start, c.scores_a.copy(), c.relevance.copy())
        for c in reopened.iter_chunks(10, 290, rows=64, reuse_buffers=True)
    ]
    assert [start for start, _, _ in reused] == [10, 74, 138, 202, 266]
    np.testing.assert_array_equal(
        np.concatenate([x for _, x, _ in reused]), quantize(a[10:290], dtype)
    )
    np.testing.assert_array_equal(
        np.concatenate([r for _, _, r in reused]), quantize(rel[10:290], dtype)
    )


def test_int8_is_round_127s():
    np.testing.assert_array_equal(
        quantize(np.array([1.0, -1.0, 0.5, 0.0039]), "int8"), [127, -127, 64, 0]
    )


def test_store_rejects_another_pool(tmp_path, small_pool):
    RatingStore.create(tmp_path / "s", pool=small_pool, n_pairs=4)
    other = RulePool("other", tuple(Rule(f"r{i}", "test", f"another rule {i}") for i in range(8)))
    with pytest.raises(InputError, match="rule pool"):
        RatingStore.open(tmp_path / "s", pool=other)


def test_open_rejects_a_directory_that_is_not_a_store(tmp_path):
    with pytest.raises(InputError, match="not a rating store"):
        RatingStore.open(tmp_path)
