"""The reward server: same rewards as ``dynrules score``, OpenRLHF's protocol, bad requests,
authentication, 64 concurrent clients, SIGTERM under load. Loopback only, a tiny random model."""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from click.testing import CliRunner

from dynrules.cli import main
from dynrules.serve import (
    ServeConfig,
    create_app,
    load_scorer,
    split_query,
    strip_ends,
    uvicorn_server,
)

MAX_LENGTH = 32  # buckets 16, 24, 32: few programs to compile
KEY_ENV = "DYNRULES_TEST_SERVE_KEY"
SECRET = "s3cret-key-value-0123456789"


def _tiny_model(directory: Path) -> Path:
    """A 2-layer, 32-wide random BERT reward model with a head large enough to spread rewards."""
    from dynrules.models import bert
    from dynrules.models import bert_checkpoint as bert_ckpt
    from dynrules.models import classifier as mdl
    from dynrules.models.tokenizer import TextTokenizer

    config = bert.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    spec = mdl.ModelSpec(config, max_length=MAX_LENGTH)
    rng = np.random.default_rng(0)
    params = {
        "encoder": bert.random_params(config, 0),
        "head_kernel": rng.normal(0, 1, (32, 1)).astype(np.float32),
        "head_bias": np.array([0.25], np.float32),
    }
    tokenizer = TextTokenizer(bert_ckpt.default_checkpoint_dir() / "tokenizer.json")
    mdl.export_model(params, spec, tokenizer, directory)
    return directory


def _items(count: int, seed: int = 0) -> list[dict]:
    """Prompt/response items of varied length (some over MAX_LENGTH tokens, so truncated)."""
    rng = np.random.default_rng(seed)
    words = "please help me write a safe answer about chemistry security health and law".split()
    return [
        {
            "prompt": " ".join(rng.choice(words, int(rng.integers(1, 12)))),
            "response": " ".join(rng.choice(words, int(rng.integers(1, 60)))),
        }
        for _ in range(count)
    ]


class Running:
    """A server on a loopback port in a background thread of this process."""

    def __init__(self, scorer, config: ServeConfig, api_key: str | None = None):
        self.app = create_app(scorer, config, name="tiny", api_key=api_key)
        self.server = uvicorn_server(self.app, config)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]})
        self.thread.start()
        _wait_ready(self.url, {"Authorization": f"Bearer {api_key}"} if api_key else {})

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def _wait_ready(url: str, headers: dict, timeout: float = 240, process=None) -> int:
    """Poll /health until ready; returns how many polls the server answered."""
    deadline, answered = time.monotonic() + timeout, 0
    while time.monotonic() < deadline:
        assert process is None or process.poll() is None, "the server process exited"
        try:
            status = httpx.get(f"{url}/health", headers=headers, timeout=2).status_code
            answered += 1
            if status == 200:
                return answered
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError(f"server at {url} not ready in {timeout} s")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return _tiny_model(tmp_path_factory.mktemp("serve") / "model")


@pytest.fixture(scope="module")
def scorer(model):
    return load_scorer(model, ServeConfig(row_tiers=2))


@pytest.fixture(scope="module")
def server(scorer):
    running = Running(scorer, ServeConfig(port=0, max_items=16, max_body_bytes=16384))
    yield running
    running.stop()


def _score_command(model: Path, records: list[dict], tmp_path: Path) -> list[float]:
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in records))
    result = CliRunner().invoke(main, ["score", str(model), str(inp), "--out", str(out)])
    assert result.exit_code == 0, result.output
    return [json.loads(line)["reward"] for line in out.read_text().splitlines()]


