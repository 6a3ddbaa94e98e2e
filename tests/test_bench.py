"""`samg bench` reports every row's spread and says when the spread does not resolve a ratio.

Synthetic timing samples only (nothing is timed): the expectations are worked out by hand.
"""

from __future__ import annotations

import argparse

import pytest

from samg import bench


def test_quartiles_interpolate_between_order_statistics():
    # Five samples: the quartiles are the 2nd, 3rd and 4th smallest, whatever the input order.
    assert bench.quartiles([5.0, 1.0, 4.0, 2.0, 3.0]) == pytest.approx((2.0, 3.0, 4.0))
    # Four samples: positions 0.75, 1.5, 2.25 between 1, 2, 3, 4.
    assert bench.quartiles([4.0, 3.0, 2.0, 1.0]) == pytest.approx((1.75, 2.5, 3.25))
    assert bench.quartiles([7.0]) == (7.0, 7.0, 7.0)


def test_a_clear_gap_is_resolved():
    # Per-rep ratios 0.5..0.9: median 0.7, IQR 0.6-0.8, spread 0.2 < |1 - 0.7| = 0.3.
    r = bench.ratio_spread([0.5, 0.6, 0.7, 0.8, 0.9], [1.0] * 5)
    assert (r["ratio"], r["q1"], r["q3"]) == pytest.approx((0.7, 0.6, 0.8))
    assert r["spread"] == pytest.approx(0.2) and r["gap"] == pytest.approx(0.3)
    assert r["resolved"]
    assert bench.resolution_note(r) == "resolved: spread 0.200 below |1 - ratio| 0.300"


def test_noise_larger_than_the_gap_is_not_resolved():
    # The 0.39x-under-load / 1.02x-quiet situation: ratios 0.39, 1.02, 0.95, 1.10, 0.60 ->
    # sorted 0.39, 0.60, 0.95, 1.02, 1.10: median 0.95, IQR 0.60-1.02, spread 0.42 > gap 0.05.
    r = bench.ratio_spread([0.39, 1.02, 0.95, 1.10, 0.60], [1.0] * 5)
    assert r["ratio"] == pytest.approx(0.95) and r["spread"] == pytest.approx(0.42)
    assert not r["resolved"]
    assert bench.resolution_note(r) == "not resolved: spread 0.420 exceeds |1 - ratio| 0.050"


def test_ratios_are_paired_per_repetition():
    # A load burst in rep 2 slows both rows 4x: per-rep ratios are 2, 2, 1 -> median 2, while the
    # ratio of the two medians (3 / 3) would read 1.
    r = bench.ratio_spread([2.0, 8.0, 3.0], [1.0, 4.0, 3.0])
    assert r["ratio"] == pytest.approx(2.0)
    assert (r["q1"], r["q3"]) == pytest.approx((1.5, 2.0))  # sorted 1, 2, 2 at positions 0.5 and 1.5
    assert r["resolved"]  # spread 0.5 < gap 1.0


def test_one_repetition_is_never_resolved():
    r = bench.ratio_spread([0.5], [1.0])
    assert r["spread"] == 0.0 and not r["resolved"]
    assert "raise --reps" in bench.resolution_note(r)


def test_mismatched_samples_are_refused():
    with pytest.raises(ValueError):
        bench.ratio_spread([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        bench.ratio_spread([], [])


def test_table_prints_every_rows_spread_and_each_ratios_verdict(capsys):
    ms = 1e-3
    times = {
        "step: fused SAMG graph": [10 * ms, 11 * ms, 12 * ms, 13 * ms, 14 * ms],
        # Per-rep ratios 0.5, 1.2727, 0.9167, 1.0, 1.5 -> median 1.0: a gap of 0, never resolved.
        "step: raw graph + host CFG (peers)": [5 * ms, 14 * ms, 11 * ms, 13 * ms, 21 * ms],
        # Exactly 0.9x in every rep: spread 0 < gap 0.1.
        "step: fused graph, plain CFG": [9 * ms, 9.9 * ms, 10.8 * ms, 11.7 * ms, 12.6 * ms],
        "loop overhead per step (null runner)": [0.1 * ms] * 5,
        "end to end: samg runtime (SAMG)": [50 * ms] * 5,
    }
    args = argparse.Namespace(sampler="euler", steps=4, backend="onnxruntime", device="cpu")
    bench._print_table(times, args, "digits")
    out = capsys.readouterr().out
    assert "median [interquartile range] of 5 interleaved reps" in out
    assert "12.000 ms  [IQR 11.000–13.000]" in out  # the fused step's row
    lines = {line.split("  ")[1].strip(): line for line in out.splitlines() if line.startswith("  ") and "/" in line}
    assert "not resolved: spread" in lines["raw+host CFG / fused SAMG step"]
    assert "resolved: spread 0.000 below |1 - ratio| 0.100" in lines["fused plain CFG / fused SAMG step"]
    assert "diffusers e2e / samg e2e" not in out  # its row was not measured
    assert "1 ratio(s) not resolved" in out
