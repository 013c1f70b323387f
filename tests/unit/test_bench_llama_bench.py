"""Native llama.cpp (llama-bench) as a peer of `ember bench offline`: JSON parsing, binary
resolution, and the summary / ratio / table code with an engine that lacks some figures."""

from __future__ import annotations

import io
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from ember.bench import llama_bench
from ember.bench.llama_bench import LABEL, LlamaBenchSpec, parse_results, resolve_binary
from ember.bench.offline import available_engines, isa_slowdowns, print_table, ratios, summarise
from ember.bench.workers import FIGURES


def _test(n_prompt: int, n_gen: int, n_depth: int, avg_ts: float) -> dict[str, Any]:
    """One entry of `llama-bench -o json`, as the native build of build-llama-cpp.sh prints it
    (llama-cpp-python 0.3.36's vendored llama.cpp, CPU backend)."""
    avg_ns = int((n_prompt + n_gen) / avg_ts * 1e9)  # the depth's filling is not timed
    return {
        "build_commit": "unknown", "build_number": 0, "cpu_info": "AMD EPYC", "gpu_info": "",
        "backends": "CPU", "model_filename": "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "model_type": "llama 256M Q4_1", "model_size": 96576768, "model_n_params": 134515008,
        "n_batch": 2048, "n_ubatch": 512, "n_threads": 2, "cpu_mask": "0x0",
        "cpu_strict": False, "poll": 50, "type_k": "f16", "type_v": "f16", "n_gpu_layers": -1,
        "n_cpu_moe": 0, "split_mode": "layer", "main_gpu": 0, "no_kv_offload": False,
        "flash_attn": 1, "devices": "auto", "tensor_split": "0.00",
        "tensor_buft_overrides": "none", "load_mode": "auto", "lazy_mode": "auto",
        "embeddings": False, "no_op_offload": 0, "no_host": False, "repack": True,
        "fit_target": 0, "fit_min_ctx": 0, "n_prompt": n_prompt, "n_gen": n_gen,
        "n_depth": n_depth, "test_time": "2026-11-29T20:02:32Z", "avg_ns": avg_ns,
        "stddev_ns": 0, "avg_ts": avg_ts, "stddev_ts": 0.0, "samples_ns": [avg_ns],
        "samples_ts": [avg_ts],
    }


PREFILL_JSON = json.dumps([_test(512, 0, 0, 1234.5)], indent=2)
DECODE_JSON = json.dumps([_test(0, 32, 16, 98.7), _test(0, 32, 512, 80.25)], indent=2)


def test_parse_results_maps_tests_onto_figure_keys() -> None:
    assert parse_results(PREFILL_JSON) == {"prefill_512_tok_s": 1234.5}
    assert parse_results(DECODE_JSON) == {"decode_16_tok_s": 98.7, "decode_512_tok_s": 80.25}
    for key in (*parse_results(PREFILL_JSON), *parse_results(DECODE_JSON)):
        assert key in FIGURES


def test_parse_results_ignores_other_tests() -> None:
    text = json.dumps([_test(512, 0, 16, 1.0), _test(128, 0, 0, 2.0), _test(0, 32, 0, 3.0),
                       _test(512, 32, 0, 4.0)])
    assert parse_results(text) == {"decode_0_tok_s": 3.0}  # not a figure: left out later
    assert parse_results("[]") == {}


def test_commands_use_json_threads_flash_attention_and_depths() -> None:
    prefill, decode = LlamaBenchSpec(Path("/opt/llama-bench")).commands("/m.gguf", 2, 32)
    for cmd in (prefill, decode):
        assert cmd[0] == "/opt/llama-bench"
        assert cmd[cmd.index("-m") + 1] == "/m.gguf"
        assert cmd[cmd.index("-t") + 1] == "2"
        assert cmd[cmd.index("-o") + 1] == "json"
        assert cmd[cmd.index("-fa") + 1] == "1"
        assert cmd[cmd.index("-r") + 1] == "1"
    assert (prefill[prefill.index("-p") + 1], prefill[prefill.index("-n") + 1]) == ("512", "0")
    assert (decode[decode.index("-p") + 1], decode[decode.index("-n") + 1]) == ("0", "32")
    assert decode[decode.index("-d") + 1] == "16,512"