def test_rewards_equal_the_score_command(server, model, tmp_path):
    items = _items(14, seed=1)
    reply = httpx.post(f"{server.url}/v1/rewards", json={"items": items}, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["model"] == "tiny" and len(body["rewards"]) == len(items)
    assert body["truncated"] > 0  # some items are longer than the model takes
    expected = _score_command(model, items, tmp_path)
    np.testing.assert_allclose(body["rewards"], expected, atol=1e-5, rtol=0)
    assert np.ptp(expected) > 0.01  # distinct rewards: request order is really checked
    # alone, a text scores the same as inside a batch of others
    alone = httpx.post(f"{server.url}/v1/rewards", json={"items": items[3:4]}, timeout=30)
    np.testing.assert_allclose(alone.json()["rewards"], expected[3:4], atol=1e-5, rtol=0)


def test_openrlhf_remote_rm_protocol(server, model, tmp_path):
    """What OpenRLHF's remote_rm_fn posts: decoded prompt+response queries, the prompts, labels."""
    items = _items(6, seed=2)
    queries = ["<s>" + it["prompt"] + it["response"] for it in items]
    payload = {"query": queries, "prompts": [it["prompt"] for it in items], "labels": [""] * 6}
    reply = httpx.post(f"{server.url}/get_reward", json=payload, timeout=30)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"rewards", "scores", "extra_logs"} and body["scores"] == body["rewards"]
    expected = _score_command(model, items, tmp_path)
    np.testing.assert_allclose(body["rewards"], expected, atol=1e-5, rtol=0)

    # no prompts (or a prompt not inside the query): the whole query is one transcript
    whole = [{"text": q} for q in queries]
    reply = httpx.post(f"{server.url}/get_reward", json={"query": queries}, timeout=30)
    expected_whole = _score_command(model, whole, tmp_path)
    np.testing.assert_allclose(reply.json()["rewards"], expected_whole, atol=1e-5, rtol=0)
    assert not np.allclose(expected_whole, expected, atol=1e-3)  # the split mattered


def test_split_query_takes_the_user_turn_out_of_a_templated_prompt():
    def user_turn(prompt):
        return prompt[len("<u>") : -len("</u><a>")] if prompt.startswith("<u>") else None

    assert split_query("<s><u>hi</u><a>yes", "<u>hi</u><a>", user_turn) == {
        "prompt": "hi",
        "response": "yes",
    }
    assert split_query("<s>hi yes", "hi ", user_turn) == {"prompt": "hi ", "response": "yes"}
    assert split_query("<s>hi yes", "absent", user_turn) == {"text": "<s>hi yes"}


def test_reward_client(server, model, tmp_path):
    from dynrules import RewardClient
    from dynrules.errors import DynrulesError

    items = _items(20, seed=3)
    with RewardClient(server.url, items_per_request=16) as client:  # the server takes 16 a request
        assert client.ready()
        rewards = client.rewards([it["prompt"] for it in items], [it["response"] for it in items])
        with pytest.raises(DynrulesError, match="1 prompts for 2 responses"):
            client.rewards(["a"], ["b", "c"])
    np.testing.assert_allclose(rewards, _score_command(model, items, tmp_path), atol=1e-5, rtol=0)
    with RewardClient(server.url, items_per_request=100) as client:
        with pytest.raises(DynrulesError, match="HTTP 413: 20 items is over the limit of 16"):
            client.rewards([it["prompt"] for it in items], [it["response"] for it in items])


@pytest.mark.parametrize("packing", [False, True])
def test_scorer_plan_covers_every_text_once_in_fitting_batches(scorer, packing):
    """Row tiers and spare rows: each text once, in a batch as wide as it needs, no row over its
    width, no batch over its rows; unpacked, a partial batch in the smallest tier that holds
    its own bucket's texts."""
    scorer = copy.copy(scorer)
    scorer.packing = packing  # the plan alone: nothing runs
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 63, 64, 65, 300):
        lengths = rng.integers(1, MAX_LENGTH + 1, n).astype(np.int32)
        plan = scorer.plan(lengths)
        seen = np.concatenate([batch.texts for batch in plan])
        assert sorted(seen.tolist()) == list(range(n))
        for batch in plan:
            rows, width = batch.rows, batch.width
            assert rows in scorer.row_tiers[width] and batch.row.max() < rows
            ends = batch.offset + lengths[batch.texts]
            assert ends.max() <= width
            for row in set(batch.row.tolist()):  # side by side, segments 1, 2, …
                mine = np.flatnonzero(batch.row == row)
                order = mine[np.argsort(batch.offset[mine])]
                np.testing.assert_array_equal(batch.offset[order][1:], ends[order][:-1])
                np.testing.assert_array_equal(batch.segment[order], np.arange(1, len(mine) + 1))
            if packing:
                continue
            chunk = batch.texts
            own = int(np.sum(lengths[chunk] > max([0, *[b for b in scorer.buckets if b < width]])))
            smaller = [r for r in scorer.row_tiers[width] if r < rows]
            assert not smaller or own > max(smaller)  # no smaller tier would have held them
        padded_rows = sum(batch.rows for batch in plan)
        assert padded_rows < n + len(scorer.buckets) * max(scorer.rows.values())


