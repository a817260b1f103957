"""The reward server (``dynrules serve RUN``): a trained reward model behind HTTP for RL loops.

Endpoints (JSON in and out; every error is ``{"error": "<one line>"}`` with a 4xx/5xx status):

- ``POST /v1/rewards`` ``{"items": [{"prompt": str, "response": str}, ...]}`` →
  ``{"rewards": [float, ...], "model": str, "truncated": int}``, rewards in request order.
  Each item becomes one text exactly as ``dynrules score`` renders a prompt/response record
  (``train.data.score_text`` with the model's own template: HH transcript for an encoder, the
  chat template for a decoder), so the server and ``score`` give the same rewards.
- ``POST /get_reward``: OpenRLHF's remote reward-model protocol (what ``--remote_rm_url``
  posts): ``{"query": [str, ...], "prompts": [str, ...] (optional), "labels": [...] (ignored)}``
  → ``{"rewards": [...], "scores": [...], "extra_logs": {}}``. A query is the policy's whole
  decoded sequence (prompt + response). When ``prompts`` is given and query i contains
  prompts[i], the text after its first occurrence is the response and the pair is rendered
  like a ``/v1/rewards`` item (anything before it, such as a BOS token, is dropped); a prompt
  already in a decoder reward model's own chat template (OpenRLHF's ``--apply_chat_template``
  with a policy of the same family) gives up its user message first, so the template is not
  applied twice. Otherwise the whole query is scored as one transcript. ``--strip-tokens`` removes the policy's pad/eos
  tokens from both ends of each query first, as OpenRLHF's own ``serve_rm`` does.
- ``GET /health``: 200 ``{"status": "ready"}`` once every program is compiled, 503 before.
- ``GET /metrics``: Prometheus text format.

Batching: requests wait in one queue; the model thread takes everything queued (whole
requests, up to ``max_batch`` items) once the oldest request has waited ``max_wait_ms`` or the
batch is full, while the next batch gathers. The scorer sorts a batch's texts into the model's
length buckets and runs each through a program compiled at start-up (one per bucket and row
tier, see ``train.scoring.Scorer``): no request shape ever compiles.

Limits: a body over ``max_body_bytes`` gets 413 before it is read whole; more than
``max_items`` items (or queries) 413; malformed JSON 400; missing, unknown or wrong-typed
fields and empty lists 422. Texts longer than the model takes are truncated from the start,
as ``score`` truncates (the response end survives), and counted (``truncated`` in the reply,
``dynrules_truncated_texts_total``). A non-finite reward fails its request with 500: no NaN
goes on the wire.

Security: binds 127.0.0.1 unless told otherwise. With an API key (read from the environment
variable named by ``--api-key-env``) every endpoint but ``/health`` needs
``Authorization: Bearer <key>``; others get 401. The key is compared in constant time and
never logged or echoed. SIGTERM (or Ctrl-C): stop accepting, answer every request already
accepted, log how many were answered, exit.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import dataclasses
import hmac
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal, overload

import numpy as np

from dynrules.errors import DynrulesError
from dynrules.models.templates import ChatTemplate
from dynrules.settings import MeshText, option, section
from dynrules.train.config import MESH_HELP

log = logging.getLogger(__name__)

# Endpoints needing no key: a load balancer's readiness probe carries none.
OPEN_PATHS = frozenset({"/health"})
ENDPOINTS = ("/v1/rewards", "/get_reward", "/health", "/metrics")
GRACEFUL_SHUTDOWN_S = 60
# Trainers pause between rollouts and a loaded host stalls; uvicorn's default 5 s keep-alive
# then closes connections that clients are about to reuse (seen as read errors in the bench).
KEEP_ALIVE_S = 75


@section(frozen=True)
class ServeConfig:
    """Options of ``dynrules serve``: the ``serve`` section of the configuration tree."""

    host: str = option("127.0.0.1", "Address to bind (loopback by default).")
    port: int = option(8000, "Port to bind.")
    api_key_env: str | None = option(
        None,
        "Environment variable holding the API key; then every request but /health needs "
        "'Authorization: Bearer <key>'.",
    )
    max_batch: int = option(256, "Most items gathered into one model batch.")
    max_wait_ms: float = option(5.0, "Longest a request waits for others to join its batch.")
    max_items: int = option(1024, "Most items (or queries) in one request.")
    max_body_bytes: int = option(8 * 2**20, "Largest request body.")
    batch_size: int = option(64, "Rows of a full model batch (short texts).")
    row_tiers: int = option(
        4,
        "Programs per length bucket, for full, 1/2, 1/4 ... batches: more compile longer "
        "at start-up and pad small batches less.",
    )
    mesh: MeshText = option("", MESH_HELP)
    model_name: str | None = option(
        None, "Name given in replies [default: the RUN directory's name]."
    )
    strip_tokens: tuple[str, ...] = option(
        (), "Comma-separated policy pad/eos tokens stripped from both ends of OpenRLHF queries."
    )
    access_log: bool = option(False, "Log every request line (never its headers).")

    def __post_init__(self):
        for name in ("max_batch", "max_items", "max_body_bytes", "batch_size", "row_tiers"):
            if getattr(self, name) < 1:
                raise DynrulesError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise DynrulesError(f"max_wait_ms must be in [0, 10000], got {self.max_wait_ms}")


def api_key_from_env(name: str | None) -> str | None:
    """The key in environment variable ``name`` (None: no authentication); never echoed."""
    if name is None:
        return None
    key = os.environ.get(name, "")
    if not key.strip():
        raise DynrulesError(f"--api-key-env {name}: the environment variable is unset or empty")
    return key


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line ``reason``."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, " ".join(reason.split())


# --------------------------------------------------------------------------- metrics


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "dynrules_requests", "HTTP requests answered", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "dynrules_request_seconds",
            "Time to answer a request",
            ["endpoint"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.in_progress = Gauge(
            "dynrules_requests_in_progress", "Requests being answered", registry=r
        )
        self.rewards = Counter("dynrules_rewards", "Rewards computed", registry=r)
        self.truncated = Counter(
            "dynrules_truncated_texts", "Texts cut to the model's length", registry=r
        )
        self.whole_queries = Counter(
            "dynrules_whole_queries",
            "OpenRLHF queries scored whole (no prompt found in them)",
            registry=r,
        )
        self.batch_items = Histogram(
            "dynrules_batch_items",
            "Items per model batch",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
        )
        self.batch_seconds = Histogram("dynrules_batch_seconds", "Model time per batch", registry=r)
        self.ready = Gauge("dynrules_ready", "1 once every program is compiled", registry=r)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


# --------------------------------------------------------------------------- batching


@dataclasses.dataclass
class _Job:
    ids: list[np.ndarray]
    arrived: float
    future: asyncio.Future


class Batcher:
    """Gathers concurrent requests into model batches, run one at a time on a model thread.

    A batch starts once the oldest waiting request has waited ``max_wait_s`` or ``max_batch``
    items are waiting; it takes whole requests in arrival order (one larger than
    ``max_batch`` goes alone).
    """

    def __init__(self, score_tokens, *, max_batch: int, max_wait_s: float, metrics: Metrics):
        self._score_tokens = score_tokens
        self.max_batch, self.max_wait_s, self._metrics = max_batch, max_wait_s, metrics
        self._waiting: collections.deque[_Job] = collections.deque()
        self._waiting_items = 0
        self._arrived = asyncio.Event()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="dynrules-model")

    async def score(self, ids: list[np.ndarray]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        job = _Job(ids, loop.time(), loop.create_future())
        self._waiting.append(job)
        self._waiting_items += len(ids)
        self._arrived.set()
        return await job.future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self._waiting:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = self._waiting[0].arrived + self.max_wait_s
            while self._waiting_items < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()  # an Event wait cancelled by the timeout loses nothing
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            jobs = [self._waiting.popleft()]
            items = len(jobs[0].ids)
            while self._waiting and items + len(self._waiting[0].ids) <= self.max_batch:
                jobs.append(self._waiting.popleft())
                items += len(jobs[-1].ids)
            self._waiting_items -= items
            await self._run(jobs, loop)

    async def _run(self, jobs: list[_Job], loop) -> None:
        ids = [x for job in jobs for x in job.ids]
        started = time.perf_counter()
        try:
            out = await loop.run_in_executor(self.executor, self._score_tokens, ids)
        except Exception as exc:  # a model failure fails its requests, not the server
            log.exception("model batch of %d items failed", len(ids))
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self._metrics.batch_seconds.observe(time.perf_counter() - started)
        self._metrics.batch_items.observe(len(ids))
        start = 0
        for job in jobs:
            if not job.future.done():
                job.future.set_result(out[start : start + len(job.ids)])
            start += len(job.ids)


# --------------------------------------------------------------------------- requests


async def _read_json(request, max_bytes: int):
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise RequestError(413, f"body of {declared} bytes is over the limit of {max_bytes}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise RequestError(413, f"body is over the limit of {max_bytes} bytes")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"malformed JSON: {exc}") from None


@overload
def _list_field(body, name: str, max_items: int, *, required: Literal[True] = True) -> list: ...


@overload
def _list_field(body, name: str, max_items: int, *, required: bool) -> list | None: ...


def _list_field(body, name: str, max_items: int, *, required: bool = True) -> list | None:
    if not isinstance(body, dict):
        raise RequestError(422, f"the body must be a JSON object, got {type(body).__name__}")
    value = body.get(name)
    if value is None:
        if required:
            raise RequestError(422, f"missing field {name!r}")
        return None
    if not isinstance(value, list):
        raise RequestError(422, f"field {name!r} must be a list, got {type(value).__name__}")
    if not value:
        raise RequestError(422, f"field {name!r} is empty")
    if len(value) > max_items:
        raise RequestError(413, f"{len(value)} {name} is over the limit of {max_items} a request")
    return value


def _strings(values: list, name: str) -> list[str]:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise RequestError(422, f"{name}[{i}] must be a string, got {type(value).__name__}")
    return values


ITEM_FIELDS = ("prompt", "response")


def _item_records(items: list) -> list[dict]:
    """``/v1/rewards`` items as ``score`` records (strict: a misspelt field is an error)."""
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise RequestError(422, f"items[{i}] must be an object, got {type(item).__name__}")
        for name in ITEM_FIELDS:
            if name not in item:
                raise RequestError(422, f"items[{i}]: missing field {name!r}")
            if not isinstance(item[name], str):
                raise RequestError(
                    422, f"items[{i}].{name} must be a string, got {type(item[name]).__name__}"
                )
        unknown = sorted(set(item) - set(ITEM_FIELDS))
        if unknown:
            raise RequestError(422, f"items[{i}]: unknown field {unknown[0]!r}")
    return items


def strip_ends(text: str, tokens: tuple[str, ...]) -> str:
    """``text`` without repeats of any of ``tokens`` at either end."""
    changed = True
    while changed and tokens:
        changed = False
        for token in tokens:
            if token and text.startswith(token):
                text, changed = text[len(token) :], True
            if token and text.endswith(token):
                text, changed = text[: -len(token)], True
    return text


def split_query(query: str, prompt: str | None, user_turn=lambda prompt: None) -> dict:
    """An OpenRLHF query (prompt + response, decoded) as a ``score`` record (see module doc).

    ``user_turn`` recovers the user message from a prompt already in the reward model's chat
    template (``ChatTemplate.user_turn``), so that the template is not applied twice."""
    if prompt:
        at = query.find(prompt)
        if at >= 0:
            return {"prompt": user_turn(prompt) or prompt, "response": query[at + len(prompt) :]}
    return {"text": query}


# --------------------------------------------------------------------------- the app


class RewardService:
    """A scorer behind a batcher: ``await rewards(records)`` → finite rewards in order."""

    def __init__(self, scorer, config: ServeConfig, name: str):
        from dynrules.train.data import score_text

        self.scorer, self.config, self.name = scorer, config, name
        self._score_text = score_text
        self.metrics = Metrics()
        self.ready = False
        self.answered = self.accepted = 0
        self.batcher: Batcher | None = None
        self._task: asyncio.Task | None = None
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="dynrules-tokenizer")

    async def start(self, on_fatal) -> None:
        self.batcher = Batcher(
            lambda ids: self.scorer.score_tokens(ids)[:, 0],
            max_batch=self.config.max_batch,
            max_wait_s=self.config.max_wait_ms / 1000,
            metrics=self.metrics,
        )
        self._task = asyncio.create_task(self.batcher.run())
        loop = asyncio.get_running_loop()
        warm = loop.run_in_executor(self.batcher.executor, self.scorer.warm_up)
        warm.add_done_callback(lambda f: self._warmed(f, on_fatal))

    def _warmed(self, future, on_fatal) -> None:
        if future.exception() is not None:
            log.error("warm-up failed: %s", future.exception())
            on_fatal()
            return
        self.ready = True
        self.metrics.ready.set(1)
        log.info("ready: %s, %d programs compiled", self.name, future.result())

    async def stop(self) -> None:
        if self._task is not None and self.batcher is not None:  # both set by start
            self._task.cancel()
            self.batcher.executor.shutdown(wait=True)
        self._tokenizer_thread.shutdown(wait=True)
        log.info("stopped: %d of %d accepted requests answered", self.answered, self.accepted)

    async def rewards(self, records: list[dict]) -> tuple[list[float], int]:
        batcher = self.batcher
        if not self.ready or batcher is None:  # ready: started and warmed up
            raise RequestError(503, "warming up: the model is still compiling; retry shortly")
        texts = [self._score_text(r, render=self.scorer.render) for r in records]
        loop = asyncio.get_running_loop()  # tokenize off the event loop, one batch at a time
        tokens = await loop.run_in_executor(self._tokenizer_thread, self.scorer.encode, texts)
        self.metrics.truncated.inc(tokens.truncated)
        rewards = await batcher.score(tokens.ids)
        bad = np.flatnonzero(~np.isfinite(rewards))
        if bad.size:
            raise RequestError(500, f"the model gave a non-finite reward for item {bad[0]}")
        self.metrics.rewards.inc(len(rewards))
        return [float(x) for x in rewards], tokens.truncated


class _Guard:
    """Outermost ASGI layer: metrics, accepted/answered counts, then the API key check."""

    def __init__(self, app, service: RewardService, api_key: str | None):
        self.app, self.service = app, service
        self._expected = None if api_key is None else b"Bearer " + api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        service, metrics = self.service, self.service.metrics
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        started, status = time.perf_counter(), 500
        service.accepted += 1
        metrics.in_progress.inc()

        async def send_and_count(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                service.answered += 1

        try:
            if self._expected is not None and scope["path"] not in OPEN_PATHS:
                given = dict(scope["headers"]).get(b"authorization", b"")
                if not hmac.compare_digest(given, self._expected):
                    reply = JSONResponse(
                        {"error": "missing or wrong API key (Authorization: Bearer <key>)"},
                        401,
                        headers={"WWW-Authenticate": "Bearer"},
                    )
                    return await reply(scope, receive, send_and_count)
            await self.app(scope, receive, send_and_count)
        finally:
            metrics.in_progress.dec()
            metrics.requests.labels(endpoint, str(status)).inc()
            metrics.latency.labels(endpoint).observe(time.perf_counter() - started)


def create_app(
    scorer, config: ServeConfig, *, name: str, api_key: str | None = None, on_fatal=None
):
    """The ASGI app serving ``scorer`` (a ``train.scoring.Scorer``); see the module doc."""
    import contextlib

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    service = RewardService(scorer, config, name)
    # A decoder renders through its chat template (a bound ChatTemplate.render); its prompts
    # may arrive already in that template.
    chat = getattr(scorer.render, "__self__", None)
    user_turn = chat.user_turn if isinstance(chat, ChatTemplate) else lambda prompt: None

    async def v1_rewards(request):
        body = await _read_json(request, config.max_body_bytes)
        records = _item_records(_list_field(body, "items", config.max_items))
        rewards, truncated = await service.rewards(records)
        return JSONResponse({"rewards": rewards, "model": name, "truncated": truncated})

    async def get_reward(request):
        body = await _read_json(request, config.max_body_bytes)
        queries = _strings(_list_field(body, "query", config.max_items), "query")
        prompts = _list_field(body, "prompts", config.max_items, required=False)
        if prompts is None:
            prompts = [None] * len(queries)
        elif len(prompts) != len(queries):
            raise RequestError(422, f"{len(prompts)} prompts for {len(queries)} queries")
        else:
            _strings(prompts, "prompts")
        records = [
            split_query(strip_ends(q, config.strip_tokens), p, user_turn)
            for q, p in zip(queries, prompts, strict=True)
        ]
        service.metrics.whole_queries.inc(sum(1 for r in records if "text" in r))
        rewards, _ = await service.rewards(records)
        return JSONResponse({"rewards": rewards, "scores": rewards, "extra_logs": {}})

    async def health(request):
        if service.ready:
            return JSONResponse({"status": "ready", "model": name})
        return JSONResponse({"status": "warming up", "model": name}, 503)

    async def metrics(request):
        body, content_type = service.metrics.render()
        return Response(body, media_type=content_type)

    async def refused(request, exc):  # exc: a RequestError
        return JSONResponse({"error": exc.reason}, exc.status)

    async def http_error(request, exc):
        return JSONResponse({"error": exc.detail}, exc.status_code)

    async def internal_error(request, exc):  # logged with its traceback by uvicorn
        return JSONResponse({"error": "internal server error"}, 500)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start(on_fatal or (lambda: None))
        yield
        await service.stop()

    from starlette.exceptions import HTTPException

    app = Starlette(
        routes=[
            Route("/v1/rewards", v1_rewards, methods=["POST"]),
            Route("/get_reward", get_reward, methods=["POST"]),
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics, methods=["GET"]),
        ],
        exception_handlers={
            RequestError: refused,
            HTTPException: http_error,
            Exception: internal_error,
        },
        lifespan=lifespan,
    )
    app.state.service = service
    return _Guard(app, service, api_key)


def load_scorer(run: str | Path, config: ServeConfig):
    """The run's model (any model ``dynrules score`` can score), with its row tiers."""
    from dynrules.train.scoring import Scorer

    scorer = Scorer.from_model_dir(
        run, mesh_spec=config.mesh, batch_size=config.batch_size, row_tiers=config.row_tiers
    )
    if scorer.spec.num_outputs != 1:
        raise DynrulesError(
            f"{run}: {scorer.spec.num_outputs} outputs; serving needs a reward model"
        )
    return scorer


