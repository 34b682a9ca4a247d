"""Attacks on what the operator exposes (issue 10 finding 9): a slowloris on
the metrics port. prometheus-client's server started a thread per connection
with no timeout, so each slow connection held a thread for ever; ours holds
no thread, caps its connections, and a scrape still answers during the attack."""

from __future__ import annotations

import contextlib
import socket
import time
import urllib.request
from pathlib import Path

from testbed.relay_process import start_relay

ATTACKERS = 300
SOURCES = [f"127.0.{i}.{j}" for i in (3, 4) for j in range(2, 12)]


def threads_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def scrape(url: str) -> tuple[float, bytes]:
    started = time.monotonic()
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        body = response.read()
    return time.monotonic() - started, body


def test_metrics_slowloris_holds_no_threads_and_scrapes_answer(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "relay", workers=2, extra_args=["--metrics", "127.0.0.1:0"])
    attackers: list[socket.socket] = []
    try:
        url = next(line.split()[-1] for line in relay.stdout_lines if line.startswith("Metrics on"))
        host, port = url.removeprefix("http://").removesuffix("/metrics").rsplit(":", 1)
        threads_before = threads_of(relay.pid)
        for index in range(ATTACKERS):
            sock = socket.socket()
            sock.bind((SOURCES[index % len(SOURCES)], 0))
            sock.settimeout(2)
            try:
                sock.connect((host, int(port)))
                sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # never the blank line
            except OSError:
                sock.close()
                continue
            attackers.append(sock)
        worst = 0.0
        peak_threads = 0
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # keep trickling header bytes, scrape meanwhile
            for sock in attackers:
                with contextlib.suppress(OSError):  # evicted: it is closed
                    sock.send(b"X-a: b\r\n")
            took, body = scrape(url)
            assert b"toxrelay_workers 2.0" in body
            worst = max(worst, took)
            peak_threads = max(peak_threads, threads_of(relay.pid))
            time.sleep(0.2)
        print(
            f"metrics slowloris: {len(attackers)} connections, supervisor threads "
            f"{threads_before} -> peak {peak_threads}, slowest scrape {worst * 1000:.0f} ms"
        )
        assert peak_threads <= threads_before + 2
        assert worst < 1.0
    finally:
        for sock in attackers:
            sock.close()
        relay.stop()
