"""``dynrules.RewardClient``: rewards from a running ``dynrules serve``, in a few lines of httpx.

    client = RewardClient("http://127.0.0.1:8000", api_key=os.environ["RM_KEY"])
    rewards = client.rewards(prompts, responses)   # list[float], in order

Long lists go in requests of ``items_per_request`` (the server's default ``--max-items``).
A refused request raises :class:`~dynrules.errors.DynrulesError` with the server's one-line
reason; the key is sent only in the Authorization header and never appears in an error.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import httpx

from dynrules.errors import DynrulesError


class RewardClient:
    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        timeout: float = 120.0,
        items_per_request: int = 1024,
    ):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.items_per_request = items_per_request
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)

    def rewards(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """One reward per (prompt, response), in order."""
        if len(prompts) != len(responses):
            raise DynrulesError(f"{len(prompts)} prompts for {len(responses)} responses")
        items = [{"prompt": p, "response": r} for p, r in zip(prompts, responses, strict=True)]
        rewards: list[float] = []
        for start in range(0, len(items), self.items_per_request):
            chunk = items[start : start + self.items_per_request]
            rewards += self._post("/v1/rewards", {"items": chunk})["rewards"]
        return rewards

    def ready(self) -> bool:
        """Whether the server answers /health with ready (False while it compiles or is down)."""
        try:
            return self._http.get("/health").status_code == 200
        except httpx.TransportError:
            return False

    def wait_ready(self, timeout: float = 600.0) -> None:
        """Block until the server is ready; DynrulesError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                raise DynrulesError(f"{self.base_url}: not ready after {timeout:g} s")
            time.sleep(0.1)

    def _post(self, path: str, body: dict) -> dict:
        for attempt in range(2):
            try:
                reply = self._http.post(path, json=body)
                break
            except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
                # the server closed a kept-alive connection as it was reused: scoring has no
                # side effects, so asking once more on a fresh connection is safe
                if attempt == 1:
                    raise DynrulesError(
                        f"{self.base_url}{path}: {type(exc).__name__}: {exc}"
                    ) from None
            except httpx.TransportError as exc:
                raise DynrulesError(f"{self.base_url}{path}: {type(exc).__name__}: {exc}") from None
        if reply.status_code != 200:
            try:
                reason = reply.json()["error"]
            except (ValueError, KeyError, TypeError):
                reason = reply.text[:200]
            raise DynrulesError(f"{self.base_url}{path}: HTTP {reply.status_code}: {reason}")
        return reply.json()

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RewardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
