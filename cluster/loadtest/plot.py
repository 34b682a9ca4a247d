"""``--plot FILE.png``: the rate over time and the latency distribution.

matplotlib is optional (``pip install matplotlib``, or ``pip install -e '.[plot]'``
in a clone) and only imported here, when a plot is asked for;
``require_matplotlib`` is called before the run starts so a missing package
fails fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cluster.loadtest.results import WorkerResult

PLOT_LATENCY_BINS = 80


class PlotUnavailable(Exception):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib, which is not installed: "
            "pip install matplotlib (in a clone of the repository: pip install -e '.[plot]')"
        ) from None


def write_plot(path: Path, report: dict[str, Any], result: WorkerResult) -> None:
    """Two panels: the timeline series over time, and the latency histogram (log x)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (over_time, latency) = plt.subplots(2, 1, figsize=(9, 7))
    timeline = report["timeline"]
    bin_s = timeline["bin_s"]
    values = timeline["values"]
    if values:  # one step per bin, the last one as wide as the others
        times = [i * bin_s for i in range(len(values) + 1)]
        over_time.step(times, [*values, values[-1]], where="post")
    over_time.set_ylim(bottom=0)
    warmup = report["settings"].get("warmup_s") or 0
    if warmup:
        over_time.axvspan(0, warmup, alpha=0.15, color="grey", label="warm-up")
        over_time.axvline(warmup + report["measured_s"], color="grey", linestyle=":",
                          label="end of the measured window")  # fmt: skip
        over_time.legend(loc="lower right")
    over_time.set_xlabel("seconds since start")
    over_time.set_ylabel(timeline["unit"])
    target = report["target"]
    over_time.set_title(
        f"cluster loadtest {report['mode']} - {target['address']}:{target['port']} "
        f"({report['status']})"
    )
    over_time.grid(True, alpha=0.3)

    buckets = result.latency.distribution(max_bins=PLOT_LATENCY_BINS)
    if buckets:
        lefts = [max(lower, 1e-7) * 1e3 for lower, _, _ in buckets]
        widths = [(upper - max(lower, 1e-7)) * 1e3 for lower, upper, _ in buckets]
        latency.bar(lefts, [n for _, _, n in buckets], width=widths, align="edge")
        latency.set_xscale("log")
        for name in ("p50", "p99"):
            value = report["latency_ms"].get(name)
            if value:
                latency.axvline(value, linestyle="--", color="red" if name == "p99" else "green")
                latency.annotate(name, (value, 0), xytext=(3, 5), textcoords="offset points")
    else:
        latency.text(0.5, 0.5, "no latency samples", ha="center", transform=latency.transAxes)
    latency.set_xlabel("latency (ms, log scale)")
    latency.set_ylabel("samples")
    latency.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
