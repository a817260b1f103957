"""An in-process LLM judge: a Llama-family instruct model on the project's own JAX decoder.

``dynrules rate --judge jax --model PATH`` (PATH a GGUF file or a Hugging Face safetensors
directory) rates where the reward model trains, on CPU, GPU or TPU, without an inference
server beside the job.

The question is the one the OpenAI client sends to a chat endpoint: the template (see
:mod:`.templates`; conversation first, rule last) rendered as a user message through the
model's chat template with the generation prompt (raw text for a model without one). The
score is the published one, read at the answer position from the LM head: probability mass
of every token spelling Yes, No or Irrelevant (:func:`.templates.answer_class`) summed over the
whole vocabulary, s = P(Yes) − P(No) and relevance = 1 − P(Irrelevant), normalised over the
three (a server's top log-probabilities approximate the same sums).

One pass for all rules of a response. The questions about one response differ only after the
conversation, so their tokens share a prefix (the longest common one, found on the token ids:
splitting the text instead would let the tokenizer merge differently at the seam). A batch
encodes each of its conversations once and continues it with rows of its questions (as many
as fit in ``row_tokens``), each question a segment that sees the conversation and itself, its
positions continuing after it (models.answers, :meth:`LlamaDecoder.after_prefixes`). Its scores
equal one forward pass per question (≤ 1e-4 in float32, tested); ``one_pass=False`` runs that
per-question pass, the baseline of ``dynrules bench judge-local``.

Scores are deterministic for a given batch layout; XLA may round differently when a resumed run
puts a response in a batch of another shape (a few ulps, far below the selection's scale). A
question longer than ``max_tokens`` is not truncated: its cells fail with the reason.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from dynrules.engine.judges.base import Job, JobResult, Judge
from dynrules.engine.judges.templates import answer_class, load_template, rating_from_masses
from dynrules.engine.pool import RulePool
from dynrules.errors import DynrulesError
from dynrules.models.tokenizer import bucket_for, length_buckets

# A row: questions about one conversation, which is encoded once a batch and continued by its
# rows. Narrow rows keep the [row, prefix + row] attention scores in cache and pad less: on a
# 2-core CPU with SmolLM2-135M, PyRIT pairs (~190-token conversations) and 100 rules (~27
# tokens each), rows of 192 / 256 / 384 / 512 tokens rated 30.8 / 29.8 / 27.4 / 25.1 ratings/s.
ROW_TOKENS = 256
BATCH_TOKENS = 4096  # question tokens a forward pass: 4096 beat 2048 and 8192 by ~10% there
MAX_TOKENS = 4096  # the longest question rated (the model's context if shorter)
JOBS_PER_CHUNK = 8  # pairs planned together, so short jobs (k-rule plans) still fill batches


@dataclasses.dataclass
class _Question:
    job: int  # index in the chunk
    side: int  # which response
    column: int  # which of the job's rules
    ids: np.ndarray


@dataclasses.dataclass
class _Row:
    """Questions about one conversation: their tokens after the ``prefix`` they share."""

    prefix: np.ndarray
    questions: list[_Question]
    suffixes: list[np.ndarray]

    @property
    def tokens(self) -> int:
        return sum(len(s) for s in self.suffixes)


def shared_prefix_length(questions: list[np.ndarray]) -> int:
    """Tokens that every question starts with, leaving each at least one token of its own."""
    length = min(len(q) for q in questions) - 1
    first = questions[0]
    for other in questions[1:]:
        differ = np.flatnonzero(first[:length] != other[:length])
        if differ.size:
            length = int(differ[0])
    return max(length, 0)


def pack_questions(prefix: np.ndarray, questions: list[_Question], row_tokens: int) -> list[_Row]:
    """Rows of questions in order, their tokens after ``prefix``, each row at most ``row_tokens``
    unless a single question needs more."""
    rows: list[_Row] = []
    for question in questions:
        suffix = question.ids[len(prefix) :]
        if not rows or rows[-1].tokens + len(suffix) > row_tokens:
            rows.append(_Row(prefix, [], []))
        rows[-1].questions.append(question)
        rows[-1].suffixes.append(suffix)
    return rows


def row_arrays(
    rows: list[_Row], shape: tuple[int, int], slots: int, prefixes: tuple[int, int], pad_id: int
) -> dict:
    """The batch of models.answers.shared_prefix_masses: ``shape`` (rows, width) of questions,
    ``prefixes`` (count, width) of the distinct conversations they continue; filler rows and
    prefixes are padding."""
    n_prefixes, span = prefixes
    batch = {
        "prefix_ids": np.full((n_prefixes, span), pad_id, np.int32),
        "prefix_lengths": np.zeros(n_prefixes, np.int32),
        "ids": np.full(shape, pad_id, np.int32),
        "segments": np.zeros(shape, np.int32),
        "positions": np.zeros(shape, np.int32),
        "prefix_of_row": np.zeros(shape[0], np.int32),
        "answer_at": np.zeros((shape[0], slots), np.int32),
    }
    index: dict[int, int] = {}
    for r, row in enumerate(rows):
        p = index.setdefault(id(row.prefix), len(index))
        batch["prefix_ids"][p, : len(row.prefix)] = row.prefix
        batch["prefix_lengths"][p] = len(row.prefix)
        batch["prefix_of_row"][r] = p
        offset = 0
        for q, suffix in enumerate(row.suffixes):
            span_q = slice(offset, offset + len(suffix))
            batch["ids"][r, span_q] = suffix
            batch["segments"][r, span_q] = q + 1
            batch["positions"][r, span_q] = np.arange(
                len(row.prefix), len(row.prefix) + len(suffix)
            )
            batch["answer_at"][r, q] = offset + len(suffix) - 1
            offset += len(suffix)
    return batch


def _pow2(count: int) -> int:
    """The next power of two (few compiled shapes)."""
    return 1 << (count - 1).bit_length()


class JaxJudge(Judge):
    """A decoder LM judge in process (see the module docstring). ``layout`` shards the model
    over a mesh (models.answers.AnswerModel; train.sharding.MeshLayout makes one)."""

    def __init__(
        self,
        pool: RulePool,
        *,
        model: str | Path,
        template: str | None = None,
        dtype: str = "float32",
        one_pass: bool = True,
        row_tokens: int = ROW_TOKENS,
        batch_tokens: int = BATCH_TOKENS,
        max_tokens: int = MAX_TOKENS,
        layout=None,
    ):
        from dynrules.models.answers import AnswerModel  # JAX: only when this judge is made

        if not Path(model).exists():
            raise DynrulesError(
                f"{model}: no such model (a .gguf file or a Hugging Face directory)"
            )
        self.pool = pool
        # rules_per_job: all (the default): a response's rules share one conversation prefix
        self.template = load_template(template)
        self.dtype, self.one_pass = dtype, one_pass
        self.row_tokens, self.batch_tokens = row_tokens, batch_tokens
        self.lm = AnswerModel(model, answer_class, dtype=dtype, layout=layout)
        self.max_tokens = min(max_tokens, self.lm.config.max_position_embeddings)
        # Padded widths of rows and conversations: few compiled shapes, < 1/3 padding.
        self._widths = length_buckets(max(self.max_tokens, row_tokens), smallest=64)
        self.lm.tokenizer.add_special_tokens = self.lm.chat_template is None
        self._rule_texts = pool.texts

    @property
    def identity(self) -> dict:
        config = json.dumps(self.lm.config.to_dict(), sort_keys=True).encode()
        fingerprint = hashlib.sha256(config).hexdigest()[:12]
        return {
            "judge": f"jax:{self.lm.path.name}:config-{fingerprint}:{self.dtype}",
            "template": self.template.identity,
        }

    def _width(self, tokens: int) -> int:
        return bucket_for(tokens, self._widths)

    def question(self, prompt: str, response: str, rule: str) -> str:
        """The text the model reads: the template as a chat user turn, generation prompt on."""
        text = self.template.render(prompt, response, rule)
        chat = self.lm.chat_template
        if chat is None:
            return text
        return chat.render_messages([{"role": "user", "content": text}], generation_prompt=True)

    def rate_jobs(self, jobs: Iterable[Job]) -> Iterator[JobResult]:
        chunk: list[Job] = []
        for job in jobs:
            chunk.append(job)
            if len(chunk) == JOBS_PER_CHUNK:
                yield from self._rate_chunk(chunk)
                chunk = []
        if chunk:
            yield from self._rate_chunk(chunk)

    def _rate_chunk(self, jobs: list[Job]) -> Iterator[JobResult]:
        texts, where = [], []
        for j, job in enumerate(jobs):
            for side, response in enumerate(job.responses):
                for column, rule in enumerate(job.rules.tolist()):
                    texts.append(self.question(job.prompt, response, self._rule_texts[rule]))
                    where.append((j, side, column))
        encoded = self.lm.tokenizer.encode(texts, self.max_tokens + 1).ids
        masses = [np.zeros((len(job.responses), len(job.rules), 3)) for job in jobs]
        errors: list[list[str | None]] = [[None] * len(job.rules) for job in jobs]
        questions: dict[tuple[int, int], list[_Question]] = {}
        for (j, side, column), ids in zip(where, encoded, strict=True):
            if len(ids) > self.max_tokens:
                errors[j][column] = (
                    f"question longer than the judge's max_tokens ({self.max_tokens}); not truncated"
                )
            else:
                questions.setdefault((j, side), []).append(_Question(j, side, column, ids))
        rated = self._shared(questions) if self.one_pass else self._separate(questions)
        for question, mass in rated:
            masses[question.job][question.side, question.column] = mass
        for j, job in enumerate(jobs):
            yield self._result(job, masses[j], errors[j])

    def _result(self, job: Job, masses: np.ndarray, errors: list[str | None]) -> JobResult:
        shape = masses.shape[:2]
        scores = np.full(shape, np.nan, np.float32)
        relevance = np.full(shape, np.nan, np.float32)
        for column in range(shape[1]):
            cell = masses[:, column]
            if errors[column] is None and not (np.isfinite(cell).all() and (cell.sum(1) > 0).all()):
                errors[column] = "the model gave no finite probability to Yes, No or Irrelevant"
            if errors[column] is None:
                for side in range(shape[0]):
                    scores[side, column], relevance[side, column] = rating_from_masses(*cell[side])
        return JobResult(job, scores, relevance, errors)

    def _shared(self, questions: dict) -> Iterator[tuple[_Question, np.ndarray]]:
        """Rows of one conversation's questions, a batch holding the rows of whole conversations
        (each conversation is encoded once a batch) up to ``batch_tokens`` of questions."""
        batches: list[list[_Row]] = [[]]
        for group in questions.values():
            prefix = group[0].ids[: shared_prefix_length([q.ids for q in group])]
            rows = pack_questions(prefix, group, self.row_tokens)
            most = max(1, self.batch_tokens // self._width(max(r.tokens for r in rows)))
            for start in range(0, len(rows), most):  # a long rule list spans several batches
                pending = batches[-1] + rows[start : start + most]
                if (
                    batches[-1]
                    and self._width(max(r.tokens for r in pending)) * len(pending)
                    > self.batch_tokens
                ):
                    batches.append(rows[start : start + most])
                else:
                    batches[-1] = pending
        for rows in filter(None, batches):
            prefixes = {id(row.prefix): row.prefix for row in rows}
            shape = (len(rows), self._width(max(row.tokens for row in rows)))
            spans = (_pow2(len(prefixes)), self._width(max(len(p) for p in prefixes.values())))
            slots = max(8, _pow2(max(len(row.questions) for row in rows)))
            batch = row_arrays(rows, shape, slots, spans, self.lm.tokenizer.pad_id)
            out = self.lm.shared_prefix(batch)
            for r, row in enumerate(rows):
                for q, question in enumerate(row.questions):
                    yield question, out[r, q]

    def _separate(self, questions: dict) -> Iterator[tuple[_Question, np.ndarray]]:
        flat = sorted((q for group in questions.values() for q in group), key=lambda q: len(q.ids))
        by_width: dict[int, list[_Question]] = {}
        for question in flat:
            by_width.setdefault(self._width(len(question.ids)), []).append(question)
        for width, group in by_width.items():
            per_batch = max(1, self.batch_tokens // width)
            for start in range(0, len(group), per_batch):
                part = group[start : start + per_batch]
                n_rows = min(per_batch, _pow2(len(part)))  # full, else a power of two
                ids = np.full((n_rows, width), self.lm.tokenizer.pad_id, np.int32)
                lengths = np.ones(n_rows, np.int32)  # filler rows: one token, dropped
                for r, question in enumerate(part):
                    ids[r, : len(question.ids)] = question.ids
                    lengths[r] = len(question.ids)
                out = self.lm.per_question(ids, lengths)
                yield from zip(part, out, strict=False)
