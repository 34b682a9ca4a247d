"""The end of a run: one report dict, printed as a table or as one JSON line.

``build_report`` is the single source of both outputs; its keys are stable
for scripts (``--json``). Rates use the measured window: throughput/oob the
window after warm-up (shortened by Ctrl-C), handshake from t0 until the last
connection finished, idle the hold; the ``*_flowing`` rates use only the part
of it in which traffic arrived. ``checks`` are the verdict (``verdict.py``).
"""

from __future__ import annotations

import itertools
import json
import math
import signal
from typing import Any

from cluster.loadtest.modes.base import CLOSED
from cluster.loadtest.options import TRAFFIC_MODES, LoadtestOptions
from cluster.loadtest.pool import PoolOutcome
from cluster.loadtest.results import WorkerResult
from cluster.loadtest.verdict import Check, flowing_seconds, run_checks

PERCENTILES = (("p50", 0.50), ("p90", 0.90), ("p99", 0.99))


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else math.nan


def latency_ms(result: WorkerResult) -> dict[str, float | int]:
    latency = result.latency
    summary: dict[str, float | int] = {"samples": latency.count}
    for name, fraction in PERCENTILES:
        summary[name] = latency.percentile(fraction) * 1e3
    summary["max"] = latency.maximum * 1e3 if latency.count else math.nan
    summary["mean"] = latency.mean * 1e3
    return summary


def timeline_series(mode: str, result: WorkerResult, connected: int) -> tuple[str, list[float]]:
    """(what is drawn, one value per timeline bin): a rate, or idle's live connections."""
    if mode == "idle":
        lost = itertools.accumulate(result.timeline.counts)
        return "connections alive", [connected - n for n in lost]
    unit = "handshakes/s" if mode == "handshake" else "frames/s"
    return unit, result.timeline.rates()


def _settings(options: LoadtestOptions) -> dict[str, Any]:
    common = {
        "processes": options.processes,
        "source_addresses": len(options.source_addresses),
        "seed": options.seed,
    }
    if options.mode in TRAFFIC_MODES:
        shape = {
            "pairs": options.pairs,
            "window": options.window,
            "size": options.size,
            "warmup_s": options.warmup,
            "duration_s": options.duration,
            "drain_s": options.drain,
        }
    elif options.mode == "handshake":
        shape = {"connections": options.connections, "concurrency": options.concurrency}
    else:
        shape = {"connections": options.connections, "duration_s": options.duration}
    return shape | common


def _results(options: LoadtestOptions, outcome: PoolOutcome) -> dict[str, Any]:
    result = outcome.result
    counts = result.counts
    window = result.window_s
    flowing = flowing_seconds(result, outcome.t0)
    if options.mode in TRAFFIC_MODES:
        sent, echoed = counts["sent"], counts["echoed"]
        return {
            "pairs": counts["pairs"],
            "frames": counts["frames"],
            "frames_total": counts["frames total"],  # the whole run, warm-up and drain too
            "frames_per_s": _rate(counts["frames"], window),
            # The same frames over only the time they flowed (dead time left out).
            "flowing_s": flowing,
            "frames_per_s_flowing": _rate(counts["frames"], flowing),
            "payload_mb_per_s": _rate(counts["payload bytes"], window) / 1e6,
            "sent": sent,
            "echoed": echoed,
            "lost": sent - echoed,
        }
    if options.mode == "handshake":
        return {
            "attempted": counts["attempted"],
            "handshakes": counts["handshakes"],
            "failures": sum(result.errors.values()),
            "handshakes_per_s": _rate(counts["handshakes"], window),
            "flowing_s": flowing,
            "handshakes_per_s_flowing": _rate(counts["handshakes"], flowing),
        }
    return {
        "connected": counts["connected"],
        "survived": counts["survived"],
        "closed_during_hold": result.errors[CLOSED],
        "server_pings": counts["server pings"],
        "held_s": window,
    }


