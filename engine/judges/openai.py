"""An LLM judge behind an OpenAI-compatible API (vLLM, SGLang, TGI, llama.cpp, OpenAI).

For each (prompt, response, rule) the judge renders a template (see :mod:`.templates`), asks
for one token (``max_tokens`` 1, temperature 0) with its top log-probabilities, and reads the
answer distribution:

- ``/v1/completions`` (default): ``logprobs: N``; the prompts of one pair (both responses,
  up to ``prompts_per_request`` rule questions) go in one request as a list of prompts, which
  the server batches and, with the default template, serves from its prefix cache;
- ``/v1/chat/completions``: ``logprobs: true, top_logprobs: N``; one request per question
  (the chat API takes one conversation per request).

Tokenizers spell the answers differently ("Yes", " Yes", "yes", "▁Yes"; "Irrelevant" is often
split, e.g. " Ir" + "relevant"), so every top token is normalised (markers and whitespace
stripped, lower-cased) and counted as Yes, No or Irrelevant when it is that word, or for
Irrelevant a prefix of it of at least two letters. Probabilities are summed per answer and
normalised over the three: s = P(yes) − P(no), relevance = 1 − P(irrelevant). An answer with
none of the three among its top tokens, or with no log-probabilities at all, is a failure with
that reason, never a score.

Transport: one ``httpx.AsyncClient`` with keep-alive, at most ``concurrency`` requests in
flight, a timeout per request, and retries with exponential backoff (with jitter) on 429, 5xx,
timeouts and connection errors; a ``Retry-After`` header sets the wait instead. Rejected
credentials (401/403) or an unknown endpoint/model (404) stop the run at once;
``max_consecutive_failures`` failed requests in a row stop it with the last reason. The API
key is read from an environment variable by the caller and is only ever put in the
Authorization header: it is not printed, logged or recorded.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator

import httpx
import numpy as np

from dynrules.engine.judges.base import Job, JobResult, Judge, JudgeAborted
from dynrules.engine.judges.templates import Template, load_template
from dynrules.engine.pool import RulePool
from dynrules.errors import DynrulesError

ENDPOINTS = {"completions": "/completions", "chat": "/chat/completions"}
YES, NO, IRRELEVANT = 0, 1, 2
_MARKERS = "▁Ġ"  # SentencePiece / byte-level BPE word markers some servers leave in tokens
RETRY_AFTER_CAP = 300.0  # seconds: longest Retry-After honoured as given
_FINISHED = object()


def answer_class(token: str) -> int | None:
    """YES, NO, IRRELEVANT or None for one answer token, across tokenizer spellings."""
    word = token.strip().lstrip(_MARKERS).strip().lower().rstrip(".")
    if word == "yes":
        return YES
    if word == "no":
        return NO
    if len(word) >= 2 and "irrelevant".startswith(word):
        return IRRELEVANT
    return None


def rating_from_top_logprobs(top: list[tuple[str, float]]) -> tuple[float, float] | str:
    """(s, relevance) from the answer token's (token, logprob) list, or the reason there is none.

    Tokens are listed, not keyed, because two token ids can decode to the same string and
    both carry probability mass.
    """
    mass = [0.0, 0.0, 0.0]
    for token, logprob in top:
        kind = answer_class(token)
        if kind is None:
            continue
        if not isinstance(logprob, (int, float)) or math.isnan(logprob) or logprob > 1e-6:
            return f"invalid log-probability {logprob!r} for token {token!r}"
        mass[kind] += math.exp(logprob)
    total = sum(mass)
    if total <= 0.0:
        seen = ", ".join(repr(t) for t, _ in top[:5]) or "none"
        return f"no Yes/No/Irrelevant among the top answer tokens (top: {seen})"
    return (mass[YES] - mass[NO]) / total, 1.0 - mass[IRRELEVANT] / total


def _top_of_completion_choice(choice: dict) -> list[tuple[str, float]] | str:
    logprobs = choice.get("logprobs")
    if not isinstance(logprobs, dict):
        return "answer has no logprobs (does the server support logprobs on /v1/completions?)"
    top = logprobs.get("top_logprobs")
    if isinstance(top, list) and top and isinstance(top[0], dict):
        pairs = list(top[0].items())
        tokens, values = logprobs.get("tokens"), logprobs.get("token_logprobs")
        if (
            isinstance(tokens, list)
            and isinstance(values, list)
            and tokens
            and values
            and tokens[0] not in top[0]
        ):
            pairs.append((tokens[0], values[0]))  # the sampled token, if the top list omits it
        return pairs
    content = logprobs.get("content")  # some servers answer completions in the chat shape
    if isinstance(content, list) and content:
        return _top_of_chat_content(content)
    return "answer has no top_logprobs for the first token"


def _top_of_chat_content(content) -> list[tuple[str, float]] | str:
    if not isinstance(content, list) or not content or not isinstance(content[0], dict):
        return "answer has no logprobs content (does the server support logprobs on chat?)"
    first = content[0]
    top = [
        (e["token"], e.get("logprob"))
        for e in first.get("top_logprobs") or []
        if isinstance(e, dict) and isinstance(e.get("token"), str)
    ]
    if isinstance(first.get("token"), str) and all(t != first["token"] for t, _ in top):
        top.append(
            (first["token"], first.get("logprob"))
        )  # the sampled token, if the list omits it
    return top or "answer has no top_logprobs for the first token"


def retry_after_seconds(value: str | None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class OpenAIJudge(Judge):
    """LLM judge over an OpenAI-compatible HTTP API (see the module docstring)."""

    def __init__(
        self,
        pool: RulePool,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        endpoint: str = "completions",
        template: Template | str | None = None,
        concurrency: int = 16,
        prompts_per_request: int = 64,
        top_logprobs: int = 5,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        max_consecutive_failures: int = 20,
    ):
        if endpoint not in ENDPOINTS:
            raise DynrulesError(
                f"unknown endpoint {endpoint!r}; choose one of {', '.join(ENDPOINTS)}"
            )
        if concurrency < 1 or prompts_per_request < 2 or max_retries < 0 or timeout <= 0:
            raise DynrulesError(
                "need concurrency >= 1, prompts_per_request >= 2, max_retries >= 0, timeout > 0"
            )
        self.pool = pool
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint = endpoint
        self.template = template if isinstance(template, Template) else load_template(template)
        self.concurrency = concurrency
        self.prompts_per_request = prompts_per_request
        self.top_logprobs = top_logprobs
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_consecutive_failures = max_consecutive_failures
        # A pair job asks two responses per rule; chat jobs stay small so cells commit steadily.
        self.rules_per_job = max(1, prompts_per_request // 2) if endpoint == "completions" else 8
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._rule_texts = pool.texts

    @property
    def identity(self) -> dict:
        return {"judge": f"openai-{self.endpoint}:{self.model}", "template": self.template.identity}

    def __repr__(self) -> str:  # never shows the key
        return f"OpenAIJudge(base_url={self.base_url!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    # -- the synchronous face: a background event loop feeding a queue --------------------------

    def rate_jobs(self, jobs: Iterable[Job]) -> Iterator[JobResult]:
        results: queue.Queue = queue.Queue()
        stop = threading.Event()
        running: dict = {}
        thread = threading.Thread(
            target=self._run,
            args=(iter(jobs), results, stop, running),
            daemon=True,
            name="openai-judge",
        )
        thread.start()
        try:
            while True:
                item = results.get()
                if item is _FINISHED:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            # The consumer stopped (done, failed or interrupted): cancel requests still in flight
            # rather than wait out their timeouts and retries.
            stop.set()
            if "task" in running:
                try:
                    running["loop"].call_soon_threadsafe(running["task"].cancel)
                except RuntimeError:
                    pass  # the loop has already finished
            thread.join()

    def _run(
        self, jobs: Iterator[Job], results: queue.Queue, stop: threading.Event, running: dict
    ) -> None:
        loop = asyncio.new_event_loop()
        try:
            task = loop.create_task(self._rate_all(jobs, results.put, stop))
            running.update(loop=loop, task=task)
            loop.run_until_complete(task)
        except asyncio.CancelledError:
            results.put(_FINISHED)
        except BaseException as exc:  # handed to the consumer's thread, raised there
            results.put(exc)
        else:
            results.put(_FINISHED)
        finally:
            loop.close()

    async def _rate_all(self, jobs: Iterator[Job], emit, stop: threading.Event) -> None:
        limits = httpx.Limits(
            max_connections=self.concurrency, max_keepalive_connections=self.concurrency
        )
        self._semaphore = asyncio.Semaphore(self.concurrency)
        self._consecutive_failures = 0
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            limits=limits,
            timeout=httpx.Timeout(self.timeout),
        ) as client:

            async def worker():
                # All workers run on this one thread, so pulling from the iterator is safe.
                while not stop.is_set():
                    job = next(jobs, None)
                    if job is None:
                        return
                    result = await self._rate_job(client, job)
                    emit(result)
                    self._track(result)

            workers = [asyncio.create_task(worker()) for _ in range(self.concurrency)]
            try:
                await asyncio.gather(*workers)
            finally:
                for task in workers:
                    task.cancel()
                await asyncio.gather(*workers, return_exceptions=True)

    # -- one job ---------------------------------------------------------------------------------

    def _questions(self, job: Job) -> list[str]:
        # Response-major: the questions of one response share the conversation prefix.
        return [
            self.template.render(job.prompt, response, self._rule_texts[rule])
            for response in job.responses
            for rule in job.rules.tolist()
        ]

    async def _rate_job(self, client: httpx.AsyncClient, job: Job) -> JobResult:
        questions = self._questions(job)
        if self.endpoint == "completions":
            answers = []
            for start in range(0, len(questions), self.prompts_per_request):
                answers += await self._ask_completions(
                    client, questions[start : start + self.prompts_per_request]
                )
        else:
            answers = await asyncio.gather(*(self._ask_chat(client, q) for q in questions))
        n_rules = len(job.rules)
        scores = np.full((len(job.responses), n_rules), np.nan, np.float32)
        relevance = scores.copy()
        errors: list[str | None] = [None] * n_rules
        for position, answer in enumerate(answers):
            side, column = divmod(position, n_rules)
            if isinstance(answer, str):
                errors[column] = errors[column] or answer
            else:
                scores[side, column], relevance[side, column] = answer
        for column, error in enumerate(errors):
            if error is not None:  # a cell is rated on both responses or not at all
                scores[:, column] = relevance[:, column] = np.nan
        return JobResult(job, scores, relevance, errors)

    def _track(self, result: JobResult) -> None:
        """Count jobs in a row with no rated cell; stop the run when there are too many."""
        if result.ok.any():
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.max_consecutive_failures:
            raise JudgeAborted(
                f"aborting: {self._consecutive_failures} requests in a row to {self.base_url} "
                f"failed; last: {result.errors[0]}"
            )

    async def _ask_completions(self, client, prompts: list[str]) -> list[tuple[float, float] | str]:
        payload = {
            "model": self.model,
            "prompt": prompts,
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.top_logprobs,
        }
        body = await self._post(client, ENDPOINTS["completions"], payload)
        if isinstance(body, str):
            return [body] * len(prompts)
        choices = body.get("choices") if isinstance(body, dict) else None
        if not isinstance(choices, list):
            return ["malformed answer: no 'choices' list"] * len(prompts)
        answers: list[tuple[float, float] | str] = ["answer missing for this prompt"] * len(prompts)
        for position, choice in enumerate(choices):
            if not isinstance(choice, dict):
                continue
            index = choice.get("index", position)
            if isinstance(index, int) and 0 <= index < len(prompts):
                top = _top_of_completion_choice(choice)
                answers[index] = top if isinstance(top, str) else rating_from_top_logprobs(top)
        return answers

    async def _ask_chat(self, client, question: str) -> tuple[float, float] | str:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        body = await self._post(client, ENDPOINTS["chat"], payload)
        if isinstance(body, str):
            return body
        try:
            logprobs = body["choices"][0].get("logprobs")
        except (KeyError, IndexError, TypeError, AttributeError):
            return "malformed answer: no choices[0]"
        if not isinstance(logprobs, dict):
            return "answer has no logprobs (does the server support logprobs on chat?)"
        top = _top_of_chat_content(logprobs.get("content"))
        return top if isinstance(top, str) else rating_from_top_logprobs(top)

    async def _post(self, client: httpx.AsyncClient, path: str, payload: dict) -> dict | str:
        """The decoded JSON answer, or the reason there is none after retries."""
        delay, attempt = self.backoff, 0
        while True:
            attempt, wait = attempt + 1, None
            try:
                async with self._semaphore:
                    response = await client.post(path, json=payload)
            except httpx.TimeoutException:
                reason = f"no answer within {self.timeout:g} s"
            except httpx.TransportError as exc:
                reason = f"connection error: {type(exc).__name__}: {exc}"
            else:
                status = response.status_code
                if status == 200:
                    try:
                        return response.json()
                    except ValueError:
                        return "malformed answer: not JSON"
                reason = f"HTTP {status}: {response.text[:200]!r}"
                if status in (401, 403):
                    raise JudgeAborted(
                        f"{self.base_url}{path} rejected the request (HTTP {status}): "
                        "check the API key environment variable"
                    )
                if status == 404:
                    raise JudgeAborted(
                        f"{self.base_url}{path} answered 404: check --base-url, --endpoint "
                        f"and --model ({response.text[:200]!r})"
                    )
                if status != 429 and status < 500:
                    return reason  # the request itself is bad (for example too long): not retried
                wait = retry_after_seconds(response.headers.get("retry-after"))
            if attempt > self.max_retries:
                return f"{reason} (gave up after {attempt} attempts)"
            if wait is None:
                wait = min(delay, self.max_backoff) * random.uniform(0.5, 1.0)
                delay *= 2
            else:
                wait = min(wait, RETRY_AFTER_CAP)  # the server's word, within reason
            await asyncio.sleep(wait)
