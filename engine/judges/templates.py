"""Judge prompt templates: a conversation, a reply and a rule rendered into one question.

A template holds the placeholders ``{prompt}``, ``{response}`` and ``{rule}`` (each exactly
once) and nothing else in braces is interpreted, so conversation text with braces is safe. The
question must invite a one-word answer: Yes, No or Irrelevant.

The default template puts the conversation first, then the instructions, and the rule last,
just before "Answer:". Everything but the rule is then the same for every rule of a response:
an inference server with a prefix cache (vLLM, SGLang, TGI, llama.cpp) computes it once per
response and reuses it for every rule of the pool, and the in-process judge (:mod:`.jaxlm`)
encodes it once a row; each rule costs only its own ~30 tokens. ``question-last`` (the default
before this one) puts the instructions after the rule, so they are recomputed for every rule
(~70 tokens each). The published ordering (rule first) changes the very first tokens with every
rule, so nothing can be reused: ``published-order`` is that ordering with our wording, kept for
comparison (``dynrules bench judge``), not the published text.
"""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from dynrules.errors import InputError

PLACEHOLDERS = ("prompt", "response", "rule")
YES, NO, IRRELEVANT = 0, 1, 2  # the answers a question invites
_MARKERS = "▁Ġ"  # SentencePiece / byte-level BPE word markers some tokenizers leave in tokens
_PLACEHOLDER = re.compile(r"\{(prompt|response|rule)\}")

_HEADER = "You are checking whether an AI assistant's reply to a conversation follows a rule.\n\n"
_CONVERSATION = "Conversation:\n{prompt}\n\nAssistant's reply:\n{response}\n\n"
_INSTRUCTIONS = (
    "Answer Yes if it follows the rule, No if it breaks the rule, or Irrelevant if the rule does "
    "not apply to this conversation. Answer with one word."
)
DEFAULT_TEMPLATE = "default"
BUILTIN = {
    DEFAULT_TEMPLATE: _HEADER
    + _CONVERSATION
    + "Does the assistant's reply follow the rule below? "
    + _INSTRUCTIONS
    + "\n\nRule: {rule}\nAnswer:",
    "question-last": _HEADER + _CONVERSATION + "Rule: {rule}\n\nDoes the assistant's reply "
    "follow the rule? " + _INSTRUCTIONS + "\nAnswer:",
    "published-order": _HEADER + "Rule: {rule}\n\n" + _CONVERSATION + "Does the assistant's "
    "reply follow the rule? " + _INSTRUCTIONS + "\nAnswer:",
}


@dataclass(frozen=True)
class Template:
    name: str
    text: str

    def __post_init__(self):
        found = _PLACEHOLDER.findall(self.text)
        for name in PLACEHOLDERS:
            if found.count(name) != 1:
                raise InputError(
                    f"template must contain {{{name}}} exactly once (found {found.count(name)})",
                    path=self.name,
                    field=name,
                )

    @functools.cached_property
    def _pieces(self) -> list[str]:
        """Literal pieces between placeholders, and the placeholder order, for fast rendering."""
        return _PLACEHOLDER.split(self.text)

    @property
    def identity(self) -> str:
        """Name and content hash, recorded in the store's manifest."""
        return f"{self.name} sha256:{hashlib.sha256(self.text.encode()).hexdigest()[:16]}"

    def render(self, prompt: str, response: str, rule: str) -> str:
        values = {"prompt": prompt, "response": response, "rule": rule}
        pieces = self._pieces
        return "".join(piece if i % 2 == 0 else values[piece] for i, piece in enumerate(pieces))


def load_template(source: str | None = None) -> Template:
    """A builtin template by name (:data:`BUILTIN`) or a template file."""
    source = source or DEFAULT_TEMPLATE
    if source in BUILTIN:
        return Template(source, BUILTIN[source])
    path = Path(source)
    if not path.is_file():
        raise InputError(
            f"no such template file (builtin templates: {', '.join(BUILTIN)})", path=path
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read template: {exc}", path=path) from None
    return Template(str(path), text)


def answer_class(token: str) -> int | None:
    """YES, NO, IRRELEVANT or None for one answer token, across tokenizer spellings ("Yes",
    " Yes", "▁yes"; Irrelevant is often split, so any prefix of it of two letters or more)."""
    word = token.strip().lstrip(_MARKERS).strip().lower().rstrip(".")
    if word == "yes":
        return YES
    if word == "no":
        return NO
    if len(word) >= 2 and "irrelevant".startswith(word):
        return IRRELEVANT
    return None


def rating_from_masses(yes: float, no: float, irrelevant: float) -> tuple[float, float]:
    """(s, relevance) from the probability mass of each answer, normalised over the three:
    s = P(Yes) − P(No), relevance = 1 − P(Irrelevant). The masses must not all be 0."""
    total = yes + no + irrelevant
    return (yes - no) / total, 1.0 - irrelevant / total