def _memory(options: LoadtestOptions, outcome: PoolOutcome) -> dict[str, Any] | None:
    if options.server_pid is None:
        return None
    samples = outcome.memory
    memory: dict[str, Any] = {"server_pid": options.server_pid}
    for phase in ("before", "connected", "end"):
        if phase in samples:
            memory[f"rss_{phase}_kib"], memory[f"processes_{phase}"] = samples[phase]
    counts = outcome.result.counts
    held = counts["connected"] if options.mode == "idle" else 2 * counts["pairs"]
    if options.mode != "handshake" and held and "before" in samples and "connected" in samples:
        memory["per_connection_kib"] = (samples["connected"][0] - samples["before"][0]) / held
    return memory


def _failure(options: LoadtestOptions, outcome: PoolOutcome, checks: list[Check]) -> str | None:
    """Why the run failed, if it did: the pool's reason, an empty result, or
    every check over its limit."""
    if outcome.failure or outcome.stop_signal is not None:
        return outcome.failure
    counts = outcome.result.counts
    if options.mode == "handshake" and counts["attempted"] and not counts["handshakes"]:
        return "no handshake succeeded"
    failed = [check.describe() for check in checks if not check.ok]
    return "; ".join(failed) if failed else None


def _status(outcome: PoolOutcome, failure: str | None) -> str:
    if outcome.stop_signal is not None:
        return "interrupted"
    if failure or outcome.worker_errors:
        return "failed"
    return "ok"


def build_report(options: LoadtestOptions, outcome: PoolOutcome) -> dict[str, Any]:
    """Everything the table and the JSON line show."""
    result = outcome.result
    target = options.target
    unit, series = timeline_series(options.mode, result, result.counts["connected"])
    checks = run_checks(options, result)
    failure = _failure(options, outcome, checks)
    elapsed = outcome.finished - outcome.started
    return {
        "mode": options.mode,
        "status": _status(outcome, failure),
        "interrupted": outcome.stop_signal is not None,
        "signal": signal.Signals(outcome.stop_signal).name if outcome.stop_signal else None,
        "failure": failure,
        "worker_errors": outcome.worker_errors,
        "target": {
            "host": target.name,
            "address": target.address,
            "port": target.port,
            "public_key": target.public_key.hex().upper(),
        },
        "settings": _settings(options),
        "elapsed_s": elapsed,
        "measured_s": result.window_s,
        "results": _results(options, outcome),
        "checks": [check.as_dict() for check in checks],
        "latency_ms": latency_ms(result),
        "errors": {
            "total": sum(result.errors.values()),
            "by_cause": dict(sorted(result.errors.items())),
        },
        "memory": _memory(options, outcome),
        "generator": {
            "processes": outcome.processes,
            "cpu_s": outcome.generator_cpu_s,
            # Near 1.0 the generator, not the relay, limited the rates: add --processes.
            "busy": _rate(outcome.generator_cpu_s, outcome.processes * elapsed),
        },
        "timeline": {"bin_s": result.timeline.bin_s, "unit": unit, "values": series},
    }


