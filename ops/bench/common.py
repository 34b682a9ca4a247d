"""What the benchmark scripts of ops/bench share: how a run stops on a
signal, the header of its report (date, command, machine), strict JSON, the
way a report is printed, and the entry-point guard."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import uvloop

T = TypeVar("T")


def _raise_keyboard_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Ctrl-C and SIGTERM both unwind through the ``finally`` blocks that stop
    the relays (SIGINT explicitly too: a shell's background job starts with it
    ignored)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of the pair benchmarks (pair_compare, shard_compare): rounds,
    output, the RTT series and the throughput window."""
    add = parser.add_argument
    add("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    add("--json", action="store_true", help="print one JSON line instead of the table")
    add("--rtt-count", type=int, default=2000, help="RTT: round trips N per series")
    add("--rtt-size", type=int, default=100, help="RTT: data payload bytes")
    add("--rtt-time-limit", type=float, default=6.0, help="RTT: max seconds per series")
    add("--window", type=int, default=32, help="throughput: frames in flight W (per pair)")
    add("--frame-size", type=int, default=1024, help="throughput: payload bytes")
    add("--duration", type=float, default=3.0, help="throughput: seconds measured")
    add("--quiet", action="store_true", help="no progress lines on stderr")


def settings_from(arguments: object, settings_type: type[T]) -> T:
    """The dataclass ``settings_type`` with each field taken from the parsed
    argument of the same name."""
    fields = dataclasses.fields(settings_type)  # type: ignore[arg-type]
    return settings_type(**{field.name: getattr(arguments, field.name) for field in fields})


def start_run(arguments: object, settings_type: type[T]) -> tuple[T, dict[str, Any], float]:
    """The settings from the arguments, the report's header and the start
    (``time.perf_counter``); from now on SIGINT and SIGTERM unwind
    (``stop_on_signals``)."""
    settings = settings_from(arguments, settings_type)
    header = run_header()
    stop_on_signals()
    return settings, header, time.perf_counter()


def run_header() -> dict[str, Any]:
    """The date and the command of this run, and the machine it runs on."""
    return {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable, *sys.argv]),
        "machine": machine_info(),
    }


def machine_info() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "uvloop": uvloop.__version__,
    }


def json_safe(value: Any) -> Any:
    """NaN (no samples) as null, so the JSON line is strict JSON."""
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def print_report(
    as_json: bool,
    meta: dict[str, Any],
    summary: Any,
    details: tuple[str, Any],
    render_table: Callable[[Any, dict[str, Any]], str],
) -> None:
    """One strict-JSON line (header, summary and ``details`` under its name),
    or the table."""
    if as_json:
        name, value = details
        report = {**meta, "summary": summary, name: value}
        print(json.dumps(json_safe(report), allow_nan=False, default=str))
    else:
        print(render_table(summary, meta))


def run_main(main: Callable[[], int], stopped: str) -> None:
    """``sys.exit(main())``; an interrupt says what was stopped and exits 130."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print(f"interrupted; {stopped} stopped", file=sys.stderr)
        sys.exit(130)
