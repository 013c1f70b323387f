"""The decode byte budget of `ember bench offline` (ember.bench.byte_budget)."""

from __future__ import annotations

import pytest

from ember.bench.byte_budget import GgufBytes, budget


def test_budget_rows_and_bounds() -> None:
    # 2 layers, one sliding (window 4), one global; 1000 KV bytes per position and layer
    g = GgufBytes(layers=60_000_000, head=40_000_000, head_type="Q8_0",
                  kv_per_position=2000, windows=(4, 0))
    assert g.kv_bytes(16) == 1000 * 4 + 1000 * 16
    medians = {"ember-native": {"layers_mb_per_token": 80.0, "head_mb_per_token": 20.0,
                                "decode_16_tok_s": 50.0},
               "llama.cpp-native": {"decode_16_tok_s": 25.0, "decode_512_tok_s": 20.0},
               "transformers": {"decode_16_tok_s": 5.0}}
    out = budget(medians, g, bandwidth_gbs=10.0)
    assert "transformers" not in out
    ember, llama = out["ember-native"], out["llama.cpp-native"]
    assert ember["weights_mb"] == pytest.approx(100.0)
    assert llama["weights_mb"] == pytest.approx(100.0)
    total16 = 100e6 + g.kv_bytes(16)
    assert ember["bound_tok_s_ctx16"] == pytest.approx(10e9 / total16)
    assert ember["fraction_of_bound_ctx16"] == pytest.approx(50.0 / (10e9 / total16))
    assert "fraction_of_bound_ctx512" not in ember  # no decode_512 measured
    assert llama["mb_per_token_ctx512"] == pytest.approx((100e6 + 4000 + 512_000) / 1e6)


def test_budget_without_gguf_has_ember_rows_only() -> None:
    out = budget({"ember-int8": {"layers_mb_per_token": 1.0, "head_mb_per_token": 1.0},
                  "llama.cpp": {"decode_16_tok_s": 1.0}}, None, 1.0)
    assert set(out) == {"bandwidth_gbs", "ember-int8"}
    assert out["ember-int8"]["bound_tok_s_ctx16"] == pytest.approx(500.0)