def test_a_decoder_reward_model_is_served_like_score(tmp_path):
    """A tiny random Llama with a chat template: the server renders texts through the model's
    own template, as ``score`` does, and gives the same rewards."""
    from dynrules.models import classifier as mdl

    from . import decoder_fixtures as fx

    source = fx.tiny_hf_decoder(tmp_path / "hf", seed=1)
    model = mdl.pretrained("decoder", source, num_outputs=1, max_length=MAX_LENGTH, seed=0)
    assert model.spec.template == "chat"
    head = np.random.default_rng(0).normal(size=(model.spec.hidden_size, 1)).astype(np.float32)
    params = model.params | {"head_kernel": head}
    mdl.export_model(params, model.spec, model.tokenizer, tmp_path / "rm", model.chat)
    scorer = load_scorer(tmp_path / "rm", ServeConfig(row_tiers=1))
    running = Running(scorer, ServeConfig(port=0, row_tiers=1))
    try:
        items = _items(6, seed=4)
        reply = httpx.post(f"{running.url}/v1/rewards", json={"items": items}, timeout=60)
    finally:
        running.stop()
    assert reply.status_code == 200, reply.text
    expected = _score_command(tmp_path / "rm", items, tmp_path)
    np.testing.assert_allclose(reply.json()["rewards"], expected, atol=1e-5, rtol=0)
    assert np.ptp(expected) > 1e-3


def test_split_query():
    assert split_query("<s>Hi there. Fine.", "Hi there.") == {
        "prompt": "Hi there.",
        "response": " Fine.",
    }
    assert split_query("Hi there. Fine.", "Bye") == {"text": "Hi there. Fine."}
    assert split_query("Hi there. Fine.", None) == {"text": "Hi there. Fine."}
    pads = ("<pad>", "</s>")
    assert strip_ends("<pad><pad>Hi</s> there</s><pad><pad>", pads) == "Hi</s> there"
    assert strip_ends("Hi", pads) == "Hi" and strip_ends("<pad></s>", pads) == ""


