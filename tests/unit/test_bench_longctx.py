"""The long-context bench's derived figures: the bandwidth fraction (each round's decode over the
bound of the bandwidth probed just before it, the median over rounds) and the prefill attention
roofline."""

import pytest

from ember.bench.longctx import (DEPTH, paired_bandwidth_fraction, prefill_attention_macs,
                                 prefill_attention_roofline)
from ember.models.arch import ArchConfig


def test_each_round_pairs_with_its_own_probe():
    runs = {f"decode_{DEPTH}_tok_s": [80.0, 60.0, 90.0], "bandwidth_gbs": [20.0, 30.0, 25.0]}
    # bounds at 2e8 bytes a token: 100, 150, 125 tok/s -> fractions 0.8, 0.4, 0.72
    assert paired_bandwidth_fraction(runs, 2e8) == pytest.approx(0.72)
    # one probe for all three (the old figure) would give 0.8 (median decode 80 / bound 100)
    assert paired_bandwidth_fraction({**runs, "bandwidth_gbs": [20.0] * 3}, 2e8) == \
        pytest.approx(0.8)


def test_no_paired_probe_gives_none():
    assert paired_bandwidth_fraction({f"decode_{DEPTH}_tok_s": [80.0]}, 2e8) is None
    assert paired_bandwidth_fraction({}, 2e8) is None


def _arch(**kw):
    return ArchConfig(architecture="llama", vocab_size=100, hidden_size=64, intermediate_size=128,
                      num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                      max_position=8192, **kw)


def test_prefill_attention_macs_count_every_causal_key_once():
    # token i reads i + 1 keys; QK and PV, 4 heads x 16 dims, 2 layers
    assert prefill_attention_macs(_arch(), 3) == 2 * (2 * 4 * 16 * (1 + 2 + 3))
    # SmolLM2-135M's geometry at 4096 tokens: ~290 G multiply-adds
    smol = ArchConfig(architecture="llama", vocab_size=49152, hidden_size=576,
                      intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                      head_dim=64, max_position=8192)
    assert prefill_attention_macs(smol, DEPTH) == 30 * 9 * 64 * DEPTH * (DEPTH + 1)
    # a window of 2 keys: queries past the first read 2 keys each (every layer sliding)
    assert prefill_attention_macs(_arch(sliding_window=2), 5) == 2 * (2 * 4 * 16 * (1 + 2 * 4))
    # only the sliding layers are cut
    mixed = _arch(sliding_window=2, layer_types=("sliding", "full"))
    assert prefill_attention_macs(mixed, 5) == 2 * 4 * 16 * (1 + 8) + 2 * 4 * 16 * 15


def test_prefill_attention_roofline_from_the_two_prefill_rates():
    arch = _arch()
    extra = prefill_attention_macs(arch, DEPTH) / DEPTH - prefill_attention_macs(arch, 512) / 512
    r = prefill_attention_roofline(arch, p512=1000.0, p4k=500.0)
    assert r["prefill_attention_extra_macs_per_token"] == pytest.approx(extra)
    # 1 ms a token more at 4096 than at 512 carries the extra multiply-adds
    assert r["prefill_attention_gmac_s_implied"] == pytest.approx(extra / 1e-3 / 1e9)
    # 0.6 x 1000 tok/s leaves 1/600 - 1/1000 s a token for them
    assert r["prefill_attention_gmac_s_needed_for_0.6"] == \
        pytest.approx(extra / (1 / 600 - 1 / 1000) / 1e9)
    assert "prefill_attention_gmac_s_implied" not in prefill_attention_roofline(arch, 500.0, 600.0)
