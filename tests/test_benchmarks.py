"""The benchmark scripts' own arithmetic (benchmarks/: run by hand, not by the suite)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_sustained_share_uses_the_median_of_every_probe_at_that_thread_count():
    """bench_engine's sust% holds a decode row against the median of the sitting's probes at its
    thread count, so that one burst probe (the VM reads fast right after a quiet spell) neither
    sets the roofline nor moves it."""
    from bench_engine import sustained_share

    probes = [{"probes_gb_s": {1: [27.0, 29.0, 28.0], 2: [57.0, 31.0, 32.0]}},
              {"probes_gb_s": {1: [30.0, 24.0, 30.0], 2: [60.0, 30.0, 33.0]}}]
    rows = [{"threads": 2, "decode_tok_s": 40.0, "bytes_per_token": 800e6},
            {"threads": 1, "decode_tok_s": 25.0, "bytes_per_token": 800e6},
            {"threads": 2, "prefill_512_tok_s": 150.0}]  # no decode: left alone
    sustained = sustained_share(rows, probes)
    assert sustained == {1: 28.5, 2: 32.5}
    assert rows[0]["pct_of_sustained_probe"] == pytest.approx(100 * 40 * 0.8 / 32.5)
    assert rows[1]["pct_of_sustained_probe"] == pytest.approx(100 * 25 * 0.8 / 28.5)
    assert "pct_of_sustained_probe" not in rows[2]
