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


# ---- bounded work and limits -----------------------------------------------------------------


def test_requests_that_can_never_run_or_would_flood_get_400_saying_why():
    # The tiny engine: vocab 257, max_num_seqs 4, 64 KV blocks x 16 tokens, context 256.
    with _client(max_queued_requests=4, guards=ServingGuards(max_response_items=5000)) as client:
        def post(**body: object) -> dict:
            resp = client.post("/v1/completions", json={"prompt": "hi", **body})
            assert resp.status_code == 400, resp.text[:300]
            return resp.json()["error"]

        err = post(n=9, max_tokens=1)  # 9 > 4 running + 4 queued: never admitted (was 429)
        assert err["param"] == "n" and "could never be admitted" in err["message"]
        err = post(stop_token_ids=[5, 257], max_tokens=1)  # beyond the vocabulary
        assert err["param"] == "stop_token_ids" and "257" in err["message"]
        err = post(stop_token_ids=list(range(200)) * 6, max_tokens=1)
        assert err["param"] == "stop_token_ids" and "1024" in err["message"]
        err = post(stop=["x" * 1025], max_tokens=1)
        assert err["param"] == "stop"
        err = post(n=8, max_tokens=200, logprobs=5, ignore_eos=True)  # 9600 > 5000 items
        assert err["param"] == "logprobs"
        # Chat: the same limits.
        chat = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "stop_token_ids": [999]})
        assert chat.status_code == 400 and chat.json()["error"]["param"] == "stop_token_ids"
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "n": 2,
                                                  "stop_token_ids": [5]})
        assert ok.status_code == 200


def test_prompt_logprob_work_is_bounded():
    guards = ServingGuards(max_prompt_logprob_items=100)
    with _client(guards=guards) as client:
        resp = client.post("/v1/completions", json={
            "prompt": "hello world, a longer prompt", "echo": True, "logprobs": 1,
            "max_tokens": 0, "n": 4})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == "echo"


def test_lone_surrogate_is_400_everywhere_and_logs_no_traceback(caplog):
    with _client() as client:
        for path, body in (("/v1/completions", {"prompt": "a\ud800b", "max_tokens": 1}),
                           ("/v1/completions", {"prompt": ["ok", "\ud800"], "max_tokens": 1}),
                           ("/tokenize", {"prompt": "\ud800"}),
                           ("/v1/completions", {"prompt": "hi", "stop": ["\ud800"]}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "\ud800"}]})):
            resp = client.post(path, content=json.dumps(body),  # ensure_ascii keeps \\ud800
                               headers={"Content-Type": "application/json"})
            assert resp.status_code == 400, (path, resp.text)
            assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in caplog.text


def test_rate_limits_count_sequences_and_cover_tokenize():
    with _client(rate_limit_rpm=4) as client:
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 200
        assert client.post("/detokenize", json={"tokens": [1]}).status_code == 200
        # Two of four units used: n=3 does not fit any more (it counts 3, not 1 request).
        resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1, "n": 3})
        assert resp.status_code == 429
        assert client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1,
                                                    "n": 2}).status_code == 200
        assert client.post("/tokenize", json={"prompt": "hi"}).status_code == 429


def test_metric_labels_stay_bounded():
    with _client() as client:
        for i in range(20):
            client.request(f"M{i}X", "/v1/models")
            client.get(f"/no/such/path/{i}")
        text = client.get("/metrics").text
        lines = [ln for ln in text.splitlines() if ln.startswith("ember:http_requests_total")]
        assert not any('method="M' in ln for ln in lines)
        assert any('method="other"' in ln for ln in lines)
        assert len(lines) < 10


def test_host_header_allow_list():
    guards = ServingGuards(allowed_hosts=("localhost", "127.0.0.1", "::1"))
    with _client(guards=guards) as client:
        evil = client.get("/v1/models", headers={"Host": "evil.example:8000"})
        assert evil.status_code == 400 and evil.json()["error"]["code"] == "host_not_allowed"
        for host in ("localhost:8000", "127.0.0.1", "[::1]:8000"):
            assert client.get("/health", headers={"Host": host}).status_code == 200


def test_trusted_proxies_default_off_in_the_cli():
    from ember.cli import build_parser  # noqa: PLC0415 - CLI import only here
    from ember.cli.serve import _config

    args = build_parser().parse_args(["serve"])
    config = _config(args)
    assert config.server.guards.trusted_proxies == ()
    assert config.server.guards.allowed_hosts == ("localhost", "127.0.0.1", "::1")
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0",
                                      "--trusted-proxies", "10.0.0.0/8"])
    config = _config(args)
    assert config.server.guards.allowed_hosts is None
    assert config.server.guards.trusted_proxies == ("10.0.0.0/8",)


def test_stalled_reader_stream_is_aborted_after_the_read_timeout():
    from ember.server.serving.base import EventStreamResponse

    closed = asyncio.Event()

    async def body():
        try:
            for i in range(10**6):
                yield f"data: {i}\n\n"
        finally:
            closed.set()  # in the server this aborts the engine request (KV freed)

    async def run() -> None:
        started = asyncio.Event()

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body":
                started.set()
                await asyncio.Event().wait()  # the client never reads: send blocks

        async def receive() -> dict:
            await asyncio.Event().wait()
            return {}

        response = EventStreamResponse(body(), read_timeout_s=0.3)
        scope = {"type": "http", "asgi": {"spec_version": "2.4"}, "method": "GET"}
        await asyncio.wait_for(response(scope, receive, send), 5)
        assert started.is_set() and closed.is_set()

    asyncio.run(run())


def test_prefix_cache_is_isolated_per_api_key():
    prompt = "the same long prompt, shared by two callers: " * 2  # > 2 blocks of 16 tokens
    with _client(api_keys=("key-a", "key-b")) as client:
        def cached(key: str) -> int:
            resp = client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                               json={"prompt": prompt, "max_tokens": 1})
            assert resp.status_code == 200
            return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

        assert cached("key-a") == 0
        assert cached("key-a") >= 32  # a hit within the key
        assert cached("key-b") == 0  # another key never sees key-a's cached prefix
        assert cached("key-b") >= 32


def test_openmp_environment_sets_the_spin_count_unless_the_user_did(monkeypatch):
    import pytest

    from ember.config import ConfigError, ServingGuards, openmp_environment

    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert openmp_environment(None) == {}
    assert openmp_environment(10000) == {"GOMP_SPINCOUNT": "10000"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert openmp_environment(10000) == {}
    with pytest.raises(ConfigError, match="omp_spin_count"):
        ServingGuards(omp_spin_count=-1).validate()


def test_repetition_penalty_too_small_for_float32_is_400():
    # 1e-300 is > 0 but rounds to float32 0: the sampler divided logits by zero (inf logits;
    # found by the schemathesis run as a RuntimeWarning in the server log).
    import pytest

    from ember.types import InvalidRequestError, SamplingParams

    with pytest.raises(InvalidRequestError, match="repetition_penalty"):
        SamplingParams(repetition_penalty=1e-300).validate()
    with _client() as client:
        for path, body in (("/v1/completions", {"prompt": "hi"}),
                           ("/v1/chat/completions",
                            {"messages": [{"role": "user", "content": "hi"}]})):
            resp = client.post(path, json={**body, "max_tokens": 2, "repetition_penalty": 1e-300})
            assert resp.status_code == 400, resp.text[:300]
            assert resp.json()["error"]["param"] == "repetition_penalty"
        ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2,
                                                  "repetition_penalty": 0.5})
        assert ok.status_code == 200
