"""Packed (padding-free) batches: the packer against its NumPy twin, packed rewards against
unpacked ones for encoder and decoder, row-neighbour independence, and the packed training
step against the unpacked one on the same pairs. Tiny random models, float32."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynrules.kernels import packing
from dynrules.models import bert, llama
from dynrules.models import classifier as mdl
from dynrules.models import tokenizer as tok

from . import decoder_fixtures as fx
from . import naive_packing

TINY_ENCODER = bert.BertConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
)


@st.composite
def texts_to_pack(draw):
    width = draw(st.integers(4, 64))
    lengths = draw(st.lists(st.integers(1, width), min_size=1, max_size=40))
    if draw(st.booleans()):  # each text's own width, as the scorer does: ≥ its length
        widths = [draw(st.integers(n, width)) for n in lengths]
        widths = sorted(widths)  # a row's width grows with the length of the text opening it
        widths = [widths[r] for r in np.argsort(np.argsort(lengths, kind="stable"), kind="stable")]
    else:
        widths = width
    return np.array(lengths), widths, draw(st.integers(1, 8))


@settings(max_examples=200, deadline=None)
@given(texts_to_pack())
def test_packer_matches_its_twin_and_places_every_text_once(case):
    lengths, widths, max_segments = case
    placed = packing.pack(lengths, widths, max_segments)
    row, offset, segment, row_widths = naive_packing.pack(lengths, widths, max_segments)
    np.testing.assert_array_equal(placed.row, row)
    np.testing.assert_array_equal(placed.offset, offset)
    np.testing.assert_array_equal(placed.segment, segment)
    np.testing.assert_array_equal(placed.widths, row_widths)
    # Invariants, independent of the twin: each (row, segment) once, segments 1..k a row,
    # texts side by side from offset 0, no row over its width.
    assert len(set(zip(placed.row.tolist(), placed.segment.tolist(), strict=True))) == len(lengths)
    for r in range(placed.rows):
        mine = np.flatnonzero(placed.row == r)
        assert 1 <= len(mine) <= max_segments
        order = mine[np.argsort(placed.segment[mine])]
        np.testing.assert_array_equal(placed.segment[order], np.arange(1, len(mine) + 1))
        ends = np.cumsum(lengths[order])
        np.testing.assert_array_equal(placed.offset[order], np.concatenate([[0], ends[:-1]]))
        assert ends[-1] <= placed.widths[r]
    own = np.broadcast_to(widths, lengths.shape)
    opener = placed.segment == 1
    np.testing.assert_array_equal(np.sort(placed.widths), np.sort(own[opener]))


@settings(max_examples=50, deadline=None)
@given(texts_to_pack(), st.integers(0, 3))
def test_packed_arrays_hold_each_text_with_its_segment_and_positions(case, spare_rows):
    lengths, widths, max_segments = case
    placed = packing.pack(lengths, widths, max_segments)
    seqs = [np.arange(100 * i, 100 * i + n, dtype=np.int32) for i, n in enumerate(lengths)]
    shape = (placed.rows + spare_rows, int(np.max(widths)))
    arrays = tok.pack_batch(seqs, placed.row, placed.offset, placed.segment, shape, pad_id=-1)
    for i, seq in enumerate(seqs):
        span = (placed.row[i], slice(placed.offset[i], placed.offset[i] + len(seq)))
        np.testing.assert_array_equal(arrays["ids"][span], seq)
        assert np.all(arrays["segments"][span] == placed.segment[i])
        np.testing.assert_array_equal(arrays["positions"][span], np.arange(len(seq)))
    padding = arrays["segments"] == 0
    assert padding.sum() == shape[0] * shape[1] - lengths.sum()
    assert np.all(arrays["ids"][padding] == -1) and np.all(arrays["positions"][padding] == 0)


def test_packer_refuses_a_text_longer_than_its_row():
    with pytest.raises(ValueError, match="length"):
        packing.pack(np.array([5, 9]), 8, 4)


# --------------------------------------------------------------------------- models


def _model(kind: str, pooling: str = ""):
    """(spec, graphdef, params) of a tiny random reward model whose rewards are of order one."""
    if kind == "encoder":
        spec = mdl.ModelSpec(TINY_ENCODER, pooling=pooling, max_length=64)
        backbone = {"encoder": bert.random_params(TINY_ENCODER, seed=1)}
    else:
        config = fx.tiny_config()
        spec = mdl.ModelSpec(config, max_length=64)
        backbone = {"decoder": llama.random_params(config, seed=1)}
    kernel = np.random.default_rng(2).normal(size=(spec.hidden_size, 1)).astype(np.float32)
    params = backbone | mdl.initial_head(spec, 0) | {"head_kernel": kernel}
    return spec, mdl.abstract_model(spec)[0], jax.tree.map(np.asarray, params)  # host copies


def _texts(count: int, seed: int, vocab: int = 250) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [
        rng.integers(3, vocab, size=int(n)).astype(np.int32) for n in rng.integers(3, 40, count)
    ]


def _unpacked_rewards(graphdef, params, seqs) -> np.ndarray:
    ids, lengths = tok.pad_batch(seqs, 64, len(seqs), 0)
    return np.asarray(mdl.apply(graphdef, params, ids, lengths))[:, 0]


def _packed_rewards(graphdef, params, seqs, width=64, slots=tok.ROW_SEGMENTS, spare_rows=1):
    placed = packing.pack(np.array([len(s) for s in seqs]), width, slots)
    arrays = tok.pack_batch(
        seqs, placed.row, placed.offset, placed.segment, (placed.rows + spare_rows, width), 0
    )
    logits = mdl.apply_packed(
        graphdef, params, arrays["ids"], arrays["segments"], arrays["positions"], slots
    )
    return np.asarray(logits)[placed.row, placed.segment - 1, 0], placed


@pytest.mark.parametrize(
    "kind, pooling", [("encoder", "mean"), ("encoder", "cls"), ("encoder", "last"), ("decoder", "")]
)
def test_packed_rewards_equal_unpacked_rewards(kind, pooling):
    spec, graphdef, params = _model(kind, pooling)
    seqs = _texts(12, seed=3)
    packed, placed = _packed_rewards(graphdef, params, seqs)
    unpacked = _unpacked_rewards(graphdef, params, seqs)
    assert placed.rows < len(seqs) and np.any(placed.segment > 2)  # several texts a row
    np.testing.assert_allclose(packed, unpacked, atol=1e-4, rtol=0)
    assert np.std(unpacked) > 0.05  # the texts do score differently


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_a_texts_reward_does_not_depend_on_what_shares_its_row(kind):
    spec, graphdef, params = _model(kind)
    text = _texts(1, seed=5)[0]
    rewards = []
    for seed in range(3):  # the same text second in one row of four, between different texts
        seqs = _texts(4, seed=10 + seed)
        seqs[1] = text
        offsets = np.cumsum([0] + [len(s) for s in seqs[:-1]])
        arrays = tok.pack_batch(seqs, np.zeros(4, np.int64), offsets, np.arange(1, 5), (1, 160), 0)
        logits = mdl.apply_packed(
            graphdef, params, arrays["ids"], arrays["segments"], arrays["positions"], 4
        )
        rewards.append(float(logits[0, 1, 0]))
    alone = _unpacked_rewards(graphdef, params, [text])[0]
    np.testing.assert_allclose(rewards, alone, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- training and scoring


def _pairs(count: int, seed: int):
    from dynrules.train.data import Pair

    rng = np.random.default_rng(seed)
    words = "the model should refuse harmful requests and help with safe ones".split()

    def sentence(n):
        return " ".join(rng.choice(words, size=n))

    return [
        Pair(
            sentence(int(rng.integers(2, 20))),
            sentence(int(rng.integers(2, 20))),
            prompt=sentence(int(rng.integers(1, 6))),
            margin=float(rng.uniform(0, 2)),
        )
        for _ in range(count)
    ]


def _encoder_tokenizer():
    from dynrules.models import bert_checkpoint

    return bert_checkpoint.read_checkpoint(None).tokenizer


@pytest.mark.slow
@pytest.mark.parametrize("grad_accum", [1, 2])
def test_packed_training_step_gives_the_unpacked_loss_and_gradients(grad_accum):
    from dynrules.models.templates import format_text
    from dynrules.train import sharding as shd
    from dynrules.train.config import TrainConfig
    from dynrules.train.trainer import ExampleBatches, TokenizedExamples, Trainable, pair_examples

    spec, _, params = _model("encoder")
    tokens = TokenizedExamples.build(
        pair_examples(_pairs(24, seed=0), format_text), _encoder_tokenizer(), 64, 2
    )
    mesh = shd.make_mesh("", jax.devices()[:1])
    results = {}
    for packed in (False, True):
        config = TrainConfig(
            steps=10,
            batch_size=8,
            grad_accum=grad_accum,
            max_length=64,
            margin_scale=0.5,
            center_coef=0.01,
            packing=packed,
        )
        trainable = Trainable.build(spec, config, mesh)
        batches = ExampleBatches(
            tokens,
            seed=0,
            batch_size=8,
            grad_accum=grad_accum,
            max_length=64,
            pad_id=0,
            packing=trainable.row_layout() if packed else None,
        )
        batch = trainable.global_batch(batches.batch(1))
        micro = jax.tree.map(lambda x: x[0], batch)
        state = trainable.initial_state(params)
        (loss, _), grads = jax.value_and_grad(trainable.micro_loss(config), has_aux=True)(
            state["params"], micro
        )
        _, sums = trainable.train_step(config)(state, batch)
        results[packed] = (float(loss), grads, jax.device_get(sums))
        if packed:  # fewer rows than texts: packing did happen
            assert batch["ids"].shape[1] < 2 * config.batch_size // grad_accum
    (loss_u, grads_u, sums_u), (loss_p, grads_p, sums_p) = results[False], results[True]
    assert loss_p == pytest.approx(loss_u, abs=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads_u))
    worst = max(
        float(jnp.abs(a - b).max())
        for a, b in zip(jax.tree.leaves(grads_p), jax.tree.leaves(grads_u), strict=True)
    )
    assert scale > 1e-3 and worst <= 1e-4 * scale
    for key in ("loss", "correct", "margin", "reward", "grad_norm"):
        assert sums_p[key] == pytest.approx(sums_u[key], rel=1e-4, abs=1e-5), key


def test_packed_scorer_equals_unpacked_scorer_and_runs_fewer_rows():
    from dynrules.train import sharding as shd
    from dynrules.train.scoring import Scorer

    spec, graphdef, params = _model("encoder")
    mesh = shd.make_mesh("", jax.devices()[:1])
    placed = shd.place(params, shd.abstract_params(mdl.abstract_model(spec)[1], mesh))
    texts = [" ".join(p.texts()) for p in _pairs(40, seed=1)]
    scorers = {
        packed: Scorer(
            graphdef,
            placed,
            _encoder_tokenizer(),
            mesh,
            max_length=64,
            batch_size=8,
            row_tiers=2,
            packing=packed,
        )
        for packed in (False, True)
    }
    rewards = {packed: scorer.rewards(texts) for packed, scorer in scorers.items()}
    np.testing.assert_allclose(rewards[True], rewards[False], atol=1e-4, rtol=0)
    assert np.std(rewards[False]) > 0.05
    lengths = scorers[True].tokenizer.encode(texts, 64).lengths
    rows = {
        packed: sum(len(set(b.row.tolist())) for b in s.plan(lengths))
        for packed, s in scorers.items()
    }
    assert rows[True] < rows[False] == len(texts)