def _fake_binary(folder: Path) -> Path:
    binary = folder / "llama-bench"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(binary.stat().st_mode | stat.S_IXUSR)
    return binary


def test_resolve_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    binary = _fake_binary(tmp_path)
    assert resolve_binary(str(binary)) == (binary, None)
    assert resolve_binary(str(tmp_path)) == (binary, None)  # the bin folder
    with pytest.raises(FileNotFoundError):
        resolve_binary(str(tmp_path / "missing"))
    monkeypatch.setattr(llama_bench, "default_binary", lambda: tmp_path / "absent")
    found, note = resolve_binary(None)
    assert found is None and note is not None and "build-llama-cpp.sh" in note
    monkeypatch.setattr(llama_bench, "default_binary", lambda: binary)
    assert resolve_binary(None) == (binary, None)
    if os.geteuid() != 0:  # root may execute anything; the check below needs a plain user
        binary.chmod(0o644)
        assert resolve_binary(None)[0] is None


def test_available_engines_adds_native_peer(tmp_path: Path) -> None:
    specs, _ = available_engines(False, ["int4"], _fake_binary(tmp_path))
    assert [s.label for s in specs][-1] == LABEL
    specs, _ = available_engines(False, ["int4"], None)
    assert LABEL not in [s.label for s in specs]


