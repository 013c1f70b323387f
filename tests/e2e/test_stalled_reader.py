"""A client that sends a streaming request and then never reads its socket: the server aborts
its sequences once a chunk waits longer than --stream-read-timeout (the main server runs with
conftest.STREAM_READ_TIMEOUT_S), frees their KV blocks, and keeps serving everyone else meanwhile."""

from __future__ import annotations

import json
import socket
import time

import httpx

N, MAX_TOKENS = 8, 1200


def stalled_stream(port: int) -> socket.socket:
    """A raw socket that sent a big streaming request and will never read (a tiny receive
    buffer; the server bounds its send buffer, so its buffers fill after ~200 KB)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    body = json.dumps({"prompt": "Write a very long story about a garden.", "stream": True,
                       "n": N, "max_tokens": MAX_TOKENS, "ignore_eos": True, "logprobs": 20,
                       "temperature": 1.0}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def test_stalled_reader_is_aborted_and_its_kv_freed_while_others_are_served(
        server, client, model_name, metric):
    aborted0 = metric(server.url, "ember:num_aborted_requests_total")
    generated0 = metric(server.url, "ember:generation_tokens_total")
    sock = stalled_stream(server.port)
    try:
        # Wait until the stalled request runs, then serve a normal client alongside it.
        deadline = time.monotonic() + 60
        while metric(server.url, "ember:num_requests_running") < N:
            assert time.monotonic() < deadline, "the stalled request never started"
            time.sleep(0.2)
        normal = client.completions.create(model=model_name, prompt="Hello", max_tokens=8,
                                           extra_body={"ignore_eos": True})
        assert normal.choices[0].finish_reason == "length"
        # The stalled stream is aborted after the read timeout: sequences gone, KV freed.
        deadline = time.monotonic() + 120
        while metric(server.url, "ember:num_aborted_requests_total") == aborted0:
            assert time.monotonic() < deadline, "the stalled stream was never aborted"
            time.sleep(0.25)
        stalled_for = time.monotonic()
        while metric(server.url, "ember:num_requests_running") > 0:
            assert time.monotonic() - stalled_for < 10
            time.sleep(0.1)
        assert metric(server.url, "ember:kv_cache_usage_perc") == 0.0
        # It was cut short: far fewer tokens than its n x max_tokens were generated.
        assert metric(server.url, "ember:generation_tokens_total") - generated0 < N * MAX_TOKENS
        assert "aborted a stream whose client read nothing" in server.log()
        # The server still serves (and /health is fine).
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        again = client.completions.create(model=model_name, prompt="Hi", max_tokens=4)
        assert again.choices[0].text is not None
    finally:
        sock.close()