def uvicorn_server(app, config: ServeConfig):
    """A uvicorn server for ``app`` with the project's logging: ``dynrules.*`` (serve's
    "ready" and "stopped" lines included) through uvicorn's handler at the level the CLI set
    (output.py; INFO by default)."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    from dynrules.output import log_level

    logging_config = copy.deepcopy(LOGGING_CONFIG)
    logging_config["loggers"]["dynrules"] = {
        "handlers": ["default"],
        "level": log_level(),
        "propagate": False,
    }
    return uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            access_log=config.access_log,
            log_config=logging_config,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
            timeout_keep_alive=KEEP_ALIVE_S,
        )
    )


def serve(run: str | Path, config: ServeConfig) -> None:
    """Serve ``run``'s reward model until SIGTERM/SIGINT (blocking; see the module doc)."""
    api_key = api_key_from_env(config.api_key_env)
    if config.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        log.warning(
            "serving on %s without an API key: anyone who can reach it may use it", config.host
        )
    scorer = load_scorer(run, config)
    name = config.model_name or Path(run).resolve().name
    failed = []

    def on_fatal():
        failed.append(True)
        server.should_exit = True

    server = uvicorn_server(
        create_app(scorer, config, name=name, api_key=api_key, on_fatal=on_fatal), config
    )
    server.run()
    if failed:
        raise DynrulesError(f"{run}: the model failed to compile; see the log above")
