"""`run-batch` in process on the real model: greedy answers equal `LLM.generate` / `LLM.chat`;
bad lines become error lines with the server's own 400 reasons, and the job goes on."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from ember.batch.offline import run_batch_file
from ember.engine.async_engine import AsyncEngine
from ember.engine.inline_engine import InlineAsyncEngine

CHATS = ["What is the capital of France?", "Name three colours.", "Write a haiku about rain.",
         "Count from one to five.", "What is 2 + 2?"]
PROMPTS = ["The quick brown fox", "Once upon a time", "def fibonacci(n):"]
MAX_TOKENS = 12


def _write_input(path: Path) -> None:
    lines: list[str] = []
    for i, text in enumerate(CHATS):
        lines.append(json.dumps({"custom_id": f"chat-{i}", "method": "POST",
                                 "url": "/v1/chat/completions",
                                 "body": {"messages": [{"role": "user", "content": text}],
                                          "max_tokens": MAX_TOKENS, "temperature": 0}}))
    lines.append("{not json")
    for i, prompt in enumerate(PROMPTS):
        lines.append(json.dumps({"custom_id": f"cmpl-{i}", "method": "POST",
                                 "url": "/v1/completions",
                                 "body": {"prompt": prompt, "max_tokens": MAX_TOKENS,
                                          "temperature": 0}}))
    lines += [
        json.dumps({"custom_id": "chat-0", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "dup"}]}}),
        json.dumps({"custom_id": "hot", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"messages": [{"role": "user", "content": "x"}],
                             "temperature": 5}}),
        json.dumps({"custom_id": "no-messages", "method": "POST",
                    "url": "/v1/chat/completions", "body": {"max_tokens": 4}}),
        json.dumps({"custom_id": "embed", "method": "POST", "url": "/v1/embeddings",
                    "body": {"input": "hello"}}),
    ]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def references(llm) -> tuple[list, list]:
    # NOTE: like the server, fields a request leaves out take the model's generation defaults
    # (repetition penalty included); temperature 0 makes both greedy.
    params = llm.engine.generation_defaults.sampling_params(temperature=0.0,
                                                            max_tokens=MAX_TOKENS)
    return (llm.chat([[{"role": "user", "content": t}] for t in CHATS], params,
                     use_tqdm=False),
            llm.generate(PROMPTS, params, use_tqdm=False))


@pytest.mark.parametrize("engine_class", [InlineAsyncEngine, AsyncEngine],
                         ids=["inline", "threaded"])
def test_run_batch_equals_llm_generate_and_reports_bad_lines(llm, references, tmp_path: Path,
                                                             engine_class: type) -> None:
    """`ember run-batch` steps on its event loop (InlineAsyncEngine); server batches use the
    threaded AsyncEngine: both give LLM.generate's answers."""
    ref_chat, ref_cmpl = references
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    _write_input(inp)

    async def run() -> object:
        engine = engine_class(llm.engine)  # the same engine the reference ran on
        engine.start()
        try:
            return await run_batch_file(llm.engine.config, inp, out, engine=engine)
        finally:
            await engine.shutdown()

    stats = asyncio.run(run())
    lines = [json.loads(raw) for raw in out.read_text().splitlines()]
    by_id: dict[str | None, list[dict]] = {}
    for line in lines:
        by_id.setdefault(line["custom_id"], []).append(line)
    assert len(lines) == len(CHATS) + len(PROMPTS) + 5
    for i, ref in enumerate(ref_chat):
        [first, dup] = sorted(by_id[f"chat-{i}"], key=lambda x: x["error"] is not None) \
            if i == 0 else [by_id[f"chat-{i}"][0], None]
        assert first["response"]["status_code"] == 200
        body = first["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == ref.outputs[0].text
        assert body["usage"]["completion_tokens"] == len(ref.outputs[0].token_ids)
        assert first["response"]["request_id"] == body["id"]
        if dup is not None:
            assert dup["response"] is None and dup["error"]["code"] == "duplicate_custom_id"
    for i, ref in enumerate(ref_cmpl):
        [line] = by_id[f"cmpl-{i}"]
        assert line["response"]["body"]["choices"][0]["text"] == ref.outputs[0].text
    [bad_json] = by_id[None]
    assert bad_json["error"]["code"] == "invalid_json" and "line 6" in bad_json["error"]["message"]
    [hot] = by_id["hot"]
    assert hot["response"]["status_code"] == 400
    assert hot["response"]["body"]["error"]["param"] == "temperature"
    [missing] = by_id["no-messages"]
    assert missing["response"]["status_code"] == 400
    assert missing["response"]["body"]["error"]["param"] == "messages"
    [embed] = by_id["embed"]
    assert embed["error"]["code"] == "unsupported_url"
    assert stats.completed == len(CHATS) + len(PROMPTS)  # type: ignore[attr-defined]
    assert stats.failed == 5  # type: ignore[attr-defined]


def test_run_batch_embeddings_lines(tmp_path: Path) -> None:
    """/v1/embeddings lines run through the server's embeddings serving (micro-batched):
    vectors equal `LLM.embed`, a bad line is that line's 400, usage is counted."""
    import pytest

    from ember import LLM
    from ember.config import EngineConfig, ModelConfig, ServerConfig
    from ember.config import EnvSettings
    from ember.loading.sources import PACKAGED_MODELS, packaged_path

    name = "all-minilm-l6-v2"
    model = next(m for m in PACKAGED_MODELS if m.name == name)
    if packaged_path(model, EnvSettings.from_env().cache_path, assemble=False) is None:
        pytest.skip(f"{name} not installed ({model.install_hint})")
    texts = ["A man is eating food.", "Ünïcödé テキスト 😀", "", "word " * 40,
             "The quick brown fox jumps over the lazy dog."]
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps({"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings",
                         "body": {"model": name, "input": t}}) for i, t in enumerate(texts)]
    lines.append(json.dumps({"custom_id": "ids", "method": "POST", "url": "/v1/embeddings",
                             "body": {"input": [[101, 7592, 102], [101, 102]],
                                      "encoding_format": "base64"}}))
    lines.append(json.dumps({"custom_id": "bad", "method": "POST", "url": "/v1/embeddings",
                             "body": {"input": "hi", "dimensions": 7}}))
    lines.append(json.dumps({"custom_id": "chat", "method": "POST",
                             "url": "/v1/chat/completions",
                             "body": {"messages": [{"role": "user", "content": "hi"}]}}))
    inp.write_text("\n".join(lines) + "\n")
    config = EngineConfig(model=ModelConfig(model=name),
                          server=ServerConfig(embedding_models=(name,), serve_generator=False))
    stats = asyncio.run(run_batch_file(config, inp, out))
    by_id = {x["custom_id"]: x for x in map(json.loads, out.read_text().splitlines())}
    assert len(by_id) == len(lines)
    ref = LLM(model=name, show_progress=False).embed(texts)
    for i, vec in enumerate(ref):
        resp = by_id[f"e{i}"]["response"]
        assert resp["status_code"] == 200 and resp["body"]["model"] == name
        assert resp["request_id"] == resp["body"]["id"]
        assert resp["body"]["data"][0]["embedding"] == pytest.approx(vec, abs=2e-6)
    ids = by_id["ids"]["response"]["body"]
    assert len(ids["data"]) == 2 and isinstance(ids["data"][0]["embedding"], str)
    assert ids["usage"]["prompt_tokens"] == 5
    assert by_id["bad"]["response"]["status_code"] == 400
    assert by_id["bad"]["response"]["body"]["error"]["param"] == "dimensions"
    assert by_id["chat"]["error"]["code"] == "unsupported_url"  # no generator loaded
    assert stats.completed == len(texts) + 1 and stats.failed == 2
    # a rerun of the finished job loads nothing and answers nothing twice
    again = asyncio.run(run_batch_file(config, inp, out))
    assert again.skipped == len(lines) and len(out.read_text().splitlines()) == len(lines)
