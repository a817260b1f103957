"""An LLM judge behind an OpenAI-compatible API (vLLM, SGLang, TGI, llama.cpp, OpenAI).

For each (prompt, response, rule) the judge renders a template (see :mod:`.templates`), asks
for one token (``max_tokens`` 1, temperature 0) with its top log-probabilities, and reads the
answer distribution:

- ``/v1/completions`` (default): ``logprobs: N``; the questions of one pair (both responses,
  up to ``prompts_per_request`` of them) go in one request as a list of prompts, which the
  server batches and, with the default template, serves from its prefix cache;
- ``/v1/chat/completions``: ``logprobs: true, top_logprobs: N``; one question per request (the
  chat API takes one conversation per request); the server renders the model's chat template.

Request shapes. Servers differ in what they accept, and the client learns it from the server
instead of failing every cell: llama.cpp's Python server takes one prompt per completions
request and answers a list of several with HTTP 500. When a multi-prompt request is refused
(a 4xx, or the same 5xx twice), the first of its prompts alone is answered and the list is
refused again, the client sends one prompt per request from then on and says so once (a log
warning). Until the first question has been rated, one stream runs alone, a refused request
fails the rest of its job without asking, and a refusal that repeats for a second pair stops
the run at once with one line that says what failed and what to try (the other endpoint,
fewer prompts per request, the model name) instead of retrying a request that can never
succeed.

Request order. With one question per request, each of ``concurrency`` streams takes a whole
pair and asks every rule of response A back to back, then every rule of B: a server that reuses
only the previous request's prompt prefix (llama.cpp keeps one KV cache per slot) then
evaluates each conversation once instead of once per rule, provided it does not serve other
streams in between. llama.cpp's Python server evaluates one request at a time with one cache,
so when the client learns that a server refuses lists of prompts it also drops to one stream
(unless ``concurrency`` was given). A cell is handed on as soon as both of its questions are
answered, so finished cells are committed as they come.

Tokenizers spell the answers differently ("Yes", " Yes", "yes", "▁Yes"; "Irrelevant" is often
split, e.g. " Ir" + "relevant"), so every top token is normalised (markers and whitespace
stripped, lower-cased) and counted as Yes, No or Irrelevant when it is that word, or for
Irrelevant a prefix of it of at least two letters. Probabilities are summed per answer and
normalised over the three: s = P(yes) − P(no), relevance = 1 − P(irrelevant). Small models put
much of their mass on other tokens, so 20 top tokens are asked for by default (the most OpenAI
and vLLM allow). An answer with none of the three among its top tokens, or with no
log-probabilities at all, is a failure with that reason, never a score.

Transport: one ``httpx.AsyncClient`` with keep-alive, at most ``concurrency`` requests in
flight and a timeout per request. Transient failures (timeouts, connection errors, 408, 429,
502, 503, 504) are retried with exponential backoff (with jitter), or after ``Retry-After``
when the server sets it. Other 5xx answers are retried too, unless an attempt fails exactly as
the one before (same status and body): that request is refused as it is, and asking again
will not help. Other 4xx answers are not retried (the request itself is bad). Rejected
credentials (401/403) or an unknown endpoint/model (404) stop the run at once;
``max_consecutive_failures`` results in a row with no rated cell stop it with the last reason.
The API key is read from an environment variable by the caller and is only ever put in the
Authorization header: it is not printed, logged or recorded.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import logging
import math
import queue
import random
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import httpx
import numpy as np

from dynrules.engine.judges.base import Job, JobResult, Judge, JudgeAborted
from dynrules.engine.judges.templates import (
    Template,
    answer_class,
    load_template,
    rating_from_masses,
)
from dynrules.engine.pool import RulePool
from dynrules.errors import DynrulesError

log = logging.getLogger(__name__)

Endpoint = Literal["completions", "chat"]
ENDPOINTS: dict[Endpoint, str] = {"completions": "/completions", "chat": "/chat/completions"}
RETRY_AFTER_CAP = 300.0  # seconds: longest Retry-After honoured as given
TRANSIENT_STATUSES = frozenset({408, 429, 502, 503, 504})
DEFAULT_PROMPTS_PER_REQUEST = 64
DEFAULT_CONCURRENCY = 16
DEFAULT_TOP_LOGPROBS = 20
DEFAULT_ENDPOINT = "completions"
DEFAULT_TIMEOUT = 60.0  # seconds per request before a retry
DEFAULT_MAX_RETRIES = 5
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
_FINISHED = object()

Answer = tuple[float, float] | str  # (s, relevance), or the reason there is none


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
    if sum(mass) <= 0.0:
        seen = ", ".join(repr(t) for t, _ in top[:5]) or "none"
        return f"no Yes/No/Irrelevant among the top answer tokens (top: {seen})"
    return rating_from_masses(*mass)


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
    # (token, logprob): the logprob is checked by rating_from_top_logprobs (it may be missing).
    top: list[tuple[str, Any]] = [
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


@dataclasses.dataclass(frozen=True)
class _Refusal:
    """A request that got no usable answer."""

    reason: str
    repeatable: bool  # the server refuses this request as it is: asking again will not help


def _completion_answers(body: dict | _Refusal, n_prompts: int) -> list[Answer]:
    """One answer per prompt of a completions request, in prompt order."""
    if isinstance(body, _Refusal):
        return [body.reason] * n_prompts
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list):
        return ["malformed answer: no 'choices' list"] * n_prompts
    answers: list[Answer] = ["answer missing for this prompt"] * n_prompts
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", position)
        if isinstance(index, int) and 0 <= index < n_prompts:
            top = _top_of_completion_choice(choice)
            answers[index] = top if isinstance(top, str) else rating_from_top_logprobs(top)
    return answers


def _chat_answer(body: dict | _Refusal) -> Answer:
    if isinstance(body, _Refusal):
        return body.reason
    try:
        logprobs = body["choices"][0].get("logprobs")
    except (KeyError, IndexError, TypeError, AttributeError):
        return "malformed answer: no choices[0]"
    if not isinstance(logprobs, dict):
        return "answer has no logprobs (does the server support logprobs on chat?)"
    top = _top_of_chat_content(logprobs.get("content"))
    return top if isinstance(top, str) else rating_from_top_logprobs(top)


def _job_result(job: Job, answers: Sequence[Answer], columns: Sequence[int]) -> JobResult:
    """The result for ``columns`` (rule positions) of a job, from its response-major answers.

    A cell is rated on every response or not at all. When ``columns`` is a part of the job's
    rules, the result's job is that part (same row and texts, those rules).
    """
    n_rules, n_sides = len(job.rules), len(job.responses)
    scores = np.full((n_sides, len(columns)), np.nan, np.float32)
    relevance = scores.copy()
    errors: list[str | None] = [None] * len(columns)
    for k, column in enumerate(columns):
        for side in range(n_sides):
            answer = answers[side * n_rules + column]
            if isinstance(answer, str):
                errors[k] = errors[k] or answer
            else:
                scores[side, k], relevance[side, k] = answer
        if errors[k] is not None:
            scores[:, k] = relevance[:, k] = np.nan
    part = job if len(columns) == n_rules else dataclasses.replace(job, rules=job.rules[columns])
    return JobResult(part, scores, relevance, errors)


class OpenAIJudge(Judge):
    """LLM judge over an OpenAI-compatible HTTP API (see the module docstring).

    ``prompts_per_request`` (completions only) is where the client starts: None starts at 64
    and falls back to one prompt per request if the server refuses lists; 1 says so up front.
    ``concurrency`` None is 16 requests in flight, or one stream once the server is found to
    take one prompt per request (see the module docstring); a number is kept as given.
    """

    def __init__(
        self,
        pool: RulePool,
        *,
        base_url: str,
        model: str,
        api_key: str | None = None,
        endpoint: str = DEFAULT_ENDPOINT,
        template: Template | str | None = None,
        concurrency: int | None = None,
        prompts_per_request: int | None = None,
        top_logprobs: int = DEFAULT_TOP_LOGPROBS,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = DEFAULT_MAX_RETRIES,
        backoff: float = 0.5,
        max_backoff: float = 60.0,
        max_consecutive_failures: int = 20,
    ):
        if endpoint not in ENDPOINTS:
            raise DynrulesError(
                f"unknown endpoint {endpoint!r}; choose one of {', '.join(ENDPOINTS)}"
            )
        if endpoint == "chat" and prompts_per_request not in (None, 1):
            raise DynrulesError(
                "--prompts-per-request applies to --endpoint completions; chat sends one "
                "question per request"
            )
        if (
            (concurrency is not None and concurrency < 1)
            or (prompts_per_request is not None and prompts_per_request < 1)
            or top_logprobs < 1
            or max_retries < 0
            or timeout <= 0
        ):
            raise DynrulesError(
                "need concurrency >= 1, prompts_per_request >= 1, top_logprobs >= 1, "
                "max_retries >= 0, timeout > 0"
            )
        self.pool = pool
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.endpoint = endpoint
        self.template = template if isinstance(template, Template) else load_template(template)
        self.concurrency = concurrency or DEFAULT_CONCURRENCY  # streams now; may drop to 1
        self._concurrency_given = concurrency is not None
        self.top_logprobs = top_logprobs
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_consecutive_failures = max_consecutive_failures
        # Prompts per request now: learned from the server, so it can drop to 1 during a run.
        self.prompts_per_request = (
            1 if endpoint == "chat" else prompts_per_request or DEFAULT_PROMPTS_PER_REQUEST
        )
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._rule_texts = pool.texts

    @property
    def rules_per_job(self) -> int:
        # A multi-prompt job is one request (both responses); with one prompt per request a job
        # is a whole pair, asked conversation by conversation (the module docstring).
        if self.prompts_per_request > 1:
            return max(1, self.prompts_per_request // 2)
        return len(self.pool)

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
        self._consecutive_failures = 0
        # Until a question is rated, one stream runs alone (see the module docstring).
        self._working = False
        self._others_may_start = asyncio.Event()
        self._refused_pairs: dict[str, set[int]] = {}  # until then: refusal reason -> rows
        async with httpx.AsyncClient(
            base_url=self.base_url,
            headers=self._headers,
            limits=limits,
            timeout=httpx.Timeout(self.timeout),
        ) as client:

            async def stream(number: int):
                # All streams run on this one thread, so pulling from the iterator is safe.
                if number > 0:
                    await self._others_may_start.wait()
                try:
                    while not stop.is_set() and number < self.concurrency:
                        job = next(jobs, None)
                        if job is None:
                            return
                        async for result in self._rate_job(client, job):
                            emit(result)
                            self._track(result)
                finally:
                    self._others_may_start.set()  # the first stream is done: nothing to wait for

            streams = [asyncio.create_task(stream(n)) for n in range(self.concurrency)]
            try:
                await asyncio.gather(*streams)
            finally:
                for task in streams:
                    task.cancel()
                await asyncio.gather(*streams, return_exceptions=True)

    # -- one job ---------------------------------------------------------------------------------

    def _questions(self, job: Job) -> list[str]:
        # Response-major: the questions of one response share the conversation prefix.
        return [
            self.template.render(job.prompt, response, self._rule_texts[rule])
            for response in job.responses
            for rule in job.rules.tolist()
        ]

    async def _rate_job(self, client: httpx.AsyncClient, job: Job):
        """The job's results: one for a multi-prompt job, one per cell otherwise.

        Until a question is rated, a refused request fails the rest of its job unasked.
        """
        questions = self._questions(job)
        n_rules = len(job.rules)
        if self.prompts_per_request > 1:
            rated, _ = await self._ask_completions(client, questions, job.row)
            yield _job_result(job, rated, range(n_rules))
            return
        answers: list[Answer] = []
        refused: str | None = None
        last_side = len(job.responses) - 1
        for position, question in enumerate(questions):
            if refused is not None:
                answers.append(refused)
            elif self.endpoint == "chat":
                answer, was_refused = await self._ask_chat(client, question, job.row)
                answers.append(answer)
                refused = (
                    answer
                    if was_refused and not self._working and isinstance(answer, str)
                    else None
                )
            else:
                got, was_refused = await self._ask_completions(client, [question], job.row)
                answers += got
                first = got[0]
                refused = (
                    first if was_refused and not self._working and isinstance(first, str) else None
                )
            side, column = divmod(position, n_rules)
            if side == last_side:  # the cell's last question: hand it on now
                yield _job_result(job, answers, [column])

    def _track(self, result: JobResult) -> None:
        """Count results in a row with no rated cell; stop the run when there are too many."""
        if result.ok.any():
            self._consecutive_failures = 0
            return
        self._consecutive_failures += 1
        if self._consecutive_failures >= self.max_consecutive_failures:
            raise JudgeAborted(
                f"aborting: {self._consecutive_failures} answers in a row from {self.base_url} "
                f"rated nothing; last: {result.errors[0]}"
            )

    # -- requests --------------------------------------------------------------------------------

    def _completions_payload(self, prompts: list[str]) -> dict:
        return {
            "model": self.model,
            # One prompt goes as a string: every server takes that shape.
            "prompt": prompts if len(prompts) > 1 else prompts[0],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": self.top_logprobs,
        }

    async def _ask_completions(
        self, client, prompts: list[str], row: int
    ) -> tuple[list[Answer], bool]:
        """One answer per prompt, and whether a request was refused before anything was rated
        (the prompts after it are then failed with its reason, unasked)."""
        path = ENDPOINTS["completions"]
        answers: list[Answer] = []
        while len(answers) < len(prompts):
            chunk = prompts[len(answers) : len(answers) + self.prompts_per_request]
            body = await self._post(client, path, self._completions_payload(chunk))
            if isinstance(body, _Refusal) and body.repeatable and len(chunk) > 1:
                # Is it the list the server refuses? Ask for the first prompt alone, and if
                # that is answered, for the list once more (a fault may have passed).
                alone = await self._post(client, path, self._completions_payload(chunk[:1]))
                if not isinstance(alone, _Refusal):
                    body = await self._post(client, path, self._completions_payload(chunk))
                    if isinstance(body, _Refusal) and body.repeatable:
                        self._one_prompt_per_request(len(chunk), body.reason)
                        body, chunk = alone, chunk[:1]
            answers += _completion_answers(body, len(chunk))
            if isinstance(body, _Refusal) and not self._working:
                # Fewer prompts a request may help unless one prompt alone was refused too.
                fewer = len(chunk) > 1 and not body.repeatable
                await self._note_refusal(client, "completions", body.reason, row, fewer)
                return answers + [body.reason] * (len(prompts) - len(answers)), True
            self._note_answers(answers)
        return answers, False

    async def _ask_chat(self, client, question: str, row: int) -> tuple[Answer, bool]:
        payload = {
            "model": self.model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 1,
            "temperature": 0.0,
            "logprobs": True,
            "top_logprobs": self.top_logprobs,
        }
        body = await self._post(client, ENDPOINTS["chat"], payload)
        if isinstance(body, _Refusal) and not self._working:
            await self._note_refusal(client, "chat", body.reason, row, False)
            return body.reason, True
        answer = _chat_answer(body)
        self._note_answers([answer])
        return answer, False

    def _note_answers(self, answers: list[Answer]) -> None:
        if not self._working and any(not isinstance(answer, str) for answer in answers):
            self._working = True
            self._others_may_start.set()

    async def _note_refusal(
        self, client, endpoint: Endpoint, reason: str, row: int, fewer_prompts: bool
    ) -> None:
        """Before anything is rated: stop the run when a refusal repeats for a second pair."""
        pairs = self._refused_pairs.setdefault(reason, set())
        pairs.add(row)
        if len(pairs) >= 2:
            raise JudgeAborted(await self._cannot_rate(client, endpoint, reason, fewer_prompts))

    def _one_prompt_per_request(self, refused: int, reason: str) -> None:
        if self.prompts_per_request == 1:
            return
        self.prompts_per_request = 1
        streams = ""
        if not self._concurrency_given and self.concurrency > 1:
            # A server that refuses lists (llama.cpp's) evaluates one request at a time and
            # reuses only the last prompt's prefix: parallel streams would evict each other's.
            self.concurrency = 1
            streams = ", one pair at a time"
        log.warning(
            "%s%s refused a request of %d prompts (%s) and answered one: sending one prompt "
            "per request from now on%s (--prompts-per-request 1 says so up front)",
            self.base_url,
            ENDPOINTS["completions"],
            refused,
            reason,
            streams,
        )

    async def _cannot_rate(
        self, client, endpoint: Endpoint, reason: str, fewer_prompts: bool
    ) -> str:
        """One actionable line: what failed and what to try."""
        failed = (
            f"nothing rated: {self.base_url}{ENDPOINTS[endpoint]} failed the same way for two "
            f"pairs: {reason}"
        )
        if reason.startswith("connection error"):
            return f"{failed}; is a server listening at --base-url {self.base_url}?"
        other = "chat" if endpoint == "completions" else "completions"
        tips = [f"--endpoint {other}"]
        if fewer_prompts or reason.startswith("no answer within"):
            tips.append("--prompts-per-request 1" if fewer_prompts else "a longer --timeout")
        served = await self._served_models(client)
        if served and self.model not in served:
            tips.insert(0, f"--model {' or '.join(map(repr, served))} (the models it serves)")
        else:
            tips.append(f"checking --model {self.model!r}")
        return f"{failed}; try {', '.join(tips[:-1])} or {tips[-1]}"

    async def _served_models(self, client) -> list[str]:
        """The model ids the server lists at GET /models (empty when it does not say)."""
        try:
            response = await client.get("/models", timeout=min(self.timeout, 5.0))
            return [m["id"] for m in response.json()["data"] if isinstance(m["id"], str)]
        except (httpx.HTTPError, ValueError, KeyError, TypeError):
            return []

    async def _post(self, client: httpx.AsyncClient, path: str, payload: dict) -> dict | _Refusal:
        """The decoded JSON answer, or why there is none (retries: see the module docstring)."""
        delay, attempt, previous = self.backoff, 0, None
        while True:
            attempt, wait = attempt + 1, None
            try:
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
                        return _Refusal("malformed answer: not JSON", repeatable=False)
                reason = f"HTTP {status}: {response.text[:200]!r}"
                if status in (401, 403):
                    raise JudgeAborted(
                        f"{self.base_url}{path} rejected the request (HTTP {status}): "
                        "check the API key environment variable"
                    )
                if status == 404:
                    served = await self._served_models(client)
                    listed = f"; it serves {', '.join(map(repr, served))}" if served else ""
                    raise JudgeAborted(
                        f"{self.base_url}{path} answered 404: check --base-url, --endpoint "
                        f"and --model ({response.text[:200]!r}{listed})"
                    )
                if status in TRANSIENT_STATUSES:
                    wait = retry_after_seconds(response.headers.get("retry-after"))
                elif status < 500:
                    return _Refusal(reason, repeatable=True)  # the request itself is bad
                elif reason == previous:
                    return _Refusal(f"{reason} (the same answer twice: not retried)", True)
                previous = reason
            if attempt > self.max_retries:
                return _Refusal(f"{reason} (gave up after {attempt} attempts)", repeatable=False)
            if wait is None:
                wait = min(delay, self.max_backoff) * random.uniform(0.5, 1.0)
                delay *= 2
            else:
                wait = min(wait, RETRY_AFTER_CAP)  # the server's word, within reason
            await asyncio.sleep(wait)
