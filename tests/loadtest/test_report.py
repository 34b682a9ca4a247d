"""The report: one strict JSON line, or a table, from a merged outcome."""

from __future__ import annotations

import json
import signal
from collections import Counter

import pytest

from cluster.cli import build_parser
from cluster.loadtest.modes.base import CLOSED
from cluster.loadtest.options import UsageError, options_from_args
from cluster.loadtest.pool import PoolOutcome
from cluster.loadtest.procmem import process_tree, rss_kib, tree_rss_kib
from cluster.loadtest.report import build_report, render_json, render_table
from cluster.loadtest.results import WorkerResult

HEX = bytes(range(32)).hex()


def outcome(result: WorkerResult, **kwargs: object) -> PoolOutcome:
    values: dict[str, object] = {
        "result": result,
        "processes": 2,
        "started": 0.0,
        "finished": 3.0,
        "t0": 0.1,
        "ready_units": 2,
    }
    values.update(kwargs)
    return PoolOutcome(**values)  # type: ignore[arg-type]


def throughput_options() -> object:
    args = build_parser().parse_args(
        ["loadtest", "throughput", "127.0.0.1", "33445", HEX, "-P", "2", "-S", "100"]
    )
    return options_from_args(args)


def test_throughput_report_values_and_table() -> None:
    result = WorkerResult(
        counts=Counter(pairs=2, frames=2000, sent=1100, echoed=1099),
        errors=Counter(disconnected=1),
    )
    result.counts["payload bytes"] = 2000 * 100
    result.window_start, result.window_end = 1.0, 3.0
    for ms in range(1, 101):
        result.latency.add(ms / 1000)
    result.timeline.add(0.2, 10)
    report = build_report(throughput_options(), outcome(result))  # type: ignore[arg-type]
    assert report["status"] == "ok"
    assert report["results"]["frames_per_s"] == 1000
    assert report["results"]["payload_mb_per_s"] == 0.1
    assert report["results"]["lost"] == 1
    assert round(report["latency_ms"]["p99"]) == 99 and report["latency_ms"]["max"] == 100
    assert report["errors"] == {"total": 1, "by_cause": {"disconnected": 1}}
    line = render_json(report)
    assert "\n" not in line and json.loads(line)["mode"] == "throughput"
    table = render_table(report)
    for text in ("relayed frames/s", "1,000", "payload MB/s", "RTT p99", "lost packets"):
        assert text in table
    assert "disconnected" in table


def test_interrupted_empty_report_is_strict_json() -> None:
    report = build_report(
        throughput_options(),  # type: ignore[arg-type]
        outcome(WorkerResult(interrupted=True), stop_signal=signal.SIGINT),
    )
    assert report["status"] == "interrupted" and report["signal"] == "SIGINT"
    parsed = json.loads(render_json(report))  # NaN rates and percentiles became null
    assert parsed["results"]["frames_per_s"] is None
    assert parsed["latency_ms"]["p50"] is None
    assert "interrupted (SIGINT)" in render_table(report)


def test_rss_of_a_process_tree() -> None:
    import subprocess
    import sys
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        import os

        deadline = time.monotonic() + 5
        while child.pid not in process_tree(os.getpid()) and time.monotonic() < deadline:
            time.sleep(0.05)
        tree = process_tree(os.getpid())
        assert tree[0] == os.getpid() and child.pid in tree
        assert rss_kib(os.getpid()) > 1000
        total, processes = tree_rss_kib(os.getpid())
        assert processes >= 2 and total >= rss_kib(os.getpid())
    finally:
        child.kill()
        child.wait()
    assert process_tree(999_999_999) == [] and tree_rss_kib(999_999_999) == (0, 0)


def handshake_options(*flags: str) -> object:
    argv = ["loadtest", "handshake", "127.0.0.1", "33445", HEX, "-C", "100", *flags]
    return options_from_args(build_parser().parse_args(argv))


def handshake_result(handshakes: int) -> WorkerResult:
    result = WorkerResult(counts=Counter(attempted=100, handshakes=handshakes))
    result.errors["connect: timed out"] = 100 - handshakes
    result.window_start, result.window_end = 0.1, 2.1
    return result


def test_partial_handshake_failures_fail_the_run() -> None:
    """Issue 14 point 3: 42 % of handshakes failed and the run said ok."""
    report = build_report(handshake_options(), outcome(handshake_result(58)))  # type: ignore[arg-type]
    assert report["status"] == "failed"
    assert report["failure"] == (
        "42 of 100 handshakes failed (42.0%), over --max-failure-fraction 0.01"
    )
    assert report["checks"][0]["check"] == "handshake failure fraction"
    assert report["checks"][0]["value"] == 0.42 and not report["checks"][0]["ok"]
    table = render_table(report)
    assert "42.00% (limit 1%) FAILED" in table and "42 of 100" in table
    # The user sets the limit.
    tolerant = handshake_options("--max-failure-fraction", "0.5")
    assert build_report(tolerant, outcome(handshake_result(58)))["status"] == "ok"  # type: ignore[arg-type]


def test_disconnected_clients_fail_the_run_and_dead_time_is_reported() -> None:
    """Every client closed by the relay half-way (a reload): failed, and the
    rate while traffic flowed is reported beside the whole-window rate."""
    result = WorkerResult(counts=Counter(pairs=2, frames=3000, sent=1500, echoed=1484))
    result.errors[CLOSED] = 4
    result.counts["payload bytes"] = 3000 * 100
    result.window_start, result.window_end = 1.1, 3.1  # t0 = 0.1: window bins 2..5
    for offset in (1.0, 1.5):  # traffic in the first second of the window only
        result.timeline.add(offset, 1500)
    report = build_report(throughput_options(), outcome(result))  # type: ignore[arg-type]
    assert report["status"] == "failed"
    assert "4 of 4 connections closed by the relay (100.0%)" in report["failure"]
    assert "--max-disconnect-fraction 0.01" in report["failure"]
    assert "16 of 1,500 packets lost" in report["failure"]
    results = report["results"]
    assert results["frames_per_s"] == 1500
    assert results["flowing_s"] == pytest.approx(1.0)
    assert results["frames_per_s_flowing"] == pytest.approx(3000)
    assert "while flowing (1.0 s)" in render_table(report)


def test_fraction_flags_are_validated() -> None:
    for value in ("-0.1", "1.5", "nan"):
        with pytest.raises(UsageError, match=r"--max-loss-fraction must be 0\.\.1"):
            throughput_options_with("--max-loss-fraction", value)


def throughput_options_with(*flags: str) -> object:
    argv = ["loadtest", "throughput", "127.0.0.1", "33445", HEX, *flags]
    return options_from_args(build_parser().parse_args(argv))
