"""The judge's section of the configuration tree (``judge.*``): which judge, and its settings.

Every default is the judge's own (the constants of :mod:`.openai` and :mod:`.templates`), so the
command line and the library cannot disagree. A setting of one judge given for another is an
error (``judge.top_logprobs`` with the embedded judge), not silently ignored.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from dynrules.engine.judges import JudgeKind
from dynrules.engine.judges.openai import (
    DEFAULT_API_KEY_ENV,
    DEFAULT_ENDPOINT,
    DEFAULT_MAX_RETRIES,
    DEFAULT_TIMEOUT,
    DEFAULT_TOP_LOGPROBS,
    Endpoint,
)
from dynrules.engine.judges.templates import DEFAULT_TEMPLATE
from dynrules.models.choices import Dtype
from dynrules.settings import MeshText, option, section

_OPENAI = ("kind", ("openai",))
_JAX = ("kind", ("jax",))
_LLM = ("kind", ("openai", "jax"))


@section(frozen=True)
class JudgeConfig:
    """Which judge rates the pairs, and how (``dynrules rate`` and ``dynrules pipeline``)."""

    kind: JudgeKind = option(
        "embedded",
        "Offline embedded judge, an LLM behind an OpenAI-compatible API, or an LLM in process "
        "on JAX (a Llama-family instruct model).",
        flag="judge",
    )
    base_url: str | None = option(
        None, "API root of the openai judge, e.g. http://localhost:8000/v1.", applies=_OPENAI
    )
    model: str | None = option(
        None,
        "openai judge: the model name served at --base-url; jax judge: a .gguf file or a "
        "Hugging Face model directory.",
        applies=_LLM,
    )
    api_key_env: str | None = option(
        None,
        f"Environment variable holding the API key [default: {DEFAULT_API_KEY_ENV}, used if set]; "
        "a variable named here must be set. The key is never printed or stored.",
        applies=_OPENAI,
    )
    endpoint: Endpoint = option(
        DEFAULT_ENDPOINT,
        "completions batches several rule questions per request; chat sends one per request "
        "and renders the model's chat template (the one for an instruct judge).",
        applies=_OPENAI,
    )
    prompts_per_request: Annotated[int, Field(ge=1)] | None = option(
        None,
        "Questions per completions request [default: 64, or 1 once the server refuses lists].",
        applies=_OPENAI,
    )
    top_logprobs: Annotated[int, Field(ge=1)] = option(
        DEFAULT_TOP_LOGPROBS,
        "Top answer tokens asked for (vLLM and OpenAI allow at most 20).",
        applies=_OPENAI,
    )
    template: str = option(
        DEFAULT_TEMPLATE,
        "'default' (conversation first, rule last), 'question-last' (the instructions after "
        "the rule: the default before 2026-12), 'published-order' (rule first) or a file with "
        "{prompt}, {response}, {rule}.",
        applies=_LLM,
    )
    concurrency: Annotated[int, Field(ge=1)] | None = option(
        None,
        "Requests in flight (openai judge) [default: 16, or 1 once the server is found to take "
        "one prompt per request]; with one question a request, each stream rates a pair at a time.",
        applies=_OPENAI,
    )
    timeout: Annotated[float, Field(gt=0)] = option(
        DEFAULT_TIMEOUT, "Seconds per request before a retry (openai judge).", applies=_OPENAI
    )
    max_retries: Annotated[int, Field(ge=0)] = option(
        DEFAULT_MAX_RETRIES, "Retries per request on 429/5xx/timeouts.", applies=_OPENAI
    )
    dtype: Dtype = option(
        "float32", "Compute dtype of the jax judge.", flag="judge-dtype", applies=_JAX
    )
    mesh: MeshText | None = option(
        None,
        "Spread the jax judge over the devices: axis sizes like fsdp=4,tensor=2 (data takes "
        "the rest), by the reward model's sharding rules [default: one device].",
        flag="judge-mesh",
        applies=_JAX,
    )

    def judge_options(self) -> dict:
        """The keywords of :func:`dynrules.engine.judges.make_judge` for this judge (all but a
        device layout, which the caller builds from ``mesh``)."""
        key = {
            "api_key_env": self.api_key_env or DEFAULT_API_KEY_ENV,
            "require_key": self.api_key_env is not None,
        }
        if self.kind == "openai":
            return key | dict(
                base_url=self.base_url,
                model=self.model,
                endpoint=self.endpoint,
                prompts_per_request=self.prompts_per_request,
                top_logprobs=self.top_logprobs,
                template=self.template,
                concurrency=self.concurrency,
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        if self.kind == "jax":
            return dict(model=self.model, template=self.template, dtype=self.dtype)
        return {}
