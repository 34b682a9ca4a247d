"""Latency histograms, timelines and result merging (what the parent does with reports)."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from cluster.loadtest.results import WorkerResult, merge_results
from cluster.loadtest.stats import (
    GROWTH,
    LatencyHistogram,
    Timeline,
    bucket_bounds,
    bucket_of,
    nearest_rank,
    percentile,
)


def samples(seed: int, n: int) -> list[float]:
    rng = random.Random(seed)
    return [rng.lognormvariate(math.log(0.002), 0.8) for _ in range(n)]


def test_exact_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.50) == 50
    assert percentile(values, 0.99) == 99  # 0.99 * 100 is not 100 in disguise
    assert percentile(values, 1.0) == 100
    assert percentile(values, 0.0) == 1
    assert math.isnan(percentile([], 0.5))
    assert nearest_rank(100, 0.99) == 99 and nearest_rank(1, 0.5) == 1


def test_buckets_cover_each_value() -> None:
    for value in (1e-9, 1e-7, 1.5e-6, 0.001, 0.0123, 2.5, 300.0):
        lower, upper = bucket_bounds(bucket_of(value))
        assert lower <= value <= upper * (1 + 1e-12)
        assert upper <= max(lower, 1e-7) * GROWTH * (1 + 1e-12)


def test_histogram_percentiles_within_one_percent() -> None:
    values = samples(1, 20_000)
    histogram = LatencyHistogram()
    histogram.extend(values)
    assert histogram.count == len(values)
    for fraction in (0.5, 0.9, 0.99, 0.999):
        exact = percentile(values, fraction)
        assert histogram.percentile(fraction) == pytest.approx(exact, rel=0.01)
    assert histogram.percentile(1.0) == max(values)
    assert histogram.percentile(0.0) == min(values)
    assert histogram.mean == pytest.approx(sum(values) / len(values))


def test_merged_histograms_equal_the_histogram_of_all_samples() -> None:
    parts = [samples(seed, 3_000 + 500 * seed) for seed in range(4)]
    whole = LatencyHistogram()
    whole.extend(v for part in parts for v in part)
    pieces = []
    for part in parts:
        piece = LatencyHistogram()
        piece.extend(part)
        pieces.append(piece)
    merged = LatencyHistogram.merged(pieces)
    assert merged.buckets == whole.buckets
    assert (merged.count, merged.minimum, merged.maximum) == (
        whole.count,
        whole.minimum,
        whole.maximum,
    )
    assert merged.total == pytest.approx(whole.total)
    for fraction in (0.5, 0.9, 0.99):
        assert merged.percentile(fraction) == whole.percentile(fraction)


def test_empty_histogram_is_nan_and_merges_as_identity() -> None:
    empty = LatencyHistogram()
    assert math.isnan(empty.percentile(0.5)) and math.isnan(empty.mean)
    one = LatencyHistogram()
    one.add(0.001)
    one.merge(empty)
    assert one.count == 1 and one.percentile(0.5) == 0.001


def test_distribution_groups_buckets_without_losing_samples() -> None:
    histogram = LatencyHistogram()
    histogram.extend(samples(2, 5_000))
    fine = histogram.distribution()
    coarse = histogram.distribution(max_bins=40)
    assert sum(n for *_, n in fine) == sum(n for *_, n in coarse) == 5_000
    assert len(coarse) <= 40 < len(fine)
    assert all(low < high for low, high, _ in coarse)
    assert [low for low, _, _ in coarse] == sorted(low for low, _, _ in coarse)


def test_timeline_bins_and_merge() -> None:
    a, b = Timeline(0.5), Timeline(0.5)
    a.add(0.1, 3)
    a.add(-0.2)  # before t0: first bin
    a.add(1.2, 2)
    b.add(0.6, 5)
    a.merge(b)
    assert a.counts == [4, 5, 2]
    assert a.rates() == [8.0, 10.0, 4.0]
    with pytest.raises(ValueError):
        a.merge(Timeline(1.0))


def test_merge_results_sums_counts_and_unions_windows() -> None:
    first = WorkerResult(counts=Counter(frames=10, sent=5), errors=Counter(reset=1))
    first.window_start, first.window_end = 10.0, 12.0
    first.latency.add(0.001)
    second = WorkerResult(counts=Counter(frames=7), errors=Counter(reset=2, timeout=1))
    second.window_start, second.window_end = 10.1, 12.5
    second.latency.add(0.003)
    second.interrupted = True
    merged = merge_results([first, second])
    assert merged.counts == Counter(frames=17, sent=5)
    assert merged.errors == Counter(reset=3, timeout=1)
    assert merged.latency.count == 2 and merged.latency.maximum == 0.003
    assert merged.window_s == pytest.approx(2.5)
    assert merged.interrupted
    assert merge_results([]).window_s == 0
