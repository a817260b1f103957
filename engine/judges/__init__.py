"""Judges: rate (prompt, response, rule) triples into s = P(Yes) − P(No) and a relevance.

- :mod:`.base`       the interface (Job, JobResult, Judge) every judge implements
- :mod:`.openai`     an LLM judge behind an OpenAI-compatible API (vLLM, SGLang, TGI, llama.cpp)
- :mod:`.embedded`   an offline judge built on the project's MiniLM encoder (JAX, lazy import)
- :mod:`.jaxlm`      an LLM judge in process on the project's JAX decoder (GGUF or safetensors)
- :mod:`.runner`     resumable rating of pairs into a rating store (``dynrules rate``)
- :mod:`.templates`  judge prompt templates; :mod:`.loopback` a local test server; :mod:`.bench`
"""

from __future__ import annotations

import os
from typing import Literal, get_args

from dynrules.engine.judges.base import Job, JobResult, Judge, JudgeAborted, Rating
from dynrules.engine.pool import RulePool
from dynrules.errors import DynrulesError

JudgeKind = Literal["embedded", "openai", "jax"]
JUDGES: tuple[JudgeKind, ...] = get_args(JudgeKind)

__all__ = [
    "JUDGES",
    "JudgeKind",
    "Job",
    "JobResult",
    "Judge",
    "JudgeAborted",
    "Rating",
    "make_judge",
]


def make_judge(
    kind: str,
    pool: RulePool,
    *,
    base_url: str | None = None,
    model: str | None = None,
    api_key_env: str | None = None,
    require_key: bool = False,
    **options,
) -> Judge:
    """A judge by name. ``openai`` needs base_url and model; its key is read from ``api_key_env``
    (absent is fine for local servers unless ``require_key``). ``jax`` needs model, a path.
    Other options go to the judge."""
    if kind == "jax":
        from dynrules.engine.judges.jaxlm import JaxJudge

        if not model:
            raise DynrulesError("the jax judge needs --model (a .gguf file or a model directory)")
        return JaxJudge(pool, model=model, **options)
    if kind == "embedded":
        from dynrules.engine.judges.embedded import EmbeddedJudge

        return EmbeddedJudge(pool, **options)
    if kind == "openai":
        from dynrules.engine.judges.openai import OpenAIJudge

        if not base_url or not model:
            raise DynrulesError("the openai judge needs --base-url and --model")
        api_key = os.environ.get(api_key_env) if api_key_env else None
        if require_key and not api_key:
            raise DynrulesError(
                f"environment variable {api_key_env} is not set (it should hold the API key)"
            )
        return OpenAIJudge(pool, base_url=base_url, model=model, api_key=api_key, **options)
    raise DynrulesError(f"unknown judge {kind!r}; choose one of {', '.join(JUDGES)}")
