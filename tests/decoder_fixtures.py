"""Tiny random decoders on disk, as Hugging Face directories or GGUF files (test helpers).

The tokenizer is byte-level BPE without merges: each UTF-8 byte is one token (ids 0–255, in
GPT-2's byte-to-character order), then four control tokens. Any text tokenises, so tiny
models can train on real sentences.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from dynrules.models import decoder_io as dio
from dynrules.models import llama

SPECIAL = ("<s>", "</s>", "<|im_start|>", "<|im_end|>")
VOCAB = 256 + len(SPECIAL)
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def tiny_config(model_type: str = "llama", **changes) -> llama.LlamaConfig:
    base = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "bos_token_id": 256,
        "eos_token_id": 257,
        "pad_token_id": 257,
        "model_type": model_type,
        "qkv_bias": model_type == "qwen2",
        "tie_word_embeddings": model_type == "qwen2",
    }
    return llama.LlamaConfig(**(base | changes))


def byte_tokens() -> list[str]:
    """Token strings: GPT-2's character for each byte value (bytes_to_unicode), then specials."""
    printable = {*range(33, 127), *range(161, 173), *range(174, 256)}
    chars, shift = [], 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shift))
            shift += 1
    return chars + list(SPECIAL)


def byte_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens = byte_tokens()
    tokenizer = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, [], fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    return tokenizer


def write_hf_decoder(
    directory: Path,
    config: llama.LlamaConfig,
    params: dict,
    *,
    shards: int = 1,
    chat_template: str | None = CHAT_TEMPLATE,
    tokenizer=None,
) -> Path:
    """A HF directory: config.json, safetensors (``shards`` files + index), tokenizer files."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    tensors = dio.hf_tensors(params, config)
    raw = config.to_hf_dict() | {"architectures": ["LlamaForCausalLM"]}
    (directory / "config.json").write_text(json.dumps(raw))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        keys, weight_map = sorted(tensors), {}
        for shard in range(shards):
            name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
            part = {k: tensors[k] for k in keys[shard::shards]}
            save_file(part, str(directory / name))
            weight_map |= dict.fromkeys(part, name)
        (directory / dio.INDEX_FILE).write_text(json.dumps({"weight_map": weight_map}))
    (tokenizer or byte_tokenizer()).save(str(directory / "tokenizer.json"))
    if chat_template is not None:
        special = {"chat_template": chat_template, "bos_token": "<s>", "eos_token": "</s>"}
        (directory / "tokenizer_config.json").write_text(json.dumps(special))
    return directory


def tiny_hf_decoder(directory: Path, model_type: str = "llama", seed: int = 0, **changes) -> Path:
    config = tiny_config(model_type, **changes)
    params = llama.random_params(config, seed, lm_head=not config.tie_word_embeddings)
    return write_hf_decoder(directory, config, params)


ANSWER_WORDS = ("Yes", "No", "Irrelevant")
JUDGE_CHAT_TEMPLATE = (
    CHAT_TEMPLATE + "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_judge_decoder(directory: Path, seed: int = 0) -> Path:
    """A tiny decoder whose vocabulary also holds the answer words (ids 260–262), with weights
    scaled up so that its answer distributions are far from uniform."""
    config = tiny_config(vocab_size=VOCAB + len(ANSWER_WORDS))
    params = llama.random_params(config, seed, lm_head=True)
    for name, scale in (("embed", 20.0), ("lm_head", 20.0)):
        params[name] *= scale
    for name in ("q_kernel", "k_kernel", "v_kernel", "o_kernel"):  # let context reach the answer
        params["layers"][name] *= 8.0
    return write_hf_decoder(
        directory,
        config,
        params,
        tokenizer=byte_tokenizer_with_answers(),
        chat_template=JUDGE_CHAT_TEMPLATE,
    )


def byte_tokenizer_with_answers():
    """The byte tokenizer with the answer words as whole tokens (ids 260–262)."""
    from tokenizers import AddedToken

    tokenizer = byte_tokenizer()
    tokenizer.add_tokens([AddedToken(w, special=False, normalized=False) for w in ANSWER_WORDS])
    return tokenizer


def _permute(value: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``, verbatim in NumPy."""
    return (
        value.reshape(heads, 2, value.shape[0] // heads // 2, *value.shape[1:])
        .swapaxes(1, 2)
        .reshape(value.shape)
    )


GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def write_gguf_decoder(
    path: Path, config: llama.LlamaConfig, params: dict
) -> dict[str, np.ndarray]:
    """A GGUF file as llama.cpp's converter writes one, with the ``gguf`` package itself.

    Q and K rows permuted as llama.cpp does; 2-D tensors cycle through :data:`GGUF_TYPES`.
    Returns the HF tensors as they should read back (each passed through its quantisation).
    """
    import gguf
    from gguf import quants

    arch = "llama"
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    tokens = byte_tokens()
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * len(SPECIAL))
    writer.add_token_merges([])
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    blocks = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    expected, matrices = {}, 0
    for key, value in dio.hf_tensors(params, config).items():
        if key in names:
            name = names[key]
        else:
            _, _, layer, *rest = key.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            name = f"blk.{layer}.{blocks[module]}.{kind}"
        stored = value.astype(np.float32)
        if key.endswith("q_proj.weight"):
            stored = _permute(stored, config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            stored = _permute(stored, config.num_key_value_heads)
        qtype = gguf.GGMLQuantizationType.F32
        if stored.ndim == 2:
            qtype = gguf.GGMLQuantizationType[GGUF_TYPES[matrices % len(GGUF_TYPES)]]
            matrices += 1
        data = quants.quantize(stored, qtype)
        writer.add_tensor(name, data, raw_dtype=qtype)
        expected[key] = quants.dequantize(data, qtype).astype(np.float32).reshape(value.shape)
        if key.endswith("q_proj.weight"):
            expected[key] = dio.unpermute_rows(expected[key], config.num_attention_heads)
        elif key.endswith("k_proj.weight"):
            expected[key] = dio.unpermute_rows(expected[key], config.num_key_value_heads)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected
