"""Start our relay (`cluster start`) as a real process on loopback for tests.

Binds port 0 (the kernel picks a free port, no collisions on shared machines),
waits for the ready line, reads the listening address from stdout, and stops
the process by its PID only.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

HOST = "127.0.0.1"
READY_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 5.0
TEST_VECTOR_SERVER_SK = bytes(range(0x40, 0x60))

_LISTEN_RE = re.compile(r"^Listening on (?:\[(?P<v6>[^\]]+)\]|(?P<v4>[^:]+)):(?P<port>\d+)$")
_UDP_RE = re.compile(r"^Onion and forwarding over UDP on .*:(?P<port>\d+)$")


@dataclass
class RelayProcess:
    host: str
    port: int
    ports: list[int]
    public_key: bytes
    secret_key: bytes
    pid: int
    workdir: Path
    udp_port: int | None = None  # onion / forwarding, None when off
    stdout_lines: list[str] = field(default_factory=list, repr=False)
    _proc: subprocess.Popen[str] | None = field(default=None, repr=False, compare=False)

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        """Signal by PID, wait up to 5 s, SIGKILL by PID if needed; exit code."""
        proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(self.pid, sig)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                proc.wait()
        self._proc = None
        return proc.returncode

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stderr_text(self) -> str:
        return (self.workdir / "relay.err").read_text(errors="replace")

    def status(self) -> dict:
        """What `cluster status --json` prints for this relay (the admin socket
        is in ``workdir``, the relay's working directory)."""
        result = subprocess.run(
            [sys.executable, "-m", "cluster.cli", "status", "--json"],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        return json.loads(result.stdout)


def write_keys(path: Path, secret_key: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as keys_file:
        keys_file.write(crypto_scalarmult_base(secret_key) + secret_key)


def start_relay(
    workdir: Path,
    secret_key: bytes = TEST_VECTOR_SERVER_SK,
    extra_args: Sequence[str] = (),
    config: str | None = None,
    ports: int = 1,
    workers: int = 2,
    allow_private_next_hops: bool = False,
) -> RelayProcess:
    """Run `cluster start --workers N` on 127.0.0.1 with ``ports`` kernel-chosen ports.

    ``allow_private_next_hops``: onion / forward requests may name next hops on
    loopback (the tests' stand-in DHT nodes); off by default, as in production."""
    if allow_private_next_hops:
        config = "allow_private_next_hops = true\n" + (config or "")
    workdir.mkdir(parents=True, exist_ok=True)
    keys = workdir / "relay.keys"
    write_keys(keys, secret_key)
    args = [sys.executable, "-m", "cluster.cli", "start", "--host", HOST, "--keys", str(keys)]
    args += ["--workers", str(workers), "--udp-port", "0"]  # never the shared 33445
    for _ in range(ports):
        args += ["--port", "0"]
    if config is not None:
        (workdir / "relay.toml").write_text(config)
        args += ["--config", str(workdir / "relay.toml")]
    args += list(extra_args)
    stderr = open(workdir / "relay.err", "w")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=stderr, text=True, cwd=workdir, bufsize=1
    )
    stderr.close()
    lines: list[str] = []
    ready = threading.Event()

    def read_stdout() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("Relay ready"):
                ready.set()
        ready.set()

    threading.Thread(target=read_stdout, daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            break
    if not any(line.startswith("Relay ready") for line in lines):
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        raise RuntimeError(
            f"relay did not become ready (exit {proc.returncode}); stdout={lines!r} "
            f"stderr={(workdir / 'relay.err').read_text()!r}"
        )
    listen_ports = []
    udp_port = None
    for line in lines:
        match = _LISTEN_RE.match(line)
        if match:
            listen_ports.append(int(match["port"]))
        match = _UDP_RE.match(line)
        if match:
            udp_port = int(match["port"])
    return RelayProcess(
        host=HOST,
        port=listen_ports[0],
        ports=listen_ports,
        public_key=crypto_scalarmult_base(secret_key),
        secret_key=secret_key,
        pid=proc.pid,
        workdir=workdir,
        udp_port=udp_port,
        stdout_lines=lines,
        _proc=proc,
    )


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[RelayProcess]:
    """Our relay, `cluster start`, with the test-vectors server key."""
    relay = start_relay(tmp_path / "relay")
    try:
        yield relay
    finally:
        relay.stop()
