"""Server robustness on the tiny in-process engine: engine supervision (an exception and a
hung step injected through the config's test-only fault hook), bounded output buffering,
request limits, error mapping, Host checks, trusted proxies and bounded metric labels."""

from __future__ import annotations

import asyncio
import json
import threading
import time

from fastapi.testclient import TestClient
from test_server import _engine

from ember.config import ServingGuards
from ember.engine.async_engine import AsyncEngine
from ember.engine.mailbox import Mailbox
from ember.server.app import create_app
from ember.types import CompletionOutput, RequestOutput


def _client(**server: object) -> TestClient:
    engine = _engine(**server)
    return TestClient(create_app(engine.config, engine=AsyncEngine(engine)))


class Faults:
    """A fault hook: raise at one step, or hang one step (until released)."""

    def __init__(self, raise_at: int | None = None, hang_at: int | None = None) -> None:
        self.raise_at, self.hang_at = raise_at, hang_at
        self.release = threading.Event()

    def __call__(self, step: int) -> None:
        if step == self.raise_at:
            self.raise_at = None
            raise RuntimeError("injected step failure")
        if step == self.hang_at:
            self.hang_at = None
            self.release.wait(20)


def _wait_ready(client: TestClient, within_s: float = 10.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < within_s:
        if client.get("/health").status_code == 200:
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"not ready within {within_s} s: {client.get('/health').json()}")


def _restarts(client: TestClient) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("ember:engine_restarts_total"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no ember:engine_restarts_total in /metrics")


def test_step_exception_ends_requests_with_engine_error_and_the_engine_restarts():
    faults = Faults(raise_at=2)
    with _client(guards=ServingGuards(fault_hook=faults)) as client:
        resp = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 20,
                                                    "ignore_eos": True})
        assert resp.status_code == 500
        assert resp.json()["error"]["code"] == "engine_error"
        assert "injected step failure" in resp.json()["error"]["message"]
        _wait_ready(client)
        ok = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3,
                                                  "ignore_eos": True})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        assert _restarts(client) == 1


def test_hung_step_past_the_deadline_ends_the_stream_and_restarts():
    faults = Faults(hang_at=3)
    guards = ServingGuards(fault_hook=faults, step_deadline_s=0.5)
    try:
        with _client(guards=guards) as client:
            with client.stream("POST", "/v1/completions", json={
                    "prompt": "hello", "max_tokens": 50, "ignore_eos": True,
                    "stream": True}) as resp:
                events = [e for e in resp.read().decode().split("\n\n") if e]
            assert resp.status_code == 200 and events[-1] == "data: [DONE]"
            error = json.loads(events[-2][len("data: "):])["error"]
            assert error["code"] == "engine_error" and "deadline" in error["message"]
            took = _wait_ready(client)
            assert took < 10
            ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                      "ignore_eos": True})
            assert ok.status_code == 200
            assert _restarts(client) == 1
            assert client.get("/health").json() == {"status": "ok"}
    finally:
        faults.release.set()


def test_health_reports_the_phase():
    engine = _engine()
    app = create_app(engine.config, engine=AsyncEngine(engine))
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        state = app.state.ember
        state.engine._restarting = True
        body = client.get("/health")
        assert body.status_code == 503 and body.json()["error"]["code"] == "restarting"
        state.engine._restarting = False
        state.begin_drain()
        assert client.get("/health").json()["error"]["code"] == "draining"


def _out(delta: str, ids: list[int], finished: bool = False) -> RequestOutput:
    comp = CompletionOutput(index=0, text="", token_ids=[], delta_text=delta,
                            delta_token_ids=list(ids), finish_reason="length" if finished else None)
    return RequestOutput("r", None, [1], [comp], finished=finished)


def test_mailbox_coalesces_unread_outputs_and_releases_at_the_final_one():
    released: list[bool] = []

    async def run() -> None:
        box = Mailbox(on_final=lambda: released.append(True))
        for i in range(1000):  # an unread stream: one pending output, never 1000
            box.put(_out("ab", [i, i]))
        assert not released
        box.put(_out("c", [7], finished=True))
        assert released == [True]  # the engine is done: the sequences stop counting
        item = await box.get()
        assert isinstance(item, RequestOutput) and item.finished
        assert item.outputs[0].delta_text == "ab" * 1000 + "c"
        assert len(item.outputs[0].delta_token_ids) == 2001

    asyncio.run(run())
