"""Whether a finished run passed: error, disconnect and loss fractions against
the user's limits, and the time traffic actually flowed.

A load test that lost its clients half-way, or whose handshakes mostly
failed, must not say ``ok``: each check compares one fraction with its
``--max-...-fraction`` flag, and a failed check names the numbers and the
flag in the report's ``failure``. Rates over the whole measured window hide
dead time (a relay that stopped answering half-way still averages half its
rate), so ``flowing_s`` counts only the timeline bins in the window in which
anything arrived.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cluster.loadtest.modes.base import CLOSED
from cluster.loadtest.options import TRAFFIC_MODES, LoadtestOptions
from cluster.loadtest.results import WorkerResult


@dataclass(frozen=True)
class Check:
    """One fraction of a run compared with its limit."""

    name: str  # what is measured, e.g. "disconnect fraction"
    flag: str  # the option that sets the limit
    bad: int  # how many went wrong ...
    of: int  # ... out of how many
    what: str  # the noun for the detail line, e.g. "connections closed by the relay"
    limit: float

    @property
    def fraction(self) -> float:
        return self.bad / self.of if self.of else 0.0

    @property
    def ok(self) -> bool:
        return self.fraction <= self.limit

    def describe(self) -> str:
        return (
            f"{self.bad:,} of {self.of:,} {self.what} ({self.fraction:.1%}), "
            f"over {self.flag} {self.limit:g}"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "check": self.name,
            "value": self.fraction,
            "limit": self.limit,
            "bad": self.bad,
            "of": self.of,
            "ok": self.ok,
        }


def run_checks(options: LoadtestOptions, result: WorkerResult) -> list[Check]:
    """The checks that apply to ``options.mode``, in the order they are reported."""
    counts, errors = result.counts, result.errors
    failure = options.max_failure_fraction
    disconnect = options.max_disconnect_fraction
    if options.mode in TRAFFIC_MODES:
        pairs = counts["pairs"]
        sent = counts["sent"]
        return [
            Check("setup failure fraction", "--max-failure-fraction",
                  options.pairs - pairs, options.pairs, "pairs not set up", failure),
            Check("disconnect fraction", "--max-disconnect-fraction",
                  errors[CLOSED], 2 * pairs, "connections closed by the relay", disconnect),
            Check("loss fraction", "--max-loss-fraction",
                  sent - counts["echoed"], sent, "packets lost", options.max_loss_fraction),
        ]  # fmt: skip
    if options.mode == "handshake":
        attempted = counts["attempted"]
        return [
            Check("handshake failure fraction", "--max-failure-fraction",
                  attempted - counts["handshakes"], attempted, "handshakes failed", failure),
        ]  # fmt: skip
    connected = counts["connected"]
    return [
        Check("setup failure fraction", "--max-failure-fraction",
              options.connections - connected, options.connections,
              "connections not opened", failure),
        Check("disconnect fraction", "--max-disconnect-fraction",
              connected - counts["survived"], connected, "held connections lost", disconnect),
    ]  # fmt: skip


def flowing_seconds(result: WorkerResult, t0: float | None) -> float:
    """Seconds of the measured window whose timeline bins saw any event."""
    if t0 is None or result.window_s <= 0:
        return 0.0
    start, end = result.window_start - t0, result.window_end - t0
    width = result.timeline.bin_s
    total = 0.0
    for index, n in enumerate(result.timeline.counts):
        if n <= 0:
            continue
        overlap = min(end, (index + 1) * width) - max(start, index * width)
        if overlap > 0:
            total += overlap
    return total
