"""A real `cluster start --shard-ports` on loopback for benchmarks and chaos runs.

Starts the relay in a work directory of its own (keys created there, admin
socket there, kernel-chosen ports), reads its stdout in a thread, and knows
from those lines where each worker slot's current shard listens and which
PIDs the workers and the coordinator have. Every signal goes to a PID the
relay printed (or the supervisor's own), never to a process name.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"
READY_TIMEOUT = 30.0  # seconds for `Relay ready` (a loaded 2-core machine is slow)
STOP_TIMEOUT = 5.0

SHARD_RE = re.compile(
    r"^Shard (?P<shard>\d+) \(worker (?P<worker>\d+)\) pid (?P<pid>\d+) "
    r"direct address (?P<host>[^:]+):(?P<port>\d+)$"
)
COORDINATOR_RE = re.compile(r"^Coordinator pid (?P<pid>\d+)$")
LISTEN_RE = re.compile(r"^Listening on (?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:]+)):(?P<port>\d+)$")
PUBLIC_KEY_RE = re.compile(r"^Public Key: (?P<key>[0-9A-Fa-f]{64})$")
RELOAD_DONE = "Reload complete"


class ClusterStartError(Exception):
    """The relay did not become ready; the message holds its output."""


@dataclass(frozen=True)
class Shard:
    """One `Shard ...` line: the shard a worker slot runs and its direct port."""

    shard: int
    slot: int
    pid: int
    host: str
    port: int

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


class RelayCluster:
    """A running `cluster start --shard-ports --workers N` and what it printed."""

    def __init__(self, workdir: Path, workers: int, extra_args: list[str] | None = None) -> None:
        self.workdir = workdir
        self.workers = workers
        self.lines: list[str] = []
        self._seen_pids: set[int] = set()
        workdir.mkdir(parents=True, exist_ok=True)
        args = [sys.executable, "-m", "cluster.cli", "start", "--host", HOST]
        args += ["--keys", str(workdir / "relay.keys"), "--workers", str(workers)]
        args += ["--port", "0", "--udp-port", "0", "--shard-ports", *(extra_args or [])]
        with open(workdir / "relay.err", "w") as stderr:
            self._proc = subprocess.Popen(
                args, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=workdir, bufsize=1
            )
        self.pid = self._proc.pid
        self._ready = threading.Event()
        threading.Thread(target=self._read_stdout, daemon=True).start()
        if not self._ready.wait(READY_TIMEOUT) or not self.ready:
            self.stop()
            raise ClusterStartError(
                f"relay not ready within {READY_TIMEOUT} s; stdout={self.lines!r} "
                f"stderr={self.stderr_text()[-4000:]!r}"
            )
        self.public_key = bytes.fromhex(self._first(PUBLIC_KEY_RE)["key"])
        self.port = int(self._first(LISTEN_RE)["port"])
        self.host = HOST

    def _read_stdout(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))
            if line.startswith("Relay ready"):
                self._ready.set()
        self._ready.set()

    def _first(self, pattern: re.Pattern[str]) -> re.Match[str]:
        for line in self.lines:
            match = pattern.match(line)
            if match:
                return match
        raise ClusterStartError(f"no line matching {pattern.pattern!r}: {self.lines!r}")

    @property
    def ready(self) -> bool:
        return any(line.startswith("Relay ready") for line in self.lines)

    def stderr_text(self) -> str:
        return (self.workdir / "relay.err").read_text(errors="replace")

    # -- what the relay printed ---------------------------------------------------

    def shards(self) -> dict[int, Shard]:
        """The current shard of every worker slot (the latest line per slot)."""
        latest: dict[int, Shard] = {}
        for line in list(self.lines):
            match = SHARD_RE.match(line)
            if match:
                shard = Shard(
                    int(match["shard"]),
                    int(match["worker"]),
                    int(match["pid"]),
                    match["host"],
                    int(match["port"]),
                )
                latest[shard.slot] = shard
                self._seen_pids.add(shard.pid)
        return latest

    def coordinator_pid(self) -> int:
        """The PID of the latest coordinator."""
        pids = [int(m["pid"]) for m in map(COORDINATOR_RE.match, list(self.lines)) if m]
        self._seen_pids.update(pids)
        if not pids:
            raise ClusterStartError(f"no coordinator line: {self.lines!r}")
        return pids[-1]

    async def wait_for_shard(self, slot: int, not_shard: int, timeout: float) -> Shard:
        """The shard of ``slot`` once it is no longer ``not_shard`` (TimeoutError)."""
        async with asyncio.timeout(timeout):
            while True:
                shard = self.shards().get(slot)
                if shard is not None and shard.shard != not_shard:
                    return shard
                await asyncio.sleep(0.01)

    async def wait_for_line(self, text: str, start: int, timeout: float) -> int:
        """The index of the first line equal to ``text`` from ``start`` on (TimeoutError)."""
        async with asyncio.timeout(timeout):
            while True:
                for index, line in enumerate(list(self.lines)[start:], start):
                    if line == text:
                        return index
                await asyncio.sleep(0.01)

    async def wait_for_coordinator(self, not_pid: int, timeout: float) -> int:
        """The PID of the coordinator that replaced ``not_pid`` (TimeoutError)."""
        async with asyncio.timeout(timeout):
            while (pid := self.coordinator_pid()) == not_pid:
                await asyncio.sleep(0.01)
        return pid

    # -- signals, by PID -----------------------------------------------------------

    def signal_supervisor(self, signum: int) -> None:
        if self._proc.poll() is None:
            os.kill(self.pid, signum)

    def stop(self) -> int | None:
        """SIGTERM the supervisor (SIGKILL after 5 s), then SIGKILL any child left."""
        self.shards()
        with contextlib.suppress(ClusterStartError):
            self.coordinator_pid()
        if self._proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self._proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self._proc.wait()
        deadline = time.monotonic() + STOP_TIMEOUT
        for pid in self._seen_pids:
            while runs_worker_or_coordinator(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if runs_worker_or_coordinator(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
                    os.kill(pid, signal.SIGKILL)
        return self._proc.returncode


def runs_worker_or_coordinator(pid: int) -> bool:
    """``pid`` is alive (not a zombie) and still runs a worker or coordinator."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] == "Z":
        return False
    return b"worker" in cmdline or b"coordinator" in cmdline
