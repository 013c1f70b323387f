"""Server pieces without the real model: limits, error mapping, the AsyncEngine front, and the
whole app in-process on a tiny random Llama (byte-level tokenizer)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest
import tokenizers
import torch
from fastapi.testclient import TestClient
from tokenizers import decoders, models, pre_tokenizers

from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig, ServerConfig
from ember.engine.async_engine import AsyncEngine, EngineStepError
from ember.engine.engine import LLMEngine
from ember.loading.loader import LoadedModel
from ember.loading.sources import ModelSource
from ember.models.arch import ArchConfig
from ember.models.llama import LlamaForCausalLM
from ember.server.app import create_app
from ember.server.errors import APIError, loc_to_param
from ember.server.limits import AdmissionControl, ApiKeyAuth, RateLimiter
from ember.server.serving.logprobs import TokenTexts
from ember.tokenizer import Tokenizer
from ember.types import SamplingParams

# ---- a tiny engine ---------------------------------------------------------------------------


def _tokenizer() -> Tokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<|end|>": 256}
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|end|>"])
    return Tokenizer(backend, eos_token_id=256,
                     chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")


def _engine(**server: object) -> LLMEngine:
    arch = ArchConfig(architecture="llama", vocab_size=257, hidden_size=32, intermediate_size=64,
                      num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, max_position=256,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=True,
                      name="tiny")
    torch.manual_seed(0)
    model = LlamaForCausalLM(arch, torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.1)
    model.eval()
    loaded = LoadedModel(model=model, arch=arch, tokenizer=_tokenizer(),
                         source=ModelSource("tiny", Path("/tiny"), "hf", "test"),
                         dtype=torch.float32, weight_types={"F32": 1})
    config = EngineConfig(model=ModelConfig(model="tiny"), cache=CacheConfig(num_blocks=64),
                          scheduler=SchedulerConfig(max_num_seqs=4),
                          server=ServerConfig(**server))  # type: ignore[arg-type]
    return LLMEngine(config, loaded)


@pytest.fixture
def app_client():
    def make(**server: object) -> TestClient:
        engine = _engine(**server)
        app = create_app(engine.config, engine=AsyncEngine(engine))
        return TestClient(app)

    return make


# ---- limits ----------------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_requests_and_tokens():
    clock = Clock()
    limiter = RateLimiter(rpm=2, tpm=None, clock=clock)
    limiter.acquire("a", 10)
    limiter.acquire("a", 10)
    with pytest.raises(APIError) as info:
        limiter.acquire("a", 10)
    assert info.value.status == 429 and info.value.headers["Retry-After"] == "30"
    limiter.acquire("b", 10)  # another principal has its own buckets
    clock.now = 30.0
    limiter.acquire("a", 10)

    tokens = RateLimiter(rpm=None, tpm=120, clock=clock)
    reservation = tokens.acquire("a", 100)
    with pytest.raises(APIError) as info:
        tokens.acquire("a", 30)
    assert info.value.headers["Retry-After"] == "5"  # 10 missing at 2 tokens/s
    reservation.settle(used_tokens=40)  # 60 unused tokens come back
    reservation.settle(used_tokens=40)  # idempotent
    tokens.acquire("a", 80)
    with pytest.raises(APIError) as info:
        tokens.acquire("c", 121)  # never fits
    assert "lower max_tokens" in info.value.message


def test_admission_and_auth():
    admission = AdmissionControl(max_num_seqs=2, max_queued=1)
    admission.check(in_flight_seqs=2, new_seqs=1)
    with pytest.raises(APIError) as info:
        admission.check(in_flight_seqs=3, new_seqs=1)
    assert info.value.status == 429 and info.value.code == "queue_full"
    auth = ApiKeyAuth(["k1", "k2"])
    assert auth.check("Bearer k2") == "k2"
    for header in (None, "", "Bearer", "Bearer k3", "Basic k1"):
        with pytest.raises(APIError):
            auth.check(header)


def test_loc_to_param_drops_union_tags():
    assert loc_to_param(("body", "temperature")) == "temperature"
    assert loc_to_param(("body", "messages", 0, "content", "list[TextContentPart]", 0,
                         "type")) == "messages[0].content[0].type"
    assert loc_to_param(("body", "stop", "str")) == "stop"
    assert loc_to_param(("body",)) is None


def test_token_texts_bytes_of_partial_characters():
    texts = TokenTexts(_tokenizer())
    ids = _tokenizer().encode("é", add_special_tokens=False)
    assert len(ids) == 2 and b"".join(texts.raw_bytes(i) for i in ids) == "é".encode()
    assert texts.text(ids[0]) == "\ufffd" and texts.raw_bytes(256) == b"<|end|>"


# ---- AsyncEngine -----------------------------------------------------------------------------


def test_async_engine_streams_aborts_and_shuts_down():
    async def run() -> None:
        engine = AsyncEngine(_engine())
        engine.start()
        params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
        outs = [o async for o in engine.generate("a", "hello", params)]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 5
        assert "".join(o.outputs[0].delta_text for o in outs) == outs[-1].outputs[0].text
        long = engine.add_request("b", "hello", SamplingParams(max_tokens=200, ignore_eos=True))
        await long.__anext__()
        long.close()
        for _ in range(100):
            stats = engine.stats()
            if stats.num_aborted == 1 and stats.kv_cache_usage == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.stats().num_aborted == 1 and engine.stats().kv_cache_usage == 0
        assert engine.num_in_flight_seqs == 0
        pending = engine.add_request("c", "hi", SamplingParams(max_tokens=200, ignore_eos=True))
        await engine.shutdown(grace_s=0.05)  # too short: the request is aborted
        finals = [o async for o in pending]
        assert finals[-1].outputs[0].finish_reason == "abort"
        assert not engine.is_running

    asyncio.run(run())


def test_async_engine_failure_reaches_waiters_and_the_engine_restarts():
    async def run() -> None:
        llm_engine = _engine()
        engine = AsyncEngine(llm_engine)

        def boom() -> list:
            raise RuntimeError("kernel exploded")

        llm_engine.step = boom  # type: ignore[method-assign]
        engine.start()
        with pytest.raises(EngineStepError, match="kernel exploded"):
            async for _ in engine.generate("x", "hi", SamplingParams(max_tokens=2)):
                pass
        # A fresh engine (same weights) took over: the next request completes.
        outs = [o async for o in engine.generate("y", "hi", SamplingParams(
            max_tokens=2, ignore_eos=True))]
        assert outs[-1].finished and len(outs[-1].outputs[0].token_ids) == 2
        assert engine.stats().num_restarts == 1 and engine.error is None and engine.accepting
        assert engine.num_in_flight_seqs == 0
        await engine.shutdown()

    asyncio.run(run())


# ---- the app in-process ----------------------------------------------------------------------


def test_app_completion_chat_and_stream(app_client):
    with app_client() as client:
        assert client.get("/health").json() == {"status": "ok"}
        out = client.post("/v1/completions", json={"prompt": "hello", "max_tokens": 3,
                                                   "temperature": 0, "ignore_eos": True,
                                                   "logprobs": 1}).json()
        assert out["usage"]["completion_tokens"] == 3 and out["model"] == "tiny"
        assert len(out["choices"][0]["logprobs"]["tokens"]) == 3
        with client.stream("POST", "/v1/chat/completions",
                           json={"messages": [{"role": "user", "content": "hi"}],
                                 "max_tokens": 3, "stream": True, "ignore_eos": True,
                                 "stream_options": {"include_usage": True}}) as resp:
            events = [e for e in resp.read().decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        chunks = [json.loads(e[6:]) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-1]["usage"]["completion_tokens"] == 3
        metrics = client.get("/metrics").text
        assert 'ember:request_success_total{finished_reason="length",model_name="tiny"} 2.0' \
            in metrics


def test_app_errors_are_openai_shaped(app_client):
    with app_client(api_keys=("k",), rate_limit_rpm=1) as client:
        assert client.get("/v1/models").status_code == 401
        headers = {"Authorization": "Bearer k"}
        bad = client.post("/v1/completions", json={"prompt": "x", "top_p": 0}, headers=headers)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "top_p"
        over = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 300},
                           headers=headers)
        assert over.status_code == 400 and "256" in over.json()["error"]["message"]
        ok = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers=headers)
        assert ok.status_code == 200
        limited = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                              headers=headers)
        assert limited.status_code == 429 and "Retry-After" in limited.headers
        assert client.get("/health").status_code == 200  # open without a key
        missing = client.post("/v1/chat/completions", json={"model": "nope", "messages": []},
                              headers=headers)
        assert missing.status_code == 400  # validation runs before the model lookup
        unknown = client.post("/v1/chat/completions", headers=headers, json={
            "model": "nope", "messages": [{"role": "user", "content": "x"}]})
        assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="max_queued_requests"):
        dataclasses.replace(ServerConfig(), max_queued_requests=-1).validate()
    with pytest.raises(ValueError, match="api_keys"):
        ServerConfig(api_keys=(" k",)).validate()


def test_chat_on_a_model_without_template_is_400_naming_the_flag():
    from ember.server.protocol import ChatMessage
    from ember.server.serving.chat import render_chat
    from tiny_llama import tiny_tokenizer

    base = tiny_tokenizer()
    tok = Tokenizer(base.backend, bos_token_id=256, eos_token_id=256)
    with pytest.raises(APIError) as info:
        render_chat(tok, [ChatMessage(role="user", content="hi")])
    assert info.value.status == 400 and "--chat-template" in str(info.value.body())
    fixed = tok.with_chat_template("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert fixed.decode(render_chat(fixed, [ChatMessage(role="user", content="hi")])) == "[hi]"
