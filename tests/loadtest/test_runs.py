"""`cluster loadtest` against our relay (2 workers) and tox-bootstrapd, as a user runs it.

Each mode runs briefly (a few pairs/connections, 1-2 s, 2 processes) in a
subprocess with ``--json``; the assertions are on real values: frames
relayed, nothing lost on loopback, every handshake done, every idle
connection alive, the relay's RSS read from /proc.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.bootstrapd import bootstrapd_available, start_bootstrapd
from testbed.relay_process import RelayProcess, start_relay

REPO = Path(__file__).resolve().parents[2]
LOADTEST = [sys.executable, "-m", "cluster.cli", "loadtest"]
RUN_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    process = start_relay(tmp_path_factory.mktemp("loadtest") / "relay", workers=2)
    try:
        yield process
    finally:
        process.stop()


def target(relay: Any) -> list[str]:
    return [relay.host, str(relay.port), relay.public_key.hex()]


def loadtest(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LOADTEST, *argv], capture_output=True, text=True, cwd=REPO, timeout=RUN_TIMEOUT_S
    )


def report_of(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    lines = result.stdout.splitlines()
    assert len(lines) == 1, f"expected one JSON line; stdout={result.stdout!r} {result.stderr!r}"
    return json.loads(lines[0])


def test_throughput(relay: RelayProcess, tmp_path: Path) -> None:
    plot = ["--plot", str(tmp_path / "t.png")] if _has_matplotlib() else []
    result = loadtest(
        "throughput", *target(relay), "-P", "3", "-W", "4", "-S", "200",
        "--warmup", "0.3", "--duration", "1", "--processes", "2", "--seed", "1", "--json", *plot,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    results = report["results"]
    assert report["status"] == "ok" and report["errors"]["total"] == 0
    assert results["pairs"] == 3
    assert results["frames"] > 100 and results["frames_per_s"] > 100
    assert results["frames_total"] >= results["frames"]  # warm-up and drain too
    assert 0 < results["flowing_s"] <= report["measured_s"]
    assert [check["ok"] for check in report["checks"]] == [True, True, True]
    assert results["payload_mb_per_s"] == pytest.approx(results["frames_per_s"] * 200 / 1e6)
    assert results["sent"] > 0 and results["lost"] == 0 and results["sent"] == results["echoed"]
    latency = report["latency_ms"]
    assert latency["samples"] > 0
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["measured_s"] == pytest.approx(1.0, abs=0.05)
    assert sum(report["timeline"]["values"]) > 0
    assert "frames/s" in result.stderr and result.stderr.count("loadtest throughput") >= 2
    assert report["generator"]["processes"] == 2 and report["generator"]["cpu_s"] > 0
    if plot:
        assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"


def test_oob_with_keys_file(relay: RelayProcess) -> None:
    keys = relay.workdir / "relay.keys"
    result = loadtest(
        "oob", relay.host, str(relay.port), f"@{keys}", "-P", "2", "-W", "4", "-S", "100",
        "--warmup", "0.2", "--duration", "1", "--processes", "2", "--json", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["status"] == "ok" and report["errors"]["total"] == 0
    assert report["results"]["frames"] > 100 and report["results"]["lost"] == 0
    assert result.stderr == ""  # --quiet


def test_handshake(relay: RelayProcess) -> None:
    result = loadtest(
        "handshake", *target(relay), "-C", "60", "-K", "8", "--processes", "2", "--json"
    )
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["results"]["handshakes"] == report["results"]["attempted"] == 60
    assert report["results"]["failures"] == 0 and report["results"]["handshakes_per_s"] > 0
    assert report["latency_ms"]["samples"] == 60


def test_idle_with_server_memory(relay: RelayProcess) -> None:
    result = loadtest(
        "idle", *target(relay), "-N", "40", "--duration", "1", "--processes", "2",
        "--server-pid", str(relay.pid), "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["results"]["connected"] == report["results"]["survived"] == 40
    assert report["results"]["closed_during_hold"] == 0
    memory = report["memory"]
    assert memory["rss_before_kib"] > 0 and memory["rss_end_kib"] > 0
    assert memory["processes_before"] >= 3  # supervisor, coordinator, 2 workers
    assert "per_connection_kib" in memory


def test_table_output(relay: RelayProcess) -> None:
    result = loadtest("handshake", *target(relay), "-C", "10", "--processes", "1", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "handshakes/s" in result.stdout and "10 of 10 started" in result.stdout
    assert "status:   ok" in result.stdout


def interrupt(relay: RelayProcess, when: bytes) -> tuple[int, dict[str, Any], bytes]:
    """Run throughput; once ``when`` shows on the live line, Ctrl-C the process group.

    The whole group, as a terminal does: the workers get SIGINT too (and must
    ignore it, even while still importing). Returns (exit status, report, stderr).
    """
    proc = subprocess.Popen(
        [*LOADTEST, "throughput", *target(relay), "-P", "2", "-W", "4", "-S", "100",
         "--warmup", "0", "--duration", "60", "--processes", "2", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, start_new_session=True,
    )  # fmt: skip
    stderr = bytearray()

    def read_stderr() -> None:
        assert proc.stderr is not None
        while chunk := os.read(proc.stderr.fileno(), 4096):
            stderr.extend(chunk)

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 20
        while when not in stderr and time.monotonic() < deadline:
            time.sleep(0.01)
        assert when in stderr, stderr.decode(errors="replace")
        os.killpg(proc.pid, signal.SIGINT)
        stdout, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(5)
    return proc.returncode, json.loads(stdout.decode()), bytes(stderr)


def test_ctrl_c_prints_the_partial_report(relay: RelayProcess) -> None:
    status, report, stderr = interrupt(relay, b"measuring")
    assert status == 130, stderr.decode(errors="replace")
    assert report["status"] == "interrupted" and report["signal"] == "SIGINT"
    assert report["worker_errors"] == [] and report["failure"] is None
    assert report["results"]["frames"] > 0 and report["results"]["pairs"] == 2
    assert 0 < report["measured_s"] < 30
    assert b"\r" in stderr and b"Traceback" not in stderr
    assert stderr.strip().count(b"\n") <= 1  # one live line, rewritten, then ended


def test_ctrl_c_while_workers_start(relay: RelayProcess) -> None:
    status, report, stderr = interrupt(relay, b"setup")
    assert status == 130, stderr.decode(errors="replace")
    assert report["status"] == "interrupted" and report["worker_errors"] == []
    assert b"Traceback" not in stderr


def test_clients_disconnected_by_a_reload_fail_the_run(tmp_path: Path) -> None:
    """Issue 14 point 3: the relay closes every client half-way (SIGHUP
    replaces its worker); the run fails with that cause, exit status 1, and
    reports the rate while traffic flowed beside the whole-window rate."""
    relay = start_relay(tmp_path / "relay", workers=1)
    try:
        proc = subprocess.Popen(
            [*LOADTEST, "throughput", *target(relay), "-P", "2", "-W", "4", "-S", "100",
             "--warmup", "0.2", "--duration", "4", "--drain", "0.5", "--processes", "1",
             "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        )  # fmt: skip
        stderr = ""
        try:
            assert proc.stderr is not None
            while "measuring" not in stderr and proc.poll() is None:
                stderr += os.read(proc.stderr.fileno(), 4096).decode(errors="replace")
            time.sleep(1.0)
            os.kill(relay.pid, signal.SIGHUP)
            stdout, rest = proc.communicate(timeout=RUN_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        relay.stop()
    assert proc.returncode == 1, stderr + rest
    report = json.loads(stdout)
    assert report["status"] == "failed"
    assert "4 of 4 connections closed by the relay" in report["failure"]
    assert "--max-disconnect-fraction" in report["failure"]
    results = report["results"]
    # Traffic flowed until the reload, not after it: the dead time is left out.
    assert 0.5 < results["flowing_s"] < report["measured_s"] - 0.5
    assert results["frames_per_s_flowing"] == pytest.approx(
        results["frames"] / results["flowing_s"]
    )
    assert results["frames_per_s_flowing"] > results["frames_per_s"] > 0


def test_wrong_relay_key_fails_with_the_cause(relay: RelayProcess) -> None:
    wrong = bytes(32).hex()
    result = loadtest(
        "handshake", relay.host, str(relay.port), wrong, "-C", "8", "-K", "4",
        "--processes", "1", "--connect-timeout", "2", "--json", "--quiet",
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    report = report_of(result)
    assert report["status"] == "failed" and report["failure"] == "no handshake succeeded"
    assert report["checks"][0]["bad"] == 8 and not report["checks"][0]["ok"]
    assert report["errors"]["total"] == 8


@pytest.mark.reference
def test_handshake_against_tox_bootstrapd(tmp_path: Path) -> None:
    if not bootstrapd_available():
        pytest.skip("tox-bootstrapd not installed")
    reference = start_bootstrapd(tmp_path / "bootstrapd")
    try:
        result = loadtest(
            "handshake", *target(reference), "-C", "30", "-K", "8", "--processes", "2", "--json"
        )
    finally:
        reference.stop()
    assert result.returncode == 0, result.stderr
    report = report_of(result)
    assert report["results"]["handshakes"] == 30 and report["results"]["failures"] == 0


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True
