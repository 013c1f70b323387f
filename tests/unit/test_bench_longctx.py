"""The long-context bench's bandwidth fraction: each round's decode over the bound of the
bandwidth probed just before it, the median over rounds."""

import pytest

from ember.bench.longctx import DEPTH, paired_bandwidth_fraction


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