def test_avx2_flavour_and_ember_isas(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--llama-cpp-flavour avx2 finds build-llama-cpp.sh avx2's default folder; --ember-isa
    gives one Ember engine per ISA, with EMBER_CPU_ISA (or --no-cpu-kernels) in its process."""
    monkeypatch.setattr(llama_bench.Path, "home", lambda: tmp_path)
    found, note = resolve_binary(None, "avx2")
    assert found is None and note is not None and "llama.cpp-avx2 skipped" in note
    assert "build-llama-cpp.sh avx2" in note
    bin_dir = tmp_path / ".cache/ember-peers/llama.cpp-avx2/build/bin"
    bin_dir.mkdir(parents=True)
    _fake_binary(bin_dir)
    binary, note = resolve_binary(None, "avx2")
    assert note is None and binary == llama_bench.flavour_binary("avx2") and binary.is_file()
    avx2_peer = LlamaBenchSpec(binary, llama_bench.label_of("avx2"))
    specs, _ = available_engines(False, ["int4"], None, (avx2_peer,),
                                 ("auto", "portable", "torch"))
    labels = [s.label for s in specs]
    assert labels == ["ember-int4", "ember-int4-portable", "ember-int4-torch", "llama.cpp-avx2"]
    auto, portable, torch_ops = specs[:3]
    assert auto.env() is None  # type: ignore[attr-defined]
    assert portable.env()["EMBER_CPU_ISA"] == "portable"  # type: ignore[attr-defined]
    assert "--no-cpu-kernels" in torch_ops.argv("/m.gguf", 2, 8)  # type: ignore[attr-defined]
    assert "--no-cpu-kernels" not in portable.argv("/m.gguf", 2, 8)  # type: ignore[attr-defined]


EMBER_RUN = {"load_s": 1.0, "rss_mb": 300.0, "ttft_16_ms": 20.0, "prefill_512_tok_s": 1000.0,
             "decode_16_tok_s": 100.0, "decode_512_tok_s": 80.0, "batch8_tok_s": 400.0,
             "batch32_tok_s": 800.0}


def test_summary_ratios_and_table_tolerate_missing_figures() -> None:
    native = {**parse_results(PREFILL_JSON), **parse_results(DECODE_JSON)}
    runs = {"ember-int4": [EMBER_RUN, {**EMBER_RUN, "decode_16_tok_s": 120.0}],
            LABEL: [native, {**native, "decode_0_tok_s": 5.0}], "transformers": []}
    medians = summarise(runs)
    assert set(medians) == {"ember-int4", LABEL}
    assert medians["ember-int4"]["decode_16_tok_s"] == 110.0
    assert set(medians[LABEL]) == {"prefill_512_tok_s", "decode_16_tok_s", "decode_512_tok_s"}

    rel = ratios(medians, LABEL)
    assert set(rel) == {"ember-int4"}
    assert set(rel["ember-int4"]) == set(medians[LABEL])
    assert rel["ember-int4"]["decode_16_tok_s"] == pytest.approx(110.0 / 98.7)
    assert rel["ember-int4"]["prefill_512_tok_s"] == pytest.approx(1000.0 / 1234.5)
    # and the other way round: a peer with every figure against an Ember run missing some
    partial = {"ember-int4": {"decode_16_tok_s": 50.0}, "llama.cpp": dict(EMBER_RUN)}
    assert ratios(partial, "llama.cpp") == {"ember-int4": {"decode_16_tok_s": 0.5}}

    out = io.StringIO()
    print_table(Console(file=out, width=200), medians, {LABEL: rel})
    text = out.getvalue()
    assert f"ember-int4 / {LABEL}" in text
    load_row = next(line for line in text.splitlines() if "load_s" in line)
    assert "1.0" in load_row and load_row.count("-") >= 2  # native value and ratio: absent
    decode_row = next(line for line in text.splitlines() if "decode_16_tok_s" in line)
    assert "98.7" in decode_row and "1.11x" in decode_row


def test_portable_slowdown_pairs_each_variants_portable_run_with_its_other_isas() -> None:
    medians = {"ember-int4-avx2": {"prefill_512_tok_s": 600.0, "decode_16_tok_s": 150.0,
                                   "load_s": 2.0},
               "ember-int4-portable": {"prefill_512_tok_s": 300.0, "decode_16_tok_s": 100.0,
                                       "load_s": 1.0},
               "ember-int4-torch": {"decode_16_tok_s": 30.0},
               "ember-int8-portable": {"decode_16_tok_s": 50.0},
               "llama.cpp-avx2": {"decode_16_tok_s": 90.0}}
    slow = isa_slowdowns(medians)
    # only speed figures, only the same variant's hand-written ISA (not torch, not a peer)
    assert slow == {"ember-int4-portable/avx2": {"prefill_512_tok_s": 2.0,
                                                 "decode_16_tok_s": 1.5}}


def test_edge_variant_is_its_own_engine_and_only_pytorch_engines_import_torch(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`--ember edge` runs the torch-free runtime as engine ember-edge; the workers of
    engines that do not run on PyTorch (ember-edge, llama.cpp) never import it, so their
    rss_mb is their own (every worker used to import torch, ~200 MB)."""
    import builtins

    from ember.bench import workers

    specs, _ = available_engines(False, ["int4", "edge"], None, (), ("auto", "portable"))
    labels = [s.label for s in specs]
    assert labels[:3] == ["ember-int4", "ember-int4-portable", "ember-edge"]
    assert specs[2].argv("/m.gguf", 2, 8)[3] == "ember-edge"  # type: ignore[attr-defined]

    class Fake:
        def __init__(self, *args: object) -> None:
            pass

    monkeypatch.setattr(workers, "EdgeRunner", Fake)
    monkeypatch.setattr(workers, "LlamaCppRunner", Fake)
    monkeypatch.setattr(workers, "measure", lambda *a: {"rss_mb": 1.0})
    imported: list[str] = []
    real_import = builtins.__import__

    def recording_import(name: str, *args: object, **kwargs: object) -> object:
        imported.append(name)
        return real_import(name, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(builtins, "__import__", recording_import)
    for engine in ("ember-edge", "llama.cpp", "ember"):
        imported.clear()
        monkeypatch.setattr(workers, "EmberRunner", Fake)
        assert workers.main([engine, "--model-path", "/m.gguf"]) == 0
        assert ("torch" in imported) == (engine == "ember"), engine