GOOD = {"items": [{"prompt": "hello", "response": "hi"}]}
BAD_REQUESTS = [
    ("POST", "/v1/rewards", b"{not json", 400, "malformed JSON"),
    ("POST", "/v1/rewards", b"\xff\xfe", 400, "malformed JSON"),
    ("POST", "/v1/rewards", b"[1, 2]", 422, "must be a JSON object"),
    ("POST", "/v1/rewards", b"{}", 422, "missing field 'items'"),
    ("POST", "/v1/rewards", b'{"items": "x"}', 422, "must be a list"),
    ("POST", "/v1/rewards", b'{"items": []}', 422, "is empty"),
    ("POST", "/v1/rewards", b'{"items": [3]}', 422, "items[0] must be an object"),
    ("POST", "/v1/rewards", b'{"items": [{"prompt": "a"}]}', 422, "missing field 'response'"),
    (
        "POST",
        "/v1/rewards",
        b'{"items": [{"prompt": 1, "response": "b"}]}',
        422,
        "items[0].prompt must be a string",
    ),
    (
        "POST",
        "/v1/rewards",
        b'{"items": [{"promt": "a", "prompt": "a", "response": "b"}]}',
        422,
        "unknown field 'promt'",
    ),
    (
        "POST",
        "/v1/rewards",
        json.dumps({"items": [GOOD["items"][0]] * 17}).encode(),
        413,
        "17 items is over the limit of 16",
    ),
    (
        "POST",
        "/v1/rewards",
        json.dumps({"items": [{"prompt": "a" * 20000, "response": "b"}]}).encode(),
        413,
        "over the limit of 16384",
    ),
    ("POST", "/get_reward", b'{"query": ["a", 2]}', 422, "query[1] must be a string"),
    (
        "POST",
        "/get_reward",
        b'{"query": ["a"], "prompts": ["a", "b"]}',
        422,
        "2 prompts for 1 queries",
    ),
    ("POST", "/get_reward", b'{"queries": ["a"]}', 422, "missing field 'query'"),
    ("GET", "/v1/rewards", b"", 405, "Method Not Allowed"),
    ("POST", "/v2/rewards", b"{}", 404, "Not Found"),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "reason"),
    BAD_REQUESTS,
    ids=[f"{r[3]}-{r[4][:24]}" for r in BAD_REQUESTS],
)
def test_bad_request_gets_4xx_and_the_server_goes_on(server, method, path, body, status, reason):
    reply = httpx.request(method, f"{server.url}{path}", content=body, timeout=30)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert reason in error and "\n" not in error
    assert httpx.post(f"{server.url}/v1/rewards", json=GOOD, timeout=30).status_code == 200


def test_a_chunked_body_over_the_limit_is_refused(server):
    def chunks():
        for _ in range(20):
            yield b" " * 1000

    reply = httpx.post(f"{server.url}/v1/rewards", content=chunks(), timeout=30)
    assert reply.status_code == 413
    assert httpx.post(f"{server.url}/v1/rewards", json=GOOD, timeout=30).status_code == 200


def test_non_finite_rewards_fail_the_request(server, scorer):
    bias = scorer.params["head_bias"]
    scorer.params["head_bias"] = bias * np.nan  # same shapes: the compiled programs stay
    try:
        reply = httpx.post(f"{server.url}/v1/rewards", json=GOOD, timeout=30)
        assert reply.status_code == 500 and "non-finite" in reply.json()["error"]
        assert "NaN" not in reply.text
    finally:
        scorer.params["head_bias"] = bias
    assert httpx.post(f"{server.url}/v1/rewards", json=GOOD, timeout=30).status_code == 200


