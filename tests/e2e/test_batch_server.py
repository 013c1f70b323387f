"""/v1/files + /v1/batches with the official `openai` client: the whole batch flow, answers
equal to the HTTP endpoints', and a batch that survives a SIGKILL of the server."""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

POLL_TIMEOUT_S = 240.0


def _chat_line(custom_id: str, content: str, max_tokens: int = 8, **extra: object) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": content}],
                     "max_tokens": max_tokens, "temperature": 0, **extra}}


def _upload(client: openai.OpenAI, lines: list[dict | str]) -> str:
    data = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    file = client.files.create(file=("requests.jsonl", io.BytesIO(data.encode())),
                               purpose="batch")
    assert file.bytes == len(data.encode()) and file.purpose == "batch"
    return file.id


def _wait(client: openai.OpenAI, batch_id: str, statuses: tuple[str, ...]):
    deadline = time.monotonic() + POLL_TIMEOUT_S
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.3)
    pytest.fail(f"batch {batch_id} still {batch.status} after {POLL_TIMEOUT_S} s")


def _lines(client: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(x) for x in client.files.content(file_id).text.splitlines()]


def test_openai_batch_flow(server, client, model_name) -> None:
    questions = ["What is the capital of Italy?", "Say hello.", "Name a fruit."]
    lines: list[dict | str] = [_chat_line(f"q{i}", q) for i, q in enumerate(questions)]
    lines += [_chat_line("hot", "x", temperature=7), "{not json"]
    input_id = _upload(client, lines)
    batch = client.batches.create(input_file_id=input_id, endpoint="/v1/chat/completions",
                                  completion_window="24h", metadata={"job": "test"})
    assert batch.status in ("validating", "in_progress") and batch.metadata == {"job": "test"}
    batch = _wait(client, batch.id, ("completed", "failed", "cancelled"))
    assert batch.status == "completed", batch
    assert batch.request_counts is not None
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (5, 3, 2)
    ok, errors = _lines(client, batch.output_file_id), _lines(client, batch.error_file_id)
    assert sorted(x["custom_id"] for x in ok) == ["q0", "q1", "q2"]
    for line in ok:  # the same answer as the HTTP endpoint (greedy)
        i = int(line["custom_id"][1:])
        direct = client.chat.completions.create(
            model=model_name, messages=[{"role": "user", "content": questions[i]}],
            max_tokens=8, temperature=0)
        assert line["response"]["body"]["choices"][0]["message"]["content"] == \
            direct.choices[0].message.content
    [hot] = [x for x in errors if x["custom_id"] == "hot"]
    direct_err = httpx.post(f"{server.url}/v1/chat/completions", timeout=30,
                            json=_chat_line("hot", "x", temperature=7)["body"])
    assert direct_err.status_code == 400
    assert hot["response"] == {"status_code": 400, "request_id": hot["response"]["request_id"],
                               "body": direct_err.json()}
    [broken] = [x for x in errors if x["custom_id"] is None]
    assert broken["error"]["code"] == "invalid_json"
    assert batch.id in [b.id for b in client.batches.list()]
    assert input_id in [f.id for f in client.files.list()]
    with pytest.raises(openai.ConflictError):
        client.batches.cancel(batch.id)
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    with pytest.raises(openai.BadRequestError):
        client.batches.create(input_file_id=input_id, endpoint="/v1/nope",  # type: ignore[arg-type]
                              completion_window="24h")


def test_cancel_keeps_what_finished(client) -> None:
    lines: list[dict | str] = [_chat_line(f"c{i}", f"Count to {i}.", 16) for i in range(40)]
    batch = client.batches.create(input_file_id=_upload(client, lines),
                                  endpoint="/v1/chat/completions", completion_window="24h")
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = _wait(client, batch.id, ("cancelled", "completed", "failed"))
    assert done.status == "cancelled" and done.cancelled_at is not None
    assert done.request_counts is not None and done.request_counts.completed < 40
    kept = _lines(client, done.output_file_id) + _lines(client, done.error_file_id)
    assert len(kept) == done.request_counts.completed + done.request_counts.failed
    assert len({x["custom_id"] for x in kept}) == len(kept)


def test_server_restart_resumes_a_batch(server_process, tmp_path: Path) -> None:
    args = ["--batch-dir", str(tmp_path / "batches"), "--max-num-seqs", "2"]
    first = server_process(args, tmp_path / "first.log")
    first.start()
    try:
        first.wait_ready()
        client = openai.OpenAI(base_url=f"{first.url}/v1", api_key="x", max_retries=0)
        lines: list[dict | str] = [_chat_line(f"r{i}", f"Tell me a fact about {i}.", 16)
                                   for i in range(16)]
        batch = client.batches.create(input_file_id=_upload(client, lines),
                                      endpoint="/v1/chat/completions", completion_window="24h")
        deadline = time.monotonic() + POLL_TIMEOUT_S
        while client.batches.retrieve(batch.id).request_counts.completed < 2:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the batch made no progress"
            time.sleep(0.1)
        assert first.proc is not None
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait()
    finally:
        first.stop()
    second = server_process(args, tmp_path / "second.log")
    second.start()
    try:
        second.wait_ready()
        client = openai.OpenAI(base_url=f"{second.url}/v1", api_key="x", max_retries=0)
        done = _wait(client, batch.id, ("completed", "failed", "cancelled"))
        assert done.status == "completed"
        ok = _lines(client, done.output_file_id)
        assert sorted(x["custom_id"] for x in ok) == sorted(f"r{i}" for i in range(16))
        assert done.error_file_id is None
    finally:
        second.stop()
