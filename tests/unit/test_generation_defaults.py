"""Generation defaults from the model (vLLM's --generation-config auto): generation_config.json,
GGUF general.sampling.* metadata, the fallback; explicit values always win (LLM, server, CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ember import LLM
from ember.cli import build_parser, main
from ember.cli.generate import sampling_from_args
from ember.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from ember.engine.async_engine import AsyncEngine
from ember.engine.engine import LLMEngine
from ember.engine.generation_defaults import (GenerationDefaults, fallback_defaults,
                                              from_generation_config, from_gguf_metadata,
                                              resolve_generation_defaults)
from ember.server.app import create_app
from ember.server.protocol import ChatCompletionRequest, CompletionRequest
from ember.server.serving.base import build_sampling_params
from ember.types import SamplingParams
from tiny_llama import one_thread, save_tiny, tiny_loaded  # noqa: F401 (fixture)

QWEN_LIKE = {"bos_token_id": 1, "do_sample": False, "eos_token_id": [2, 3],
             "temperature": 0.6, "top_k": 20, "top_p": 0.95, "transformers_version": "4.51"}
MODEL_DEFAULTS = GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20, min_p=0.05,
                                    repetition_penalty=1.2, source="generation_config.json")


def write_config(folder: Path, data: object) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "generation_config.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


# ---- reading the sources ---------------------------------------------------------------------


def test_generation_config_json_takes_the_sampling_keys(tmp_path):
    # NOTE: like vLLM, do_sample=false does not turn the values into greedy decoding.
    d = from_generation_config(write_config(tmp_path, QWEN_LIKE))
    assert d == GenerationDefaults(temperature=0.6, top_p=0.95, top_k=20,
                                   source="generation_config.json")
    assert d.describe() == \
        "generation defaults (generation_config.json): temperature=0.6 top_p=0.95 top_k=20"
    assert isinstance(d.top_k, int)


def test_generation_config_json_without_sampling_keys_or_broken(tmp_path):
    assert from_generation_config(tmp_path) is None  # no file
    assert from_generation_config(write_config(tmp_path / "a", {"eos_token_id": 2})) is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "generation_config.json").write_text("{not json")
    assert from_generation_config(tmp_path / "b") is None
    assert from_generation_config(write_config(tmp_path / "c", [1, 2])) is None


def test_invalid_values_are_dropped_with_a_warning(tmp_path, caplog):
    data = {"temperature": "hot", "top_p": 0.0, "top_k": 2.5, "min_p": True,
            "repetition_penalty": 1.3, "temperature_2": 5}
    d = from_generation_config(write_config(tmp_path, data))
    assert d == GenerationDefaults(repetition_penalty=1.3, source="generation_config.json")
    assert "top_p" in caplog.text and "hot" in caplog.text


def test_gguf_metadata_uses_llama_cpp_names():
    meta = {"general.architecture": "llama", "general.sampling.temp": 0.699999988079071,
            "general.sampling.top_k": 40, "general.sampling.top_p": 0.949999988079071,
            "general.sampling.min_p": 0.05000000074505806,
            "general.sampling.penalty_repeat": 1.100000023841858,
            "general.sampling.mirostat": 0}
    d = from_gguf_metadata(meta)
    assert d == GenerationDefaults(temperature=0.7, top_p=0.95, top_k=40, min_p=0.05,
                                   repetition_penalty=1.1, source="GGUF metadata")
    assert from_gguf_metadata({"general.architecture": "llama"}) is None


def test_resolve_by_source_kind_and_mode(tmp_path):
    folder = write_config(tmp_path / "hf", QWEN_LIKE)
    gguf_meta = {"general.sampling.temp": 0.25}
    assert resolve_generation_defaults("auto", "hf", folder, None).temperature == 0.6
    assert resolve_generation_defaults("auto", "ember", folder, None).top_k == 20
    assert resolve_generation_defaults("auto", "gguf", folder / "m.gguf", gguf_meta) == \
        GenerationDefaults(temperature=0.25, source="GGUF metadata")
    fallback = GenerationDefaults(temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                                  source="fallback")
    assert fallback_defaults() == fallback
    assert resolve_generation_defaults("auto", "gguf", tmp_path / "m.gguf", {}) == fallback
    assert resolve_generation_defaults("auto", "hf", tmp_path / "none", None) == fallback
    for mode in ("none", "vllm"):
        off = resolve_generation_defaults(mode, "hf", folder, None)
        assert off == GenerationDefaults(source="none") and off.values() == {}
        assert off.sampling_params() == SamplingParams()
    other = write_config(tmp_path / "other", {"temperature": 0.1})
    assert resolve_generation_defaults(str(other), "gguf", tmp_path, gguf_meta).temperature == 0.1


def test_generation_config_mode_is_validated(tmp_path):
    ModelConfig(generation_config=str(write_config(tmp_path, {}))).validate()
    with pytest.raises(ValueError, match="generation_config"):
        ModelConfig(generation_config=str(tmp_path / "missing")).validate()


def test_explicit_values_win_over_defaults():
    params = MODEL_DEFAULTS.sampling_params(temperature=0.0, top_p=None, max_tokens=None)
    assert params.temperature == 0.0 and params.top_p == 0.95 and params.top_k == 20
    assert params.max_tokens is None  # non-sampling fields pass through, None included
    assert MODEL_DEFAULTS.sampling_params(top_k=0, repetition_penalty=1.0).top_k == 0
    partial = GenerationDefaults(temperature=0.3, source="generation_config.json")
    assert partial.sampling_params() == SamplingParams(temperature=0.3)


# ---- the server's SamplingParams -------------------------------------------------------------


def test_server_requests_take_defaults_only_for_omitted_fields():
    omitted = build_sampling_params(CompletionRequest(prompt="x"), max_tokens=4,
                                    defaults=MODEL_DEFAULTS)
    assert (omitted.temperature, omitted.top_p, omitted.top_k, omitted.min_p,
            omitted.repetition_penalty) == (0.6, 0.95, 20, 0.05, 1.2)
    explicit = CompletionRequest.model_validate(
        {"prompt": "x", "temperature": 0, "top_p": 1, "top_k": 0, "min_p": 0,
         "repetition_penalty": 1})
    params = build_sampling_params(explicit, max_tokens=4, defaults=MODEL_DEFAULTS)
    assert (params.temperature, params.top_p, params.top_k, params.min_p,
            params.repetition_penalty) == (0.0, 1.0, 0, 0.0, 1.0)
    assert params.greedy and isinstance(params.temperature, float)
    nulls = ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "hi"}], "temperature": None})
    assert build_sampling_params(nulls, max_tokens=None, defaults=MODEL_DEFAULTS).temperature \
        == 0.6
    neutral = build_sampling_params(CompletionRequest(prompt="x"), max_tokens=4)
    assert (neutral.temperature, neutral.top_p, neutral.repetition_penalty) == (1.0, 1.0, 1.0)


def test_server_applies_the_model_defaults(tmp_path):
    """In-process app on a tiny model whose folder has a generation_config.json."""
    folder = write_config(tmp_path, {"temperature": 0.5, "top_k": 7})
    config = EngineConfig(model=ModelConfig(model="tiny"), cache=CacheConfig(num_blocks=32),
                          scheduler=SchedulerConfig(max_num_seqs=4))
    engine = AsyncEngine(LLMEngine(config, tiny_loaded(path=folder)))
    seen: list[SamplingParams] = []
    add_request = engine.add_request

    def spy(request_id, prompt, params, priority=0):  # type: ignore[no-untyped-def]
        seen.append(params)
        return add_request(request_id, prompt, params, priority)

    engine.add_request = spy  # type: ignore[method-assign]
    with TestClient(create_app(config, engine=engine)) as client:
        for body in ({}, {"temperature": 0, "top_k": 0}):
            resp = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1} | body)
            assert resp.status_code == 200
        resp = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
        assert resp.status_code == 200
    assert [(p.temperature, p.top_k) for p in seen] == [(0.5, 7), (0.0, 0), (0.5, 7)]


# ---- the offline LLM and the CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    path = save_tiny(tmp_path_factory.mktemp("m"))
    write_config(path, {"temperature": 0.6, "top_p": 0.9, "do_sample": True})
    return path


def test_llm_default_sampling_params(tiny_dir):
    llm = LLM(str(tiny_dir), show_progress=False, kv_cache_mb=4, cpu_kernels=False)
    assert llm.get_default_sampling_params() == SamplingParams(temperature=0.6, top_p=0.9)
    out = llm.generate("hi", use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) <= 16  # SamplingParams' max_tokens default
    off = LLM(str(tiny_dir), show_progress=False, kv_cache_mb=4, cpu_kernels=False,
              generation_config="none")
    assert off.get_default_sampling_params() == SamplingParams()


def test_cli_flags_win_and_omitted_flags_take_defaults():
    args = build_parser().parse_args(["generate", "hi", "--temperature", "0"])
    params = sampling_from_args(args, MODEL_DEFAULTS)
    assert params.temperature == 0.0 and params.top_p == 0.95 and params.max_tokens == 128
    plain = sampling_from_args(build_parser().parse_args(["chat"]), MODEL_DEFAULTS)
    assert (plain.temperature, plain.top_k, plain.max_tokens) == (0.6, 20, 512)
    assert build_parser().parse_args(["serve"]).generation_config == "auto"


def test_cli_generate_prints_the_model_defaults(tiny_dir, capsys):
    assert main(["generate", "hi", "--model", str(tiny_dir), "--max-tokens", "2",
                 "--quantization", "none", "--no-cpu-kernels", "--seed", "1"]) == 0
    err = capsys.readouterr().err
    assert "generation defaults (generation_config.json): temperature=0.6 top_p=0.9" in err
    assert main(["generate", "hi", "--model", str(tiny_dir), "--max-tokens", "2",
                 "--quantization", "none", "--no-cpu-kernels",
                 "--generation-config", "none"]) == 0
    assert "generation defaults (none): SamplingParams defaults" in capsys.readouterr().err
