"""Structured pruning shrinks matrices consistently, and the result runs through the engine."""

from __future__ import annotations

import json

import pytest
import torch

from ember import LLM, SamplingParams
from ember.cli import main
from ember.compress import dense, structured
from ember.compress.calib import sample_windows
from ember.eval.perplexity import perplexity
from tiny_llama import (TEXT, one_thread, save_tiny, tiny_arch, tiny_loaded,  # noqa: F401
                        write_text)


def _calib(loaded) -> torch.Tensor:
    return sample_windows([loaded.tokenizer.encode(TEXT, add_special_tokens=False)], 4, 128)


def test_structured_shapes_are_consistent() -> None:
    arch = tiny_arch(num_layers=4, num_heads=6, num_kv_heads=2)
    loaded = tiny_loaded(arch)
    ids = _calib(loaded)
    arch, info = structured.drop_layers(loaded.model, arch, ids, 1)
    assert arch.num_layers == 3 and len(loaded.model.model.layers) == 3
    assert len(info["dropped_layers"]) == 1 and len(info["layer_distances"]) == 4
    arch, _ = structured.keep_heads(loaded.model, arch, ids, 0.67)
    assert arch.num_heads == 4  # 2 of 3 query heads per KV head
    arch, _ = structured.keep_ffn(loaded.model, arch, ids, 0.75)
    assert arch.intermediate_size == 96
    for layer in loaded.model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.q_proj.weight.shape == (arch.num_heads * arch.head_dim, arch.hidden_size)
        assert attn.o_proj.weight.shape == (arch.hidden_size, arch.num_heads * arch.head_dim)
        assert attn.k_proj.weight.shape == (arch.num_kv_heads * arch.head_dim, arch.hidden_size)
        assert mlp.gate_proj.weight.shape == mlp.up_proj.weight.shape == (96, arch.hidden_size)
        assert mlp.down_proj.weight.shape == (arch.hidden_size, 96)
    with torch.no_grad():
        assert torch.isfinite(dense.logits(loaded.model, ids[:1])).all()


def test_drop_layers_removes_the_least_changing_layer() -> None:
    loaded = tiny_loaded(tiny_arch(num_layers=3))
    with torch.no_grad():  # make layer 1 nearly an identity: tiny output projections
        loaded.model.model.layers[1].self_attn.o_proj.weight.mul_(1e-3)
        loaded.model.model.layers[1].mlp.down_proj.weight.mul_(1e-3)
    _, info = structured.drop_layers(loaded.model, loaded.arch, _calib(loaded), 1)
    assert info["dropped_layers"] == [1]


def test_pruned_checkpoint_runs_through_the_engine(tmp_path) -> None:
    base = save_tiny(tmp_path / "base", tiny_arch(num_layers=3, num_heads=4, num_kv_heads=2))
    calib = write_text(tmp_path)
    out = tmp_path / "pruned"
    rc = main(["prune", str(base), "--drop-layers", "1", "--ffn-keep", "0.5", "--heads-keep",
               "0.5", "--calib", str(calib), "--calib-samples", "4", "--calib-len", "64",
               "-o", str(out)])
    assert rc == 0
    meta = json.loads((out / "ember.json").read_text())
    arch = meta["architecture"]
    assert (arch["num_layers"], arch["intermediate_size"], arch["num_heads"]) == (2, 64, 2)
    assert meta["compression"]["method"] == "structured"
    assert meta["calibration"][0]["sha256"]
    llm = LLM(str(out), show_progress=False, kv_cache_mb=4)
    out_text = llm.generate("It is a truth", SamplingParams(max_tokens=6, temperature=0))
    assert len(out_text[0].outputs[0].token_ids) == 6
    assert perplexity(llm, TEXT[:600]).perplexity > 1


def test_prune_cli_refuses_bad_input(tmp_path, capsys) -> None:
    base = save_tiny(tmp_path / "base")
    assert main(["prune", str(base), "-o", str(tmp_path / "x")]) == 2
    assert "say what to prune" in capsys.readouterr().err
    assert main(["prune", str(base), "--method", "wanda", "--sparsity", "0.5",
                 "-o", str(tmp_path / "x")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["prune", str(base), "--drop-layers", "1", "--calib",
                 str(tmp_path / "missing.txt"), "-o", str(tmp_path / "x")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
