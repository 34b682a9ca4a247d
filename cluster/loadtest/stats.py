"""Latency histograms that merge exactly, timelines, and nearest-rank percentiles.

Worker processes cannot ship every latency sample cheaply, so each keeps a
log-bucketed histogram (buckets 1 % wide, like HdrHistogram): merging two is
adding their bucket counts, which gives exactly the histogram of all samples,
and a percentile read from it is within 1 % of the exact one. Minimum and
maximum are kept exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

LOWEST_S = 1e-7  # 0.1 us; faster samples share bucket 0
GROWTH = 1.01  # bucket i covers (LOWEST_S * GROWTH**(i-1), LOWEST_S * GROWTH**i]
_INV_LOG_GROWTH = 1.0 / math.log(GROWTH)
_LOG_LOWEST = math.log(LOWEST_S)


def bucket_of(value: float) -> int:
    """The bucket index of a latency in seconds."""
    if value <= LOWEST_S:
        return 0
    return int((math.log(value) - _LOG_LOWEST) * _INV_LOG_GROWTH) + 1


def bucket_bounds(index: int) -> tuple[float, float]:
    """(lower, upper) seconds of a bucket."""
    if index <= 0:
        return 0.0, LOWEST_S
    return LOWEST_S * GROWTH ** (index - 1), LOWEST_S * GROWTH**index


def nearest_rank(count: int, fraction: float) -> int:
    """1-based rank of the ``fraction`` percentile among ``count`` ordered values."""
    # round() first: 0.99 * 100 is 99.00000000000001 in binary floating point.
    return max(1, min(count, math.ceil(round(fraction * count, 9))))


def percentile(values: Sequence[float], fraction: float) -> float:
    """Exact nearest-rank percentile (``fraction`` in 0..1); NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[nearest_rank(len(ordered), fraction) - 1]


@dataclass
class LatencyHistogram:
    """Counts of latencies (seconds) per 1 %-wide bucket, plus exact min/max/sum."""

    buckets: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0.0
    minimum: float = math.inf
    maximum: float = 0.0

    def add(self, value: float) -> None:
        """Record one latency in seconds."""
        index = (
            0 if value <= LOWEST_S else int((math.log(value) - _LOG_LOWEST) * _INV_LOG_GROWTH) + 1
        )
        buckets = self.buckets
        buckets[index] = buckets.get(index, 0) + 1
        self.count += 1
        self.total += value
        if value < self.minimum:
            self.minimum = value
        if value > self.maximum:
            self.maximum = value

    def extend(self, values: Iterable[float]) -> None:
        for value in values:
            self.add(value)

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s samples to this histogram."""
        for index, n in other.buckets.items():
            self.buckets[index] = self.buckets.get(index, 0) + n
        self.count += other.count
        self.total += other.total
        self.minimum = min(self.minimum, other.minimum)
        self.maximum = max(self.maximum, other.maximum)

    @classmethod
    def merged(cls, histograms: Iterable[LatencyHistogram]) -> LatencyHistogram:
        result = cls()
        for histogram in histograms:
            result.merge(histogram)
        return result

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def percentile(self, fraction: float) -> float:
        """Nearest-rank percentile in seconds, within 1 % (exact for 0 and 1); NaN if empty."""
        if not self.count:
            return math.nan
        rank = nearest_rank(self.count, fraction)
        if rank == self.count:
            return self.maximum
        if rank == 1:
            return self.minimum
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                lower, upper = bucket_bounds(index)
                middle = math.sqrt(lower * upper) if lower > 0 else upper / 2
                return min(max(middle, self.minimum), self.maximum)
        return self.maximum  # not reached: the counts add up to self.count

    def distribution(self, max_bins: int = 0) -> list[tuple[float, float, int]]:
        """(lower s, upper s, count) per non-empty bin, fastest first (for plots).

        With ``max_bins``, neighbouring buckets are grouped so that the bins
        between the fastest and the slowest sample are at most that many.
        """
        if not self.buckets:
            return []
        low, high = min(self.buckets), max(self.buckets)
        group = max(1, math.ceil((high - low + 1) / max_bins)) if max_bins else 1
        grouped: dict[int, int] = {}
        for index, n in self.buckets.items():
            key = (index - low) // group
            grouped[key] = grouped.get(key, 0) + n
        return [
            (
                bucket_bounds(low + key * group)[0],
                bucket_bounds(low + key * group + group - 1)[1],
                grouped[key],
            )
            for key in sorted(grouped)
        ]


@dataclass
class Timeline:
    """Event counts per fixed-width time bin since a common start (the run's t0)."""

    bin_s: float = 0.5
    counts: list[float] = field(default_factory=list)

    def add(self, offset_s: float, n: float = 1) -> None:
        """Count ``n`` events at ``offset_s`` seconds after t0 (earlier ones go to bin 0)."""
        index = int(offset_s / self.bin_s) if offset_s > 0 else 0
        counts = self.counts
        if index >= len(counts):
            counts.extend([0] * (index + 1 - len(counts)))
        counts[index] += n

    def merge(self, other: Timeline) -> None:
        if other.bin_s != self.bin_s:
            raise ValueError(f"timeline bins differ: {self.bin_s} vs {other.bin_s}")
        if len(other.counts) > len(self.counts):
            self.counts.extend([0] * (len(other.counts) - len(self.counts)))
        for index, n in enumerate(other.counts):
            self.counts[index] += n

    def rates(self) -> list[float]:
        """Events per second in each bin."""
        return [n / self.bin_s for n in self.counts]