def _strict(value: Any) -> Any:
    """NaN and infinities as null, so the line is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_strict(v) for v in value]
    return value


def render_json(report: dict[str, Any]) -> str:
    """One line of strict JSON."""
    return json.dumps(_strict(report), allow_nan=False, separators=(",", ":"))


# -- the table ---------------------------------------------------------------


def _number(value: float | int | None, decimals: int = 0) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:,.{decimals}f}"


def _ms(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.3f} ms"


def _rows(report: dict[str, Any]) -> list[tuple[str, str]]:
    mode, results, latency = report["mode"], report["results"], report["latency_ms"]
    rtt = "RTT" if mode in TRAFFIC_MODES else "latency" if mode == "handshake" else "final PING RTT"
    rows: list[tuple[str, str]] = []
    if mode in TRAFFIC_MODES:
        rows += [
            ("pairs linked" if mode == "throughput" else "pairs connected",
             _number(results["pairs"])),
            ("relayed frames/s", _number(results["frames_per_s"])),
            (f"  while flowing ({results['flowing_s']:.1f} s)",
             _number(results["frames_per_s_flowing"])),
            ("payload MB/s", _number(results["payload_mb_per_s"], 2)),
            ("frames in window", _number(results["frames"])),
        ]  # fmt: skip
    elif mode == "handshake":
        rows += [
            ("handshakes/s", _number(results["handshakes_per_s"])),
            (
                f"  while flowing ({results['flowing_s']:.1f} s)",
                _number(results["handshakes_per_s_flowing"]),
            ),
            ("handshakes ok", f"{results['handshakes']:,} of {results['attempted']:,} started"),
            ("failures", _number(results["failures"])),
        ]
    else:
        rows += [
            ("connections open", _number(results["connected"])),
            ("survived", _number(results["survived"])),
            ("closed during hold", _number(results["closed_during_hold"])),
            ("server pings answered", _number(results["server_pings"])),
        ]
    rows += [(f"{rtt} {name}", _ms(latency[name])) for name in ("p50", "p90", "p99", "max")]
    rows.append((f"{rtt} samples", _number(latency["samples"])))
    if mode in TRAFFIC_MODES:
        rows += [
            ("packets sent", _number(results["sent"])),
            ("packets echoed", _number(results["echoed"])),
            ("lost packets", _number(results["lost"])),
        ]
    memory = report["memory"]
    if memory:
        for phase in ("before", "connected", "end"):
            if f"rss_{phase}_kib" in memory:
                rows.append(
                    (f"server RSS {phase}",
                     f"{memory[f'rss_{phase}_kib'] / 1024:,.1f} MiB "
                     f"({memory[f'processes_{phase}']} processes)")
                )  # fmt: skip
        if "per_connection_kib" in memory:
            rows.append(("server RSS per connection", f"{memory['per_connection_kib']:.1f} KiB"))
    generator = report["generator"]
    busy = generator["busy"]
    rows.append(
        ("generator CPU",
         f"{generator['cpu_s']:.1f} s, {generator['processes']} processes"
         + (f", {busy:.0%} busy" if busy is not None and math.isfinite(busy) else ""))
    )  # fmt: skip
    rows += [
        (check["check"], f"{check['value']:.2%} (limit {check['limit'] * 100:g}%)"
         + ("" if check["ok"] else " FAILED"))
        for check in report["checks"]
    ]  # fmt: skip
    rows.append(("errors", _number(report["errors"]["total"])))
    rows += [(f"  {cause}", _number(n)) for cause, n in report["errors"]["by_cause"].items() if n]
    return rows


def _settings_text(mode: str, settings: dict[str, Any]) -> str:
    if mode in TRAFFIC_MODES:
        shape = (
            f"P={settings['pairs']} pairs, W={settings['window']} in flight, "
            f"S={settings['size']} B, warm-up {settings['warmup_s']:g} s, "
            f"duration {settings['duration_s']:g} s, drain {settings['drain_s']:g} s"
        )
    elif mode == "handshake":
        shape = f"C={settings['connections']} connections, K={settings['concurrency']} at a time"
    else:
        shape = f"N={settings['connections']} connections held D={settings['duration_s']:g} s"
    seed = "-" if settings["seed"] is None else settings["seed"]
    return (
        f"{shape}; {settings['processes']} processes, "
        f"{settings['source_addresses'] or 'no'} source addresses, seed {seed}"
    )


def render_table(report: dict[str, Any]) -> str:
    """The human summary."""
    target = report["target"]
    shape = _settings_text(report["mode"], report["settings"])
    lines = [
        f"cluster loadtest {report['mode']} -> {target['address']}:{target['port']} "
        f"(key {target['public_key'][:16]}...)",
        f"settings: {shape}",
        f"status:   {report['status']}"
        + (f" ({report['signal']})" if report["signal"] else "")
        + (f": {report['failure']}" if report["failure"] else "")
        + f"; measured {report['measured_s']:.2f} s of {report['elapsed_s']:.2f} s",
    ]
    lines += [f"worker error: {error}" for error in report["worker_errors"]]
    rows = _rows(report)
    width = max(len(label) for label, _ in rows)
    value_width = max(len(value) for _, value in rows)
    rule = "-" * (width + value_width + 3)
    lines.append(rule)
    lines += [f"{label:<{width}}   {value:>{value_width}}" for label, value in rows]
    lines.append(rule)
    return "\n".join(lines)
