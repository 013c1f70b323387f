"""Ember checkpoint format: packing, quantized storage bytes, save -> load round trips, strict
loading errors, source detection."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.compress import dense
from ember.compress.checkpoint import Compression, save_checkpoint
from ember.compress.quantize import QuantSettings, quantize_model, rtn_quantize
from ember.config import EnvSettings, ModelConfig
from ember.loading.ember_format import QuantizedTensor, pack_codes, unpack_codes
from ember.loading.errors import ModelLoadError
from ember.loading.loader import load_model
from ember.loading.sources import resolve_model
from tiny_llama import TEXT, one_thread, save_tiny, tiny_loaded  # noqa: F401 (fixture)


def _load(path):
    return load_model(ModelConfig(model=str(path)), EnvSettings())


@pytest.mark.parametrize("bits", [8, 4, 3])
@pytest.mark.parametrize("in_features", [64, 63])
def test_pack_unpack_round_trip(bits: int, in_features: int) -> None:
    codes = torch.randint(0, 2 ** bits, (5, in_features), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (5, in_features if bits == 8 else math.ceil(in_features / 2))
    assert torch.equal(unpack_codes(packed, bits, in_features), codes)
    if bits < 8:  # low nibble = even column
        assert int(packed[0, 0]) == int(codes[0, 0]) | (int(codes[0, 1]) << 4)


def test_quantized_tensor_storage_and_dequant_rule() -> None:
    w = torch.randn(48, 100)
    qt = rtn_quantize(w, 4, 32, symmetric=False)
    assert qt.qweight.shape == (48, 50) and qt.qweight.dtype == torch.uint8
    assert qt.scales.shape == (48, 4) and qt.zeros.shape == (48, 4)  # last group is short
    assert qt.nbytes == 48 * 50 + 2 * 48 * 4 * 2
    codes = qt.codes().float()
    g = torch.arange(100) // 32
    manual = (codes - qt.zeros.float()[:, g]) * qt.scales.float()[:, g]
    assert torch.equal(qt.dequantize(torch.float32), manual)
    sym = rtn_quantize(w, 8, 100, symmetric=True)
    assert torch.all(sym.zeros.float() == 128)  # symmetric zero stored explicitly
    assert (sym.dequantize() - w).abs().max() < 2 * w.abs().max() / 255


def test_asymmetric_g32_recovers_q4_1_grid() -> None:
    """Weights already on a Q4_1-style grid (per 32 columns: min + d * q) come back exactly."""
    d = torch.rand(16, 4, 1) * 0.01 + 0.001
    m = -torch.rand(16, 4, 1) * 0.1
    q = torch.randint(0, 16, (16, 4, 32)).float()
    q[..., 0], q[..., 1] = 0, 15  # the grid's ends occur in every group, as in Q4_1
    w = (m + d * q).reshape(16, 128)
    qt = rtn_quantize(w, 4, 32, symmetric=False, store_dtype=torch.float32)
    assert torch.allclose(qt.dequantize(), w, atol=1e-6)


def test_save_load_round_trip_same_logits(tmp_path) -> None:
    loaded = tiny_loaded()
    ids = torch.tensor([loaded.tokenizer.encode(TEXT[:300], add_special_tokens=False)])
    with torch.no_grad():
        before = dense.logits(loaded.model, ids)
    save_checkpoint(tmp_path / "dense", loaded, Compression("none", {}))
    after = _load(tmp_path / "dense")
    with torch.no_grad():
        assert torch.equal(dense.logits(after.model, ids), before)
    assert after.arch == loaded.arch
    assert after.tokenizer.encode(TEXT[:50]) == loaded.tokenizer.encode(TEXT[:50])
    assert after.tokenizer.chat_template == loaded.tokenizer.chat_template
    assert after.tokenizer.eos_token_id == loaded.tokenizer.eos_token_id


def test_quantized_round_trip_bytes_and_logits(tmp_path) -> None:
    loaded = tiny_loaded()
    settings = QuantSettings(method="rtn", bits=4, group_size=32, embeddings="int8")
    quantized = quantize_model(loaded.model, settings, None)
    ids = torch.tensor([loaded.tokenizer.encode(TEXT[:300], add_special_tokens=False)])
    with torch.no_grad():
        expected = dense.logits(loaded.model, ids)  # weights are now the dequantized values
    out = save_checkpoint(tmp_path / "q", loaded, Compression("rtn", settings.metadata()),
                          quantized=quantized)
    raw = load_file(str(out / "model.safetensors"))
    meta = json.loads((out / "ember.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"  # (64, 128)
    assert raw[f"{name}.qweight"].dtype == torch.uint8
    assert raw[f"{name}.qweight"].shape == (64, 64)
    assert raw[f"{name}.scales"].shape == (64, 4) and raw[f"{name}.zeros"].shape == (64, 4)
    assert name not in raw and "lm_head.weight" not in raw
    assert meta["tensors"][name] == {"format": "int4", "shape": [64, 128], "bits": 4,
                                     "group_size": 32, "symmetric": False,
                                     "scale_dtype": "float16"}
    assert meta["tensors"]["model.embed_tokens.weight"]["format"] == "int8"
    assert meta["format_version"] == 1 and meta["architecture"]["num_layers"] == 2
    after = _load(out)
    with torch.no_grad():
        assert torch.allclose(dense.logits(after.model, ids), expected, atol=1e-5)
    assert after.weight_types == {"int4": 14, "int8": 1, "float32": 5}


def test_resolve_model_recognises_ember_dir(tmp_path) -> None:
    save_tiny(tmp_path / "ck")
    assert resolve_model(str(tmp_path / "ck")).kind == "ember"


@pytest.mark.parametrize("corruption, message", [
    ("drop", "is missing"),
    ("reshape", "ember.json says"),
    ("extra", "not described"),
    ("format", "unknown format"),
])
def test_strict_loading_errors(tmp_path, corruption: str, message: str) -> None:
    out = save_tiny(tmp_path / "ck")
    tensors = load_file(str(out / "model.safetensors"))
    meta = json.loads((out / "ember.json").read_text())
    name = "model.layers.1.mlp.up_proj.weight"
    if corruption == "drop":
        del tensors[name]
    elif corruption == "reshape":
        tensors[name] = tensors[name][:, :10].contiguous()
    elif corruption == "extra":
        tensors["model.layers.9.bogus"] = torch.zeros(2)
    else:
        meta["tensors"][name]["format"] = "int5"
    save_file(tensors, str(out / "model.safetensors"))
    (out / "ember.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match=message):
        _load(out)


def test_metadata_shape_must_match_model(tmp_path) -> None:
    out = save_tiny(tmp_path / "ck")
    meta = json.loads((out / "ember.json").read_text())
    meta["architecture"]["intermediate_size"] = 96  # tensors say 128
    (out / "ember.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="shape"):
        _load(out)


def test_unknown_format_version_is_refused(tmp_path) -> None:
    out = save_tiny(tmp_path / "ck")
    meta = json.loads((out / "ember.json").read_text())
    meta["format_version"] = 99
    (out / "ember.json").write_text(json.dumps(meta))
    with pytest.raises(ModelLoadError, match="format_version"):
        _load(out)


def test_quantized_tensor_validates_shapes() -> None:
    qt = rtn_quantize(torch.randn(8, 64), 4, 32, False)
    bad = QuantizedTensor(qt.qweight[:, :10], qt.scales, qt.zeros, 4, 32, (8, 64))
    with pytest.raises(ValueError, match="qweight"):
        bad.validate("w")


@pytest.mark.parametrize("bits, group_size", [(4, 64), (3, 32)])
def test_int4_runtime_format_uses_the_checkpoint_codes_exactly(tmp_path, bits, group_size):
    """`quantization="auto"` runs a <= 4-bit checkpoint on the int4 format built from its own
    codes (regrouped to 32 columns), so the runtime weights equal the stored ones."""
    from ember.engine.core import EngineCore
    from ember.config import CacheConfig, EngineConfig
    from ember.formats.blocks import Q4Blocks
    from ember.layers.quant import Int4Linear
    from ember.loading.ember_checkpoint import GroupedWeight, open_checkpoint

    loaded = tiny_loaded()
    settings = QuantSettings(method="rtn", bits=bits, group_size=group_size)
    quantized = quantize_model(loaded.model, settings, None)
    out = save_checkpoint(tmp_path / "q", loaded, Compression("rtn", settings.metadata()),
                          quantized=quantized)
    reloaded = load_model(ModelConfig(model=str(out), quantization="auto"), EnvSettings(),
                          runtime=True)
    assert reloaded.plan.weights == "int4"
    name = "model.layers.1.mlp.down_proj.weight"
    stored = open_checkpoint(out).tensors[name]
    assert isinstance(stored, QuantizedTensor)
    exact = GroupedWeight(stored, torch.float32).q4()  # the form the int4 layers load
    assert isinstance(exact, Q4Blocks) and exact.group_size == 32
    torch.testing.assert_close(exact.dequantize(), quantized[name].dequantize(torch.float32),
                               atol=1e-6, rtol=1e-6)
    layer = reloaded.model.model.layers[1].mlp.down_proj
    if isinstance(layer, Int4Linear):  # PyTorch's int4: its dense copy shows the codes it got
        assert layer.dense is not None
        assert torch.equal(layer.dense, exact.dequantize().to(layer.dense.dtype))
    config = EngineConfig(model=ModelConfig(model=str(out), quantization="auto"),
                          cache=CacheConfig(block_size=4, num_blocks=16))
    EngineCore(config, reloaded)
    assert reloaded.runtime_formats.get("int4-g32", 0) + reloaded.runtime_formats.get(
        "q4-g32", 0) == 2 * 4  # qkv, o, gate_up, down in each of the 2 layers
