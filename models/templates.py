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
