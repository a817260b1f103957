"""A small OpenAI-compatible HTTP server on 127.0.0.1, for tests and the client benchmark.

It answers ``/v1/completions`` and ``/v1/chat/completions`` with one token and top
log-probabilities that are a fixed function of the question text (:func:`synthetic_top_logprobs`),
so a run's ratings are reproducible and checkable. The answer spreads "Yes" over two spellings
(" Yes", "Yes"), spells Irrelevant as " Ir" (a split word) and adds a distractor token, which
exercises the client's handling of tokenizer variants.

Faults for tests (:class:`Faults`): the first N requests answer an HTTP status (optionally with
Retry-After), or every request after the first N does, the first N requests are slow, every
request is delayed; and questions carrying a marker get a malformed JSON body
(:data:`MALFORMED`), no log-probabilities (:data:`NO_LOGPROBS`) or no Yes/No/Irrelevant token
(:data:`NO_ANSWER`).

``llama_cpp=True`` adds the behaviours of llama.cpp's Python server (``llama-cpp-python[server]``)
that a client must cope with: ``/v1/completions`` takes one prompt per request and answers a
list of several with HTTP 500 and an empty message (its ``assert len(body.prompt) <= 1``);
``top_logprobs`` is a list of one dict token → logprob; and the answer tokens sit below a dozen
other tokens, so a client asking for the top 5 sees no Yes/No/Irrelevant at all (a small model
puts most of its mass elsewhere). ``GET /v1/models`` lists the one model, as servers do.

The server is plain asyncio (HTTP/1.1 with keep-alive, Content-Length bodies only): light
enough that on two cores the client, not the server, sets the benchmark's pace. Run it in a
thread (:class:`LoopbackServer`) or as a process: ``python -m dynrules.engine.judges.loopback``
prints the port on its first line and serves until stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import json
import math
import sys
import threading
from dataclasses import dataclass

MALFORMED = "<<malformed>>"
NO_LOGPROBS = "<<no-logprobs>>"
NO_ANSWER = "<<no-answer>>"
_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def _logits(text: str) -> tuple[float, float, float]:
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=12).digest()
    u = [int.from_bytes(digest[i : i + 4], "little") / 2**32 for i in (0, 4, 8)]
    return 6.0 * u[0] - 3.0, 6.0 * u[1] - 3.0, 6.0 * u[2] - 4.0


# Tokens a small model prefers to any answer (llama.cpp mode): the answers rank 13th and below.
_ABOVE_ANSWERS = (
    " The",
    " I",
    " A",
    " It",
    " This",
    " Sure",
    "\n",
    " In",
    " To",
    " As",
    " If",
    " We",
)
LLAMA_CPP_ERROR = (
    b'{"error":{"message":"","type":"internal_server_error","param":null,"code":null}}'
)


def synthetic_top_logprobs(text: str, *, buried: bool = False) -> list[tuple[str, float]]:
    """The answer token's (token, logprob) list for a question text, most likely first.

    ``buried``: a dozen other tokens rank above every answer token (llama.cpp mode).
    """
    yes, no, irrelevant = _logits(text)
    raw = [
        (" Yes", yes + math.log(0.7)),
        ("Yes", yes + math.log(0.3)),
        (" No", no),
        (" Ir", irrelevant),
        (" The", -2.0),
    ]
    if buried:
        ceiling = max(yes, no, irrelevant)
        raw = raw[:4] + [(t, ceiling + 2.0 - 0.1 * i) for i, t in enumerate(_ABOVE_ANSWERS)]
    top = max(v for _, v in raw)
    log_total = top + math.log(sum(math.exp(v - top) for _, v in raw))
    return sorted(((t, v - log_total) for t, v in raw), key=lambda tv: -tv[1])


def synthetic_rating(text: str) -> tuple[float, float]:
    """(s, relevance) that a correct client reads from this server for a question text."""
    yes, no, irrelevant = (math.exp(v) for v in _logits(text))
    total = yes + no + irrelevant
    return (yes - no) / total, 1.0 - irrelevant / total


@dataclass
class Faults:
    status_first: int = 0  # the first N requests answer `status`
    status_after: int | None = None  # every request after the first N answers `status`
    status: int = 500
    retry_after: str | None = None  # Retry-After header on those answers
    slow_first: int = 0  # the first N requests (after any status faults) wait `slow_seconds`
    slow_seconds: float = 0.0
    delay: float = 0.0  # every request waits this long before answering


class _Handler:
    def __init__(self, faults: Faults, record: bool, llama_cpp: bool = False):
        self.faults = faults
        self.record = record
        self.llama_cpp = llama_cpp
        self.requests = 0
        self.questions: collections.Counter[str] = collections.Counter()
        self.order: list[str] = []  # questions in the order they were asked (when recording)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1] if lines[0].count(" ") >= 2 else ""
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (h.partition(":") for h in lines[1:] if h)
                )
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                status, payload, extra = await self.answer(path, body)
                head_out = [
                    f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
                    "Content-Type: application/json",
                    f"Content-Length: {len(payload)}",
                    *extra,
                    "",
                    "",
                ]
                writer.write("\r\n".join(head_out).encode("latin-1") + payload)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            return  # client gone, or server shutting down (asyncio logs a cancelled handler task)
        finally:
            writer.close()

    async def answer(self, path: str, body: bytes) -> tuple[int, bytes, list[str]]:
        if path.endswith("/models"):  # not a rating request: no faults, not counted
            return 200, b'{"object": "list", "data": [{"id": "loopback", "object": "model"}]}', []
        self.requests += 1
        number, faults = self.requests, self.faults
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if number <= faults.status_first or (
            faults.status_after is not None and number > faults.status_after
        ):
            extra = [f"Retry-After: {faults.retry_after}"] if faults.retry_after is not None else []
            return faults.status, b'{"error": {"message": "injected fault"}}', extra
        if number <= faults.status_first + faults.slow_first:
            await asyncio.sleep(faults.slow_seconds)
        try:
            request = json.loads(body)
        except ValueError:
            return 400, b'{"error": {"message": "request is not JSON"}}', []
        if path.endswith("/chat/completions"):
            questions = [request["messages"][-1]["content"]]
            build, requested = self._chat, request.get("top_logprobs")
        elif path.endswith("/completions"):
            prompt = request["prompt"]
            questions = prompt if isinstance(prompt, list) else [prompt]
            if self.llama_cpp and len(questions) > 1:
                return 500, LLAMA_CPP_ERROR, []
            build, requested = self._completions, request.get("logprobs")
        else:
            return 404, b'{"error": {"message": "unknown path"}}', []
        if self.record:
            self.questions.update(questions)
            self.order += questions
        if any(MALFORMED in q for q in questions):
            return 200, b'{"choices": [{"index": 0, "logprobs": ', []
        n_top = requested if isinstance(requested, int) and not isinstance(requested, bool) else 0
        return (
            200,
            json.dumps(build(request.get("model", ""), questions, max(n_top, 1))).encode(),
            [],
        )

    def _top(self, question: str, n_top: int) -> list[tuple[str, float]]:
        if NO_ANSWER in question:
            return [(" The", -0.1), (" Sure", -2.5)][:n_top]
        return synthetic_top_logprobs(question, buried=self.llama_cpp)[:n_top]

    def _completions(self, model: str, questions: list[str], n_top: int) -> dict:
        choices = []
        for index, question in enumerate(questions):
            top = self._top(question, n_top)
            logprobs = (
                None
                if NO_LOGPROBS in question
                else {
                    "tokens": [top[0][0]],
                    "token_logprobs": [top[0][1]],
                    "top_logprobs": [dict(top)],
                    "text_offset": [0],
                }
            )
            choices.append(
                {"index": index, "text": top[0][0], "logprobs": logprobs, "finish_reason": "length"}
            )
        return {
            "id": "cmpl-loopback",
            "object": "text_completion",
            "model": model,
            "choices": choices,
        }

    def _chat(self, model: str, questions: list[str], n_top: int) -> dict:
        question = questions[0]
        top = self._top(question, n_top)
        logprobs = (
            None
            if NO_LOGPROBS in question
            else {
                "content": [
                    {
                        "token": top[0][0],
                        "logprob": top[0][1],
                        "top_logprobs": [{"token": t, "logprob": v} for t, v in top],
                    }
                ]
            }
        )
        return {
            "id": "chatcmpl-loopback",
            "object": "chat.completion",
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": top[0][0]},
                    "logprobs": logprobs,
                    "finish_reason": "length",
                }
            ],
        }


class LoopbackServer:
    """The server on a background thread: ``with LoopbackServer() as server: server.url``."""

    def __init__(
        self,
        faults: Faults | None = None,
        *,
        record: bool = True,
        port: int = 0,
        llama_cpp: bool = False,
    ):
        self.handler = _Handler(faults or Faults(), record, llama_cpp)
        self._port = port
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def faults(self) -> Faults:
        return self.handler.faults

    @property
    def requests(self) -> int:
        return self.handler.requests

    @property
    def questions(self) -> collections.Counter:
        """How often each question text was asked (when recording)."""
        return self.handler.questions

    @property
    def order(self) -> list[str]:
        """The questions in the order the server received them (when recording)."""
        return self.handler.order

    def start(self) -> LoopbackServer:
        self._thread = threading.Thread(target=self._serve, daemon=True, name="loopback-server")
        self._thread.start()
        self._ready.wait(10)
        return self

    def _serve(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self.handler.serve, "127.0.0.1", self._port, limit=2**24)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()

    async def _shutdown(self) -> None:
        self._server.close()
        connections = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        await asyncio.sleep(0)  # let the closed transports finish closing

    def stop(self) -> None:
        if self._loop is not None and self._loop.is_running():
            asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


async def _serve_until_stdin_closes(port: int, delay: float, llama_cpp: bool) -> None:
    handler = _Handler(Faults(delay=delay), record=False, llama_cpp=llama_cpp)
    server = await asyncio.start_server(handler.serve, "127.0.0.1", port, limit=2**24)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    server.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Loopback OpenAI-compatible server (deterministic logprobs)."
    )
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument(
        "--delay", type=float, default=0.0, help="seconds to wait before each answer"
    )
    parser.add_argument(
        "--llama-cpp", action="store_true", help="behave as llama.cpp's Python server does"
    )
    args = parser.parse_args(argv)
    asyncio.run(_serve_until_stdin_closes(args.port, args.delay, args.llama_cpp))


if __name__ == "__main__":
    main()
