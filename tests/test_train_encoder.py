"""The Flax BERT encoder against an independent implementation, and its checkpoint loader.

tests/fixtures/minilm_reference.npz holds all-MiniLM-L6-v2 sentence embeddings of 8 texts
computed ONCE with PyTorch + transformers.BertModel (mean pooling over the attention mask,
L2 normalisation) by tests/fixtures/make_minilm_reference.py; torch is not needed here.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynrules.errors import DynrulesError
from dynrules.models import bert, embedder
from dynrules.models import bert_checkpoint as bert_ckpt
from dynrules.models import tokenizer as tok

FIXTURE = Path(__file__).parent / "fixtures" / "minilm_reference.npz"
TINY = bert.BertConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    max_position_embeddings=128,
)


def test_minilm_embeddings_match_pytorch_reference():
    reference = np.load(FIXTURE)
    texts = [str(t) for t in reference["texts"]]
    # batch_size 3 mixes lengths and pads the last batch: results must not care.
    embeddings = embedder.embed_texts(texts, batch_size=3)
    assert embeddings.shape == (8, 384) and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, reference["embeddings"], atol=1e-4)
    tokens = embedder.sentence_embedder().tokenizer.encode(texts, 256)
    for ids, ref_ids, ref_len in zip(
        tokens.ids, reference["token_ids"], reference["lengths"], strict=True
    ):
        np.testing.assert_array_equal(ids, ref_ids[:ref_len])
    # Same text alone and among others: same vector (padding-independent).
    np.testing.assert_allclose(embedder.embed_texts(texts[:1])[0], embeddings[0], atol=1e-5)
    assert embedder.embed_texts([]).shape == (0, 384)


def test_truncation_keeps_the_end_and_counts_texts():
    tokenizer = tok.TextTokenizer(bert_ckpt.default_checkpoint_dir() / "tokenizer.json")
    long_text = " ".join(f"word{i}" for i in range(200)) + " final ending"
    tokens = tokenizer.encode([long_text, "short"], max_length=16)
    assert tokens.truncated == 1
    assert list(tokens.lengths) == [16, 3]
    full = tokenizer.encode([long_text], max_length=512).ids[0]
    kept = tokens.ids[0]
    # [CLS] + the LAST 14 text tokens + [SEP]
    assert kept[0] == full[0] and kept[-1] == full[-1]
    np.testing.assert_array_equal(kept[1:-1], full[-15:-1])


@settings(max_examples=40, deadline=None)
@given(words=st.integers(0, 120), max_length=st.integers(3, 64))
def test_middle_truncation_keeps_both_halves(words, max_length):
    """Twin: the full ids' first max_length//2 and last max_length − max_length//2 tokens."""
    path = bert_ckpt.default_checkpoint_dir() / "tokenizer.json"
    text = " ".join(f"w{i}" for i in range(words))
    full = tok.TextTokenizer(path).encode([text], max_length=100_000).ids[0]
    middle = tok.TextTokenizer(path, truncation="middle").encode([text], max_length)
    head = max_length // 2
    expected = (
        full if len(full) <= max_length else [*full[:head], *full[len(full) - max_length + head :]]
    )
    np.testing.assert_array_equal(middle.ids[0], expected)
    assert middle.truncated == int(len(full) > max_length)
    assert middle.ids[0][0] == full[0] and middle.ids[0][-1] == full[-1]  # [CLS] … [SEP] kept


def test_a_model_cuts_texts_the_way_its_spec_says(tmp_path):
    """The spec's truncation survives export and read_model; old specs read as left."""
    from dynrules.models import classifier as mdl

    spec = mdl.ModelSpec(TINY, max_length=16, truncation="middle")
    params = {
        "encoder": bert.random_params(TINY, 0),
        "head_kernel": np.zeros((32, 1), np.float32),
        "head_bias": np.zeros((1,), np.float32),
    }
    tokenizer = tok.TextTokenizer(bert_ckpt.default_checkpoint_dir() / "tokenizer.json")
    mdl.export_model(params, spec, tokenizer, tmp_path / "rm")
    loaded = mdl.read_model(tmp_path / "rm")
    assert loaded.spec.truncation == "middle" and loaded.tokenizer.truncation == "middle"
    old = {k: v for k, v in spec.to_dict().items() if k != "truncation"}
    assert mdl.ModelSpec.from_dict(old).truncation == "left"
    with pytest.raises(DynrulesError, match="truncation must be one of"):
        mdl.ModelSpec(TINY, truncation="right")


def test_missing_weights_name_the_setup_command(monkeypatch, tmp_path):
    monkeypatch.setattr(bert_ckpt.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DynrulesError, match="make setup"):
        bert_ckpt.read_checkpoint(None)
    with pytest.raises(DynrulesError, match="lacks config.json"):
        bert_ckpt.read_checkpoint(tmp_path)


def test_checkpoint_round_trip_with_and_without_bert_prefix(tmp_path):
    from safetensors.numpy import load_file, save_file

    params = bert.random_params(TINY, seed=3)
    bert_ckpt.write_checkpoint(
        tmp_path / "plain", TINY, params, bert_ckpt.default_checkpoint_dir() / "tokenizer.json"
    )
    loaded = bert_ckpt.read_checkpoint(tmp_path / "plain")
    assert loaded.config == TINY
    for ours, theirs in zip(_leaves(params), _leaves(loaded.params), strict=True):
        np.testing.assert_array_equal(np.asarray(ours), theirs)

    prefixed = tmp_path / "prefixed"
    prefixed.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (prefixed / name).write_bytes((tmp_path / "plain" / name).read_bytes())
    tensors = load_file(str(tmp_path / "plain" / "model.safetensors"))
    save_file({"bert." + k: v for k, v in tensors.items()}, str(prefixed / "model.safetensors"))
    for ours, theirs in zip(
        _leaves(params), _leaves(bert_ckpt.read_checkpoint(prefixed).params), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(ours), theirs)

    config = json.loads((prefixed / "config.json").read_text()) | {
        "hidden_size": 64,
        "intermediate_size": 128,
    }
    (prefixed / "config.json").write_text(json.dumps(config))
    with pytest.raises(DynrulesError, match="embeddings.word_embeddings.weight.*shape"):
        bert_ckpt.read_checkpoint(prefixed)


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)
