"""Continuous batching over HTTP: concurrent greedy streams equal offline generation; a client
that goes away is aborted and its KV blocks are freed."""

from __future__ import annotations

import asyncio
import dataclasses
import time

import httpx
import pytest

NUM_CLIENTS = 16
MAX_TOKENS = 10


def _prompts() -> list[str]:
    subjects = ["the sea", "a garden", "winter", "a library", "the moon", "bread", "a river",
                "music", "a train", "mountains", "the city", "a letter", "rain", "a cat",
                "the morning", "a lighthouse"]
    return [f"Write one sentence about {s}." if i % 2 else f"Here is a short story about {s}:"
            for i, s in enumerate(subjects[:NUM_CLIENTS])]


def test_concurrent_streams_equal_offline_generate(server, model_name, make_llm):
    from openai import AsyncOpenAI

    llm = make_llm(quantization="auto")  # the server's default: the GGUF's own Q4 format
    prompts = _prompts()
    # NOTE: the server fills the fields a request leaves out (top_p, repetition_penalty, ...)
    # with the model's generation defaults, as get_default_sampling_params() does offline.
    params = dataclasses.replace(llm.get_default_sampling_params(), max_tokens=MAX_TOKENS,
                                 temperature=0.0)
    offline = llm.generate(prompts, params, use_tqdm=False)
    expected = [o.outputs[0].text for o in offline]

    async def one(client: AsyncOpenAI, prompt: str, delay: float) -> str:
        await asyncio.sleep(delay)  # staggered: later requests join a running batch
        stream = await client.completions.create(model=model_name, prompt=prompt,
                                                 max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream if chunk.choices])

    async def run() -> list[str]:
        client = AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                             timeout=120)
        try:
            return await asyncio.gather(*(one(client, p, 0.02 * i)
                                          for i, p in enumerate(prompts)))
        finally:
            await client.close()

    assert asyncio.run(run()) == expected


def _wait_idle(metric_value, url: str, aborted_before: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (metric_value(url, "ember:num_aborted_requests_total") > aborted_before
                and metric_value(url, "ember:kv_cache_usage_perc") == 0.0
                and metric_value(url, "ember:num_requests_running") == 0.0):
            return
        time.sleep(0.1)
    pytest.fail("the aborted request still holds KV blocks or did not count as aborted")


def test_stream_disconnect_aborts_and_frees_kv(server, client, model_name, metric):
    aborted = metric(server.url, "ember:num_aborted_requests_total")
    stream = client.completions.create(model=model_name, prompt="Tell me a long story.",
                                       max_tokens=500, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert metric(server.url, "ember:kv_cache_usage_perc") > 0
    stream.close()  # the client goes away mid-stream
    _wait_idle(metric, server.url, aborted)
    assert metric(server.url, "ember:request_success_total", 'finished_reason="abort"') >= 1


def test_non_stream_disconnect_aborts(server, model_name, metric):
    aborted = metric(server.url, "ember:num_aborted_requests_total")
    body = {"model": model_name, "prompt": "Count to one thousand:", "max_tokens": 800,
            "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, timeout=1.5)
    _wait_idle(metric, server.url, aborted)


def test_metrics_after_traffic(server, metric):
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("ember:time_to_first_token_seconds_bucket", "ember:inter_token_latency_seconds",
                 "ember:e2e_request_latency_seconds", "ember:request_queue_time_seconds",
                 "ember:num_requests_running", "ember:num_requests_waiting",
                 "ember:kv_cache_usage_perc", "ember:prompt_tokens_total",
                 "ember:generation_tokens_total", "ember:prefix_cache_queries_total",
                 "ember:prefix_cache_hits_total", "ember:num_preemptions_total",
                 "ember:num_aborted_requests_total", "ember:request_success_total"):
        assert name in text, name
    assert metric(server.url, "ember:time_to_first_token_seconds_count") >= NUM_CLIENTS
    assert metric(server.url, "ember:generation_tokens_total") >= NUM_CLIENTS
