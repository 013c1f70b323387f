"""Ember on a local Ray (2 CPUs): Ray Data actors and Ray Serve replicas (2 x 1 thread) give
the single-process engine's greedy outputs; Serve streams, routes by prefix affinity and
answers bad requests with OpenAI-shaped 4xx errors.

One Ray session serves the whole module (Ray starts slowly on a shared 2-CPU machine); it is
always shut down, also when a test fails.
"""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator
from typing import Any

import pytest

if importlib.util.find_spec("ray") is None:
    pytest.skip("ray is not installed (pip install 'ember[ray]'): Ray tests skipped",
                allow_module_level=True)

pytestmark = [pytest.mark.model, pytest.mark.ray]

MAX_TOKENS = 10
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."},
     {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "user", "content": "Count from one to five."}],
]
PROMPTS = ["The quick brown fox", "Once upon a time, in a small village,"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def reference() -> dict[str, list[list[int]] | list[str]]:
    """Greedy outputs of the single-process engine (1 thread, like each actor/replica).

    Like `ember serve`, the Ray paths start from the model's generation defaults (SmolLM2's
    repetition_penalty=1.1 included) and override temperature and max_tokens; so does this.
    """
    import dataclasses

    from ember.config import DEFAULT_MODEL
    from ember.distributed.ray_data import engine_config
    from ember.engine.llm import LLM

    llm = LLM(config=engine_config(DEFAULT_MODEL, 1, {"quantization": "auto"}),
              show_progress=False)
    params = dataclasses.replace(llm.get_default_sampling_params(), temperature=0.0,
                                 max_tokens=MAX_TOKENS)
    chat = llm.chat(CHATS, params, use_tqdm=False)
    completion = llm.generate(PROMPTS, params, use_tqdm=False)
    return {"chat_ids": [list(o.outputs[0].token_ids) for o in chat],
            "chat_text": [o.outputs[0].text for o in chat],
            "completion_text": [o.outputs[0].text for o in completion]}


@pytest.fixture(scope="module")
def ray_session(reference: Any) -> Iterator[Any]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    try:
        yield ray
    finally:
        try:
            from ray import serve
            serve.shutdown()
        finally:
            ray.shutdown()


def test_ray_data_matches_single_process(ray_session: Any, reference: dict) -> None:
    from ember.distributed.ray_data import generate_dataset

    rows: list[dict[str, Any]] = [{"id": i, "messages": chat} for i, chat in enumerate(CHATS)]
    rows.append({"id": 99, "messages": CHATS[0],
                 "sampling_params": {"max_tokens": 3}})  # a per-row override of the job's
    rows.append({"id": 98, "messages": CHATS[1], "sampling_params": {"max_tokens": -1}})
    ds = ray_session.data.from_items(rows, override_num_blocks=3)
    out = generate_dataset(ds, concurrency=2, threads_per_actor=1, batch_size=2,
                           sampling_params={"temperature": 0.0, "max_tokens": MAX_TOKENS},
                           engine_kwargs={"quantization": "auto"})
    results = {int(r["id"]): r for r in out.take_all()}
    assert sorted(results) == [0, 1, 2, 3, 98, 99]
    assert "max_tokens" in results[98]["error"] and results[98]["generated_text"] == ""
    for i, (ids, text) in enumerate(zip(reference["chat_ids"], reference["chat_text"])):
        assert list(results[i]["generated_token_ids"]) == ids
        assert results[i]["generated_text"] == text
        assert results[i]["num_generated_tokens"] == len(ids) and results[i]["error"] == ""
    assert list(results[99]["generated_token_ids"]) == reference["chat_ids"][0][:3]
    assert results[99]["finish_reason"] == "length"


@pytest.fixture(scope="module")
def serve_url(ray_session: Any) -> Iterator[str]:
    from ray import serve

    from ember.config import EngineConfig, ModelConfig
    from ember.distributed.ray_serve import RayServeOptions, build_app

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    config = EngineConfig(model=ModelConfig(quantization="auto"))
    serve.run(build_app(config, RayServeOptions(num_replicas=2, threads_per_replica=1)),
              name="ember", route_prefix="/")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.delete("ember")


@pytest.fixture(scope="module")
def client(serve_url: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{serve_url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_serve_chat_matches_single_process(client: Any, reference: dict) -> None:
    model = client.models.list().data[0].id
    for chat, text in zip(CHATS, reference["chat_text"]):
        reply = client.chat.completions.create(model=model, messages=chat, temperature=0,
                                               max_tokens=MAX_TOKENS)
        assert reply.choices[0].message.content == text
    stream = client.chat.completions.create(model=model, messages=CHATS[1], temperature=0,
                                            max_tokens=MAX_TOKENS, stream=True)
    deltas = [c.choices[0].delta.content or "" for c in stream if c.choices]
    assert len([d for d in deltas if d]) > 1  # arrived in pieces, not one buffered chunk
    assert "".join(deltas) == reference["chat_text"][1]


def test_serve_completions_stream_and_not(client: Any, reference: dict) -> None:
    model = client.models.list().data[0].id
    for prompt, text in zip(PROMPTS, reference["completion_text"]):
        reply = client.completions.create(model=model, prompt=prompt, temperature=0,
                                          max_tokens=MAX_TOKENS)
        assert reply.choices[0].text == text
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS, stream=True)
            if c.choices)
        assert streamed == text


def test_serve_prefix_affinity_and_spread(client: Any) -> None:
    from ember.distributed.ray_serve import REPLICA_HEADER

    model = client.models.list().data[0].id

    def replica(messages: list[dict[str, str]]) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=messages, temperature=0, max_tokens=1)
        return str(raw.headers[REPLICA_HEADER])

    conversation = [{"role": "user", "content": "Tell me about owls."}]
    first = replica(conversation)
    later_turn = conversation + [{"role": "assistant", "content": "Owls are birds."},
                                 {"role": "user", "content": "And their eyes?"}]
    assert replica(conversation) == first
    assert replica(later_turn) == first  # the same conversation stays where its KV cache is
    # different conversations spread over both replicas (all 12 on one: p = 2^-11)
    seen = {replica([{"role": "user", "content": f"Question number {i}"}]) for i in range(12)}
    assert len(seen) == 2


def test_serve_bad_request_is_openai_400(client: Any) -> None:
    import openai

    model = client.models.list().data[0].id
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=model, messages=CHATS[0], max_tokens=-3)
    assert "max_tokens" in str(info.value)
