"""API keys (401), per-key rate limits and admission control (429 + Retry-After), and a
graceful SIGTERM. Uses the `limited_server` (--max-num-seqs 1 --max-queued-requests 1); the
SIGTERM test ends that server, so it comes last."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import openai
import pytest

NO_EOS = {"ignore_eos": True}


def _client(server, key: str | None):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key or "wrong-key",
                         max_retries=0, timeout=120)


def test_auth_401_and_open_health(limited_server, limits):
    url = limited_server.url
    main_key = limits["main_key"]
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {main_key}"}):
        resp = httpx.get(f"{url}/v1/models", headers=headers)
        assert resp.status_code == 401, resp.text
        assert resp.json()["error"]["code"] == "invalid_api_key"
        assert resp.headers["www-authenticate"] == "Bearer"
    with pytest.raises(openai.AuthenticationError):
        _client(limited_server, None).models.list()
    assert _client(limited_server, main_key).models.list().data
    assert httpx.get(f"{url}/tokenize").status_code == 401
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/metrics").status_code == 200


def test_rate_limit_requests_per_minute(limited_server, limits):
    client = _client(limited_server, "sk-rate")
    for _ in range(limits["rpm"]):
        client.completions.create(model="", prompt="Hi", max_tokens=1)
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="", prompt="Hi", max_tokens=1)
    retry_after = int(info.value.response.headers["retry-after"])
    assert 1 <= retry_after <= 60
    assert "requests per minute" in info.value.body["message"]
    # another key has its own budget
    _client(limited_server, limits["main_key"]).completions.create(model="", prompt="Hi", max_tokens=1)


def test_rate_limit_tokens_per_minute_with_refund(limited_server, limits):
    client = _client(limited_server, "sk-tpm")
    with pytest.raises(openai.RateLimitError):  # can never fit in the per-minute budget
        client.completions.create(model="", prompt="Hi", max_tokens=limits["tpm"] + 1)
    stream = client.completions.create(model="", prompt="Hi", max_tokens=300, stream=True,
                                       extra_body=NO_EOS)
    next(iter(stream))  # 1 + 300 tokens reserved while it runs
    with pytest.raises(openai.RateLimitError) as info:
        client.completions.create(model="", prompt="Hi", max_tokens=200)
    assert "retry-after" in info.value.response.headers
    stream.close()  # aborted after a few tokens: the unused reservation is given back
    deadline = time.monotonic() + 20
    while True:
        try:
            client.completions.create(model="", prompt="Hi", max_tokens=200, stop=["\n", "."])
            break
        except openai.RateLimitError:
            assert time.monotonic() < deadline, "unused tokens were not refunded"
            time.sleep(0.2)


def test_queue_full_429(limited_server, metric):
    async def run() -> None:
        def client(key: str) -> openai.AsyncOpenAI:
            return openai.AsyncOpenAI(base_url=f"{limited_server.url}/v1", api_key=key,
                                      max_retries=0, timeout=120)

        running = await client("sk-queue-a").completions.create(
            model="", prompt="Once", max_tokens=380, stream=True, extra_body=NO_EOS)
        await running.__anext__()  # occupies the only running slot (380 tokens: under the TPM)
        queued = asyncio.create_task(client("sk-queue-b").completions.create(
            model="", prompt="Twice", max_tokens=2, stream=True))
        # wait until the second request is queued (polled: a fast CPU ends the first request
        # within any fixed sleep)
        deadline = time.monotonic() + 30
        while metric(limited_server.url, "ember:num_requests_waiting") < 1:
            assert time.monotonic() < deadline, "the second request never queued"
            await asyncio.sleep(0.02)
        with pytest.raises(openai.RateLimitError) as info:
            await client("sk-queue-c").completions.create(model="", prompt="Thrice",
                                                          max_tokens=2)
        assert info.value.body["code"] == "queue_full"
        assert info.value.response.headers["retry-after"] == "1"
        await running.close()
        second = await queued
        assert [c async for c in second]

    asyncio.run(run())
    assert metric(limited_server.url, "ember:requests_rejected_total", 'reason="queue_full"') >= 1


def test_sigterm_finishes_stream_and_exits_0(limited_server):
    """Last test of the module: it ends the server."""
    body = {"model": "", "prompt": "Tell me about the sea.", "max_tokens": 24, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": "Bearer sk-term"}
    events: list[str] = []
    with httpx.stream("POST", f"{limited_server.url}/v1/completions", json=body,
                      headers=headers, timeout=120) as resp:
        assert resp.status_code == 200
        lines = resp.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        limited_server.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        try:
            status = httpx.get(f"{limited_server.url}/health", timeout=2).status_code
        except httpx.HTTPError:
            status = None  # no longer accepting connections
        assert status != 200
        events += [line for line in lines if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    usage = httpx.Response(200, content=events[-2][len("data: "):]).json()["usage"]
    assert usage["completion_tokens"] == 24
    assert '"finish_reason":"length"' in events[-3]
    assert limited_server.proc.wait(timeout=60) == 0

