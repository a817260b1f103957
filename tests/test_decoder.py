"""The Llama-family decoder and its loaders, against llama.cpp and against their own inverses.

tests/fixtures/smollm2_reference.npz holds llama.cpp's (llama-cpp-python 0.3.36) token ids and
top-16 next-token logits at every position of 3 prompts, for the pinned SmolLM2-135M-Instruct
Q4_1 GGUF, made ONCE by tests/fixtures/make_smollm2_reference.py; llama.cpp is not needed here.

Tolerance: llama.cpp multiplies the Q4_1 weights with activations quantised to 8 bits (Q8_1
blocks of 32), the tied Q8_0 output matrix with Q8_0 activations, and keeps K/V in float16;
we multiply the same dequantised weights with float32 activations (this forward pass matched
transformers' own GGUF loader + LlamaForCausalLM to 1.4e-4 when the test was written). So
logits differ by activation-quantisation noise: at the fixture's 53 positions × top 16 the
largest difference was 0.72 and the mean 0.17; the test allows 1.0 and 0.3. Skipping the Q/K
row un-permutation gives differences of 2.7–17 and wrong top-1 tokens, far outside.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynrules.errors import DynrulesError
from dynrules.models import decoder_io as dio
from dynrules.models import llama
from dynrules.models import tokenizer as tok
from dynrules.models.templates import ChatTemplate

from . import decoder_fixtures as fx

FIXTURE = Path(__file__).parent / "fixtures" / "smollm2_reference.npz"
LOGIT_TOLERANCE, MEAN_TOLERANCE = 1.0, 0.3

TINY_LLAMA = llama.LlamaConfig(
    vocab_size=fx.VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    rope_theta=500000.0,
    rope_type="llama3",
    rope_factor=8.0,
    rope_original_max_position=64,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
)
TINY_QWEN2 = llama.LlamaConfig(
    vocab_size=fx.VOCAB,
    hidden_size=24,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=4,
    model_type="qwen2",
    qkv_bias=True,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
    rope_theta=1e6,
)


@pytest.fixture(scope="module")
def smollm2():
    return dio.read_decoder(dio.smollm2_gguf(), lm_head=True)


def test_smollm2_logits_match_llama_cpp(smollm2):
    reference = np.load(FIXTURE)
    prompts = [str(p) for p in reference["prompts"]]
    tokens = smollm2.tokenizer.encode(prompts, 256)
    for number, ids in enumerate(tokens.ids):  # the tokenizer built from the GGUF's vocab
        np.testing.assert_array_equal(ids, reference[f"ids_{number}"])
    model = llama.with_params(
        smollm2.config, jax.tree.map(np.asarray, smollm2.params), lm_head=True
    )
    # All prompts in one right-padded batch: a prompt's logits must not see the padding.
    ids, lengths = tok.pad_batch(tokens.ids, 32, len(prompts), smollm2.tokenizer.pad_id)
    logits = np.asarray(model.logits(model(jnp.asarray(ids), jnp.asarray(lengths))))
    errors = []
    for number, length in enumerate(lengths):
        ours = logits[number, :length]
        top_ids, top_logits = reference[f"top_ids_{number}"], reference[f"top_logits_{number}"]
        errors.append(np.abs(np.take_along_axis(ours, top_ids, -1) - top_logits))
        assert ours[-1].argmax() == top_ids[-1, 0], "next-token top-1 differs from llama.cpp"
        # Elsewhere the top-1 must agree wherever llama.cpp's own margin exceeds the noise.
        clear = top_logits[:, 0] - top_logits[:, 1] > 2 * LOGIT_TOLERANCE
        np.testing.assert_array_equal(ours.argmax(-1)[clear], top_ids[clear, 0])
        assert np.isin(ours.argmax(-1), top_ids).all()
    errors = np.concatenate([e.ravel() for e in errors])
    assert errors.max() <= LOGIT_TOLERANCE and errors.mean() <= MEAN_TOLERANCE, (
        errors.max(),
        errors.mean(),
    )


def test_smollm2_gguf_metadata_and_chat_template(smollm2):
    config = smollm2.config
    assert (
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads,
        config.head_dim,
    ) == (30, 576, 9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 100000.0
    assert "lm_head" not in smollm2.params  # tied: logits reuse the embedding
    text = smollm2.chat_template.render("Hi?", "Hello.")
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    )
    hh = smollm2.chat_template.render(
        "", "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d"
    )
    assert hh.count("<|im_start|>user\n") == 2 and hh.endswith("assistant\nd<|im_end|>\n")


def test_user_turn_recovers_the_message_from_a_prompt_in_the_same_template(smollm2):
    chat = smollm2.chat_template
    message = "How do I pick a lock?\nAsking for my own door."
    templated = chat.render_messages([{"role": "user", "content": message}], generation_prompt=True)
    assert templated.endswith("<|im_start|>assistant\n")  # the generation prompt is there
    assert chat.user_turn(templated) == message
    # the rendering a trainer scores: user turn + response, same as from the raw message
    assert chat.render(chat.user_turn(templated), "No.") == chat.render(message, "No.")
    assert chat.user_turn(message) is None  # a raw prompt is left alone
    other = ChatTemplate(fx.CHAT_TEMPLATE + "{% if add_generation_prompt %}ASSISTANT:{% endif %}")
    assert (
        chat.user_turn(
            other.render_messages([{"role": "user", "content": message}], generation_prompt=True)
        )
        is None
    )


@pytest.mark.parametrize("shape", [(48, 5), (48,)])
def test_unpermute_inverts_llama_cpp_permute(shape):
    value = np.random.default_rng(0).normal(size=shape)
    np.testing.assert_array_equal(dio.unpermute_rows(fx._permute(value, 3), 3), value)
    assert not np.array_equal(fx._permute(value, 3), value)


@pytest.mark.parametrize(
    ("config", "shards"),
    [(TINY_LLAMA, 1), (TINY_QWEN2, 3)],
    ids=["llama-single-file", "qwen2-sharded"],
)
def test_tiny_models_round_trip_through_hf_safetensors(tmp_path, config, shards):
    lm_head = not config.tie_word_embeddings
    params = llama.random_params(config, seed=1, lm_head=lm_head)
    hf_config = config.to_hf_dict()
    assert llama.LlamaConfig.from_hf_dict(hf_config) == config
    directory = fx.write_hf_decoder(tmp_path / "model", config, params, shards=shards)
    loaded = dio.read_decoder(directory, lm_head=lm_head)
    assert loaded.config == config
    host = jax.tree.map(np.asarray, loaded.params)
    jax.tree.map(np.testing.assert_array_equal, host, jax.tree.map(np.asarray, params))
    # Slices read lazily equal slices of the whole array (what each device shard reads).
    for name in ("q_kernel", "k_kernel", "o_kernel", "gate_kernel", "down_kernel", "attn_norm"):
        whole = host["layers"][name]
        index = tuple(slice(1, n) if n > 1 else slice(0, 1) for n in whole.shape)
        np.testing.assert_array_equal(loaded.params["layers"][name][index], whole[index])
    if config.qkv_bias:
        np.testing.assert_array_equal(
            loaded.params["layers"]["q_bias"][0:2, 2:5, 1:3],
            host["layers"]["q_bias"][0:2, 2:5, 1:3],
        )


def test_gguf_written_by_the_gguf_package_reads_back(tmp_path):
    """Every supported tensor type dequantised, Q/K rows un-permuted, vocabulary and template."""
    config = fx.tiny_config()
    expected = fx.write_gguf_decoder(
        tmp_path / "tiny.gguf", config, llama.random_params(config, 5, lm_head=True)
    )
    loaded = dio.read_decoder(tmp_path / "tiny.gguf", lm_head=True)
    assert loaded.config.num_key_value_heads == 2 and not loaded.config.tie_word_embeddings
    assert loaded.config.rms_norm_eps == pytest.approx(config.rms_norm_eps)
    got = dio.hf_tensors(jax.tree.map(np.asarray, loaded.params), loaded.config)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    ids = loaded.tokenizer.encode(["<|im_start|>héllo"], 64).ids[0]
    assert ids.tolist() == [258, *"héllo".encode()]  # one token per byte, specials whole
    assert (
        loaded.chat_template.render("a", "b")
        == "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
    )


def test_padding_does_not_change_a_texts_hidden_states():
    model = llama.with_params(TINY_QWEN2, llama.random_params(TINY_QWEN2, seed=2))
    rng = np.random.default_rng(0)
    short, long = rng.integers(0, fx.VOCAB, 5), rng.integers(0, fx.VOCAB, 19)
    ids, lengths = tok.pad_batch([short, long], 24, 3, 0)
    batch = np.asarray(model(jnp.asarray(ids), jnp.asarray(lengths)))
    alone = np.asarray(model(jnp.asarray(short[None]), jnp.asarray([5])))
    np.testing.assert_allclose(batch[0, :5], alone[0], atol=1e-5)


def test_bf16_compute_stays_close_to_float32():
    params = llama.random_params(TINY_LLAMA, seed=3, lm_head=True)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, fx.VOCAB, (2, 16)))
    lengths = jnp.asarray([16, 9])
    full = llama.with_params(TINY_LLAMA, params, lm_head=True)
    half = llama.with_params(TINY_LLAMA, params, lm_head=True, dtype=jnp.bfloat16, remat="dots")
    a, b = (np.asarray(m.logits(m(ids, lengths))) for m in (full, half))
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()


def test_remat_policies_give_the_same_gradients():
    params = llama.random_params(TINY_QWEN2, seed=6)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, fx.VOCAB, (2, 12)))
    lengths = jnp.asarray([12, 7])

    def gradients(remat):
        def loss(p):
            return jnp.sum(llama.with_params(TINY_QWEN2, p, remat=remat)(ids, lengths)[:, -1] ** 2)

        return jax.jit(jax.grad(loss))(params)

    reference = gradients("none")
    for remat in ("full", "dots"):
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), gradients(remat), reference
        )


def test_llama3_rope_scaling_slows_only_long_wavelengths():
    plain = llama.rope_inverse_frequencies(
        llama.LlamaConfig(
            head_dim=128, rope_theta=500000.0, num_attention_heads=1, num_key_value_heads=1
        )
    )
    scaled = llama.rope_inverse_frequencies(
        llama.LlamaConfig.from_hf_dict(
            {
                "vocab_size": 8,
                "hidden_size": 128,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 1,
                "rope_theta": 500000.0,
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                },
            }
        )
    )
    wavelength = 2 * np.pi / plain
    short, long = wavelength < 8192 / 4, wavelength > 8192
    np.testing.assert_allclose(scaled[short], plain[short], rtol=1e-6)
    np.testing.assert_allclose(scaled[long], plain[long] / 8, rtol=1e-6)
    middle = ~short & ~long
    assert middle.any() and np.all(
        (scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)
    )


def test_unsupported_configs_are_refused_clearly():
    base = {
        "vocab_size": 8,
        "hidden_size": 16,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    with pytest.raises(DynrulesError, match="model_type 'gpt2'"):
        llama.LlamaConfig.from_hf_dict(base | {"model_type": "gpt2"})
    with pytest.raises(DynrulesError, match="rope_scaling type 'yarn'"):
        llama.LlamaConfig.from_hf_dict(base | {"rope_scaling": {"rope_type": "yarn", "factor": 4}})
    with pytest.raises(DynrulesError, match="missing or bad field"):
        llama.LlamaConfig.from_hf_dict({"model_type": "llama"})
    windowed = llama.LlamaConfig.from_hf_dict(base | {"model_type": "mistral", "sliding_window": 8})
    model = llama.with_params(windowed, llama.random_params(windowed))
    model(jnp.zeros((1, 8), jnp.int32), jnp.asarray([8]))  # within the window: exact
    with pytest.raises(DynrulesError, match="sliding attention window of 8"):
        model(jnp.zeros((1, 9), jnp.int32), jnp.asarray([9]))


def test_bad_checkpoints_name_the_file_and_tensor(tmp_path):
    params = llama.random_params(TINY_LLAMA, seed=0)
    directory = fx.write_hf_decoder(tmp_path / "model", TINY_LLAMA, params)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | {"intermediate_size": 50}))
    with pytest.raises(
        DynrulesError,
        match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape",
    ):
        dio.read_decoder(directory)
    with pytest.raises(DynrulesError, match="neither a Hugging Face model directory nor a .gguf"):
        dio.read_decoder(tmp_path / "nothing")
    (tmp_path / "bad.gguf").write_bytes(b"not a gguf")
    with pytest.raises(DynrulesError, match="cannot read .*bad.gguf as GGUF"):
        dio.read_decoder(tmp_path / "bad.gguf")


def test_chat_template_from_tokenizer_config(tmp_path):
    template = ChatTemplate(
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{{ strftime_now('%Y') }}",
        bos_token="<s>",
    )
    assert template.render("q", "a") == "<s>[user] q\n[assistant] a\n2024"
    with pytest.raises(DynrulesError, match="chat template failed: nope"):
        ChatTemplate("{{ raise_exception('nope') }}").render("q", "a")
