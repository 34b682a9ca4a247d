"""What each worker process reports, and how the parent merges the reports.

Counts and error causes are summed, latency histograms merged bucket by
bucket, timelines (shared t0) added bin by bin, and the measured window is
the union of the processes' windows.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from cluster.loadtest.stats import LatencyHistogram, Timeline

TIMELINE_BIN_S = 0.5


@dataclass
class WorkerResult:
    """One process's (or, merged, the whole run's) measurements."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    timeline: Timeline = field(default_factory=lambda: Timeline(TIMELINE_BIN_S))
    window_start: float = math.inf  # perf_counter seconds (CLOCK_MONOTONIC: same in all processes)
    window_end: float = -math.inf
    interrupted: bool = False

    @property
    def window_s(self) -> float:
        """Length of the measured window (0 when nothing was measured)."""
        return max(0.0, self.window_end - self.window_start)

    def merge(self, other: WorkerResult) -> None:
        self.counts.update(other.counts)
        self.errors.update(other.errors)
        self.latency.merge(other.latency)
        self.timeline.merge(other.timeline)
        self.window_start = min(self.window_start, other.window_start)
        self.window_end = max(self.window_end, other.window_end)
        self.interrupted = self.interrupted or other.interrupted


def merge_results(results: list[WorkerResult]) -> WorkerResult:
    """One result for the whole run (an empty one for no results)."""
    merged = WorkerResult()
    for result in results:
        merged.merge(result)
    return merged
