"""Text templates: how a (prompt, response) becomes the one text a reward model reads.

The template (:func:`format_text`, named ``hh-v1``) renders prompt + response as an HH
transcript, the format the HH data already has, so both record kinds reach the encoder the
same way::

    "\\n\\nHuman: {prompt}\\n\\nAssistant: {response}"

A prompt that is already a transcript (starts with "Human:") is kept as is, the response
appended as the next Assistant turn; an empty prompt means the response is a whole
transcript. Long texts are truncated from the start by the tokenizer, so the response end
survives.
"""

from __future__ import annotations

import functools
import re

from dynrules.errors import DynrulesError

TEMPLATE = "hh-v1"


def format_text(prompt: str, response: str) -> str:
    """Prompt + response as one HH-style transcript (template ``hh-v1``, see module doc)."""
    if not prompt:
        return response
    stripped = prompt.rstrip()
    if stripped.lstrip().startswith("Human:"):
        if stripped.endswith("Assistant:"):
            return f"{stripped} {response.lstrip()}"
        return f"{stripped}\n\nAssistant: {response}"
    return f"\n\nHuman: {prompt}\n\nAssistant: {response}"


# --------------------------------------------------------------------------- chat templates

CHAT = "chat"  # the model's own chat template (decoders)
FIXED_DATE = (2024, 7, 26)  # what a template's strftime_now sees: rendering never depends on today
_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def transcript_messages(prompt: str, response: str) -> list[dict[str, str]]:
    """(prompt, response) as chat messages; HH transcripts are split into their turns.

    The text is put in the ``hh-v1`` form (:func:`format_text`) and cut at every
    "\\n\\nHuman:" / "\\n\\nAssistant:" marker, so a multi-turn prompt keeps its turns and
    the response is the last assistant message. A text without markers (no prompt, a bare
    response) is one assistant message.
    """
    text = format_text(prompt, response)
    if text.lstrip().startswith(("Human:", "Assistant:")):
        text = "\n\n" + text.lstrip()
    parts = _TURN.split(text)
    if len(parts) == 1:
        return [{"role": "assistant", "content": text}]
    messages = [{"role": "user", "content": parts[0]}] if parts[0].strip() else []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content})
    return messages


class ChatTemplate:
    """A Hugging Face / GGUF chat template (Jinja), rendered in a sandbox as transformers does.

    ``render(prompt, response)`` gives the conversation [user: prompt, assistant: response]
    (more turns for HH transcripts) without a generation prompt: the text a reward model
    scores. ``strftime_now`` returns a fixed date, so a text renders the same every day.
    """

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = ""):
        import datetime

        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.datetime(*FIXED_DATE).strftime(fmt)
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise DynrulesError(f"chat template does not parse: {exc}") from exc

    def render_messages(
        self, messages: list[dict[str, str]], *, generation_prompt: bool = False
    ) -> str:
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except TemplateError as exc:
            raise DynrulesError(f"chat template failed: {exc}") from exc

    def render(self, prompt: str, response: str) -> str:
        return self.render_messages(transcript_messages(prompt, response))

    def user_turn(self, prompt: str) -> str | None:
        """The user message of ``prompt`` if ``prompt`` is this template's rendering of one user
        turn with the generation prompt (what an RL trainer sends after applying the policy's
        chat template), else None."""
        before, after = self._around_user_message
        if (
            len(prompt) >= len(before) + len(after)
            and prompt.startswith(before)
            and prompt.endswith(after)
        ):
            return prompt[len(before) : len(prompt) - len(after)]
        return None

    @functools.cached_property
    def _around_user_message(self) -> tuple[str, str]:
        """What this template puts before and after a lone user message (generation prompt on):
        rendered once, not per query."""
        marker = "\x00user-message\x00"
        rendered = self.render_messages(
            [{"role": "user", "content": marker}], generation_prompt=True
        )
        before, _, after = rendered.partition(marker)
        return before, after
