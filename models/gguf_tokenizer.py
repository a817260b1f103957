"""A ``tokenizers`` BPE tokenizer rebuilt from a GGUF file's vocabulary and merges.

llama.cpp's byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) carry the token
strings, the merge list and a pre-tokenizer name (``tokenizer.ggml.pre``); the pre-tokenizer
names map to the same splitting rules Hugging Face's tokenizer.json files use. Control and
user-defined tokens (``<|im_start|>`` …) become added tokens, matched whole in the text.
SentencePiece vocabularies (``"llama"``, Llama 2 / Mistral GGUFs) are refused: load those
models from their Hugging Face directory, whose tokenizer.json is exact.
"""

from __future__ import annotations

from pathlib import Path

from dynrules.errors import DynrulesError

# Hugging Face's own splitting expressions (tokenizer.json of Llama 3 and Qwen2).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe", "qwen2")
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types


def _pre_tokenizer(name: str, path: Path):
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if name in ("default", "gpt2"):
        return byte_level
    if name == "smollm":  # digits one by one, then GPT-2's split
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if name in ("llama-bpe", "qwen2"):
        pattern = _LLAMA3_SPLIT if name == "llama-bpe" else _QWEN2_SPLIT
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    raise DynrulesError(
        f"{path}: GGUF pre-tokenizer {name!r} is not supported ({', '.join(PRE_TOKENIZERS)}); "
        "load the model from its Hugging Face directory instead"
    )


def tokenizer_from_gguf(reader, path: Path, *, add_bos: bool):
    """A ``tokenizers.Tokenizer`` equivalent to the GGUF's byte-level BPE vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    fields = reader.fields

    def meta(name, default=None):
        return fields[name].contents() if name in fields else default

    kind = meta("tokenizer.ggml.model")
    if kind != "gpt2":
        raise DynrulesError(
            f"{path}: GGUF tokenizer model {kind!r} is not byte-level BPE ('gpt2'); load the "
            "model from its Hugging Face directory (tokenizer.json) instead"
        )
    tokens = meta("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in meta("tokenizer.ggml.merges", [])]
    types = meta("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    pre = meta("tokenizer.ggml.pre", "default")
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = _pre_tokenizer(pre, path)
    tokenizer.decoder = decoders.ByteLevel()
    special = [
        AddedToken(token, special=kind_ == CONTROL, normalized=False)
        for token, kind_ in zip(tokens, types, strict=True)
        if kind_ in (CONTROL, USER_DEFINED)
    ]
    tokenizer.add_tokens(special)
    bos = meta("tokenizer.ggml.bos_token_id")
    if add_bos and bos is not None:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
        )
    return tokenizer