def test_health_and_metrics(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ready", "model": "tiny"}
    httpx.post(f"{server.url}/v1/rewards", json=GOOD, timeout=30)
    text = httpx.get(f"{server.url}/metrics").text
    ok = [
        line
        for line in text.splitlines()
        if line.startswith("dynrules_requests_total{")
        and 'endpoint="/v1/rewards"' in line
        and 'status="200"' in line
    ]
    assert ok and float(ok[0].split()[-1]) >= 1
    assert "dynrules_ready 1.0" in text and "dynrules_batch_items_bucket" in text


def test_api_key_required_and_never_logged(scorer, caplog):
    caplog.set_level(logging.DEBUG)
    running = Running(scorer, ServeConfig(port=0), api_key=SECRET)
    try:
        url = f"{running.url}/v1/rewards"
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": SECRET}):
            reply = httpx.post(url, json=GOOD, headers=headers, timeout=30)
            assert reply.status_code == 401 and SECRET not in reply.text
        assert httpx.get(f"{running.url}/metrics").status_code == 401
        assert httpx.get(f"{running.url}/health").status_code == 200  # probes carry no key
        good = httpx.post(url, json=GOOD, headers={"Authorization": f"Bearer {SECRET}"}, timeout=30)
        assert good.status_code == 200
        from dynrules import RewardClient
        from dynrules.errors import DynrulesError

        with RewardClient(running.url, api_key=SECRET) as client:
            assert len(client.rewards(["hello"], ["hi"])) == 1
        with RewardClient(running.url, api_key="wrong") as client:
            with pytest.raises(DynrulesError, match="HTTP 401") as refused:
                client.rewards(["hello"], ["hi"])
            assert SECRET not in str(refused.value)
    finally:
        running.stop()
    assert caplog.records and not any(SECRET in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_64_concurrent_clients(server, scorer):
    """64 clients × 20 requests of 1–3 items each, all answered correctly and in order."""
    from dynrules.train.data import score_text

    counts = np.random.default_rng(0).integers(1, 4, (64, 20))
    requests = [
        [_items(int(n), seed=100 * c + r) for r, n in enumerate(row)]
        for c, row in enumerate(counts)
    ]
    keys = sorted(
        {(it["prompt"], it["response"]) for reqs in requests for req in reqs for it in req}
    )
    offline = scorer.rewards([score_text({"prompt": p, "response": r}) for p, r in keys])
    reference = dict(zip(keys, offline, strict=True))

    async def client(reqs, http):
        answers = []
        for items in reqs:
            reply = await http.post(f"{server.url}/v1/rewards", json={"items": items})
            answers.append((items, reply.status_code, reply.json()))
        return answers

    async def everyone():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(limits=limits, timeout=60) as http:
            return await asyncio.gather(*(client(reqs, http) for reqs in requests))

    started = time.monotonic()
    results = asyncio.run(asyncio.wait_for(everyone(), 120))
    seconds = time.monotonic() - started
    answered = [a for answers in results for a in answers]
    assert len(answered) == 64 * 20
    for items, status, body in answered:
        assert status == 200, body
        want = [reference[it["prompt"], it["response"]] for it in items]
        np.testing.assert_allclose(body["rewards"], want, atol=1e-5, rtol=0)
    assert seconds < 60


def test_sigterm_during_load_loses_no_accepted_request(model, tmp_path):
    """A server in its own process, with a key; SIGTERM while requests wait in its queue."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_path = tmp_path / "server.log"
    env = os.environ | {KEY_ENV: SECRET}
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "dynrules",
                "serve",
                str(model),
                "--port",
                str(port),
                "--api-key-env",
                KEY_ENV,
                "--max-wait-ms",
                "200",
                "--row-tiers",
                "1",
                "--access-log",
            ],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    url, headers = f"http://127.0.0.1:{port}", {"Authorization": f"Bearer {SECRET}"}
    try:
        polls = _wait_ready(url, headers, process=process)
        assert httpx.post(f"{url}/v1/rewards", json=GOOD, timeout=30).status_code == 401
        ok, refused, wrong, stop = [], [], [], threading.Event()

        def client():
            with httpx.Client(headers=headers, timeout=30) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    try:
                        reply = http.post(f"{url}/v1/rewards", json=GOOD)
                    except httpx.TransportError:
                        refused.append(1)  # not accepted (closed or refused connection)
                        time.sleep(0.01)
                        continue
                    if reply.status_code == 200:
                        ok.append((sent, time.monotonic()))
                    else:
                        wrong.append(reply.status_code)

        threads = [threading.Thread(target=client) for _ in range(8)]
        for thread in threads:
            thread.start()
        while len(ok) < 16:
            time.sleep(0.01)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        process.wait(60)
        stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        if process.poll() is None:
            process.kill()
    output = log_path.read_text()
    assert process.returncode in (0, -signal.SIGTERM), output
    assert not wrong and refused, output
    in_flight = sum(1 for sent, received in ok if sent < signalled < received)
    assert in_flight >= 1, "no request was in flight at SIGTERM: the test proved nothing"
    summary = [line for line in output.splitlines() if "accepted requests answered" in line]
    answered, accepted = (int(x) for x in summary[-1].split("stopped: ")[1].split()[:3:2])
    # every accepted request answered: the clients' 200s, the health polls and the 401
    assert answered == accepted == len(ok) + polls + 1, output
    assert SECRET not in output
