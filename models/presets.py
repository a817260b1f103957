"""Named decoder shapes: the published architectures of common reward-model backbones.

Shapes only (config.json values), no weights: for benchmarks, for planning a run on hardware
that is not here, and as a check on config parsing. ``preset("llama-3.1-8b")`` is the
architecture of Llama-3.1-8B (and of Skywork-Reward-Llama-3.1-8B, the paper's reward model).
"""

from __future__ import annotations

from typing import Any

from dynrules.errors import DynrulesError
from dynrules.models.llama import LlamaConfig

_LLAMA3: dict[str, Any] = {  # the fields all Llama-3 shapes share
    "vocab_size": 128256,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0,
    "rope_type": "llama3",
    "rope_low_freq_factor": 1.0,
    "rope_high_freq_factor": 4.0,
    "rope_original_max_position": 8192,
    "max_position_embeddings": 131072,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
    ),
    "llama-3.2-1b": LlamaConfig(
        **_LLAMA3,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        rope_factor=32.0,
        tie_word_embeddings=True,
    ),
    "llama-3.2-3b": LlamaConfig(
        **_LLAMA3,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        head_dim=128,
        rope_factor=32.0,
        tie_word_embeddings=True,
    ),
    "llama-3.1-8b": LlamaConfig(
        **_LLAMA3,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_factor=8.0,
    ),
    "llama-3.1-70b": LlamaConfig(
        **_LLAMA3,
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=128,
        rope_factor=8.0,
    ),
}


def preset(name: str) -> LlamaConfig:
    """The named shape; a clear error listing the names for an unknown one."""
    try:
        return PRESETS[name.lower()]
    except KeyError:
        raise DynrulesError(
            f"unknown model preset {name!r}; presets: {', '.join(PRESETS)}"
        ) from None
