"""Relays for benchmarks, as real processes on loopback: our cluster and tox-bootstrapd.

``start_cluster`` runs ``python -m cluster.cli start`` (port 0, UDP port 0, a fresh
key in ``workdir``) and reads the ready, listening, onion and shard lines from its
stdout. ``start_bootstrapd`` runs Debian's ``/usr/bin/tox-bootstrapd`` on free
ports. Both return a ``Target``; ``Target.stop()`` signals the process by its PID
(SIGTERM, then SIGKILL) and reaps it. Benchmarks only: the tests have their own
helpers, and neither imports the other.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nacl.bindings import crypto_scalarmult_base

HOST = "127.0.0.1"
BOOTSTRAPD = "/usr/bin/tox-bootstrapd"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]

_LISTEN = re.compile(r"^Listening on [^ ]*:(\d+)$")
_UDP = re.compile(r"^Onion and forwarding over UDP on .*:(\d+)$")
_SHARD = re.compile(r"^Shard (\d+) \(.*\) pid (\d+) direct address .*:(\d+)$")


@dataclass
class Target:
    """A running relay: where to reach it, its key, and its root process."""

    name: str
    port: int
    public_key: bytes
    pid: int
    workdir: Path
    udp_port: int | None = None
    shard_ports: list[int] = field(default_factory=list)  # --shard-ports, in shard order
    shard_pids: list[int] = field(default_factory=list)  # the workers' pids, same order
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def keys_file(self) -> Path:
        return self.workdir / "relay.keys"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """SIGTERM by PID, wait, SIGKILL by PID; reaps. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def write_keys(path: Path, secret_key: bytes) -> bytes:
    """``pk || sk`` (mode 0600), as both relays read it; the public key."""
    public_key = crypto_scalarmult_base(secret_key)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as keys:
        keys.write(public_key + secret_key)
    return public_key


def start_cluster(
    workdir: Path, workers: int, *, shard_ports: bool = False, config: str = ""
) -> Target:
    """``cluster start --workers N`` on 127.0.0.1, any free port; ``config`` is TOML."""
    workdir.mkdir(parents=True, exist_ok=True)
    public_key = write_keys(workdir / "relay.keys", os.urandom(32))
    args = [sys.executable, "-m", "cluster.cli", "start", "--host", HOST, "--port", "0"]
    args += ["--udp-port", "0", "--workers", str(workers), "--keys", "relay.keys"]
    args += ["--admin-socket", str(workdir / "admin.sock")]
    if shard_ports:
        args.append("--shard-ports")
    if config:
        (workdir / "relay.toml").write_text(config)
        args += ["--config", "relay.toml"]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with open(workdir / "relay.err", "wb") as err:
        proc = subprocess.Popen(
            args, cwd=workdir, stdout=subprocess.PIPE, stderr=err, env=env,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            lines.append(raw.decode(errors="replace").rstrip("\n"))
            if lines[-1].startswith("Relay ready"):
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(READY_TIMEOUT_S) or not any(x.startswith("Relay ready") for x in lines):
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        error = (workdir / "relay.err").read_text(errors="replace")[-2000:]
        raise RuntimeError(f"cluster did not start: stdout={lines!r} stderr={error}")
    target = Target(f"ours-{workers}w", 0, public_key, proc.pid, workdir, _proc=proc)
    shards: list[tuple[int, int, int]] = []
    for line in lines:
        if (match := _LISTEN.match(line)) and not target.port:
            target.port = int(match[1])
        elif match := _UDP.match(line):
            target.udp_port = int(match[1])
        elif match := _SHARD.match(line):
            shards.append((int(match[1]), int(match[3]), int(match[2])))
    target.shard_ports = [port for _, port, _ in sorted(shards)]
    target.shard_pids = [pid for _, _, pid in sorted(shards)]
    return target


def bootstrapd_available() -> bool:
    return os.access(BOOTSTRAPD, os.X_OK)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_bootstrapd(workdir: Path, attempts: int = 5) -> Target:
    """Debian's tox-bootstrapd as a TCP relay on free loopback ports (DHT isolated)."""
    if not bootstrapd_available():
        raise RuntimeError(f"{BOOTSTRAPD} not found (apt-get install toxcore-utils)")
    workdir.mkdir(parents=True, exist_ok=True)
    public_key = write_keys(workdir / "relay.keys", os.urandom(32))
    failures = []
    for _ in range(attempts):
        tcp_port, udp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
        (workdir / "relay.conf").write_text(
            f'port = {udp_port}\nkeys_file_path = "relay.keys"\n'
            'pid_file_path = "relay.pid"\nenable_ipv6 = false\n'
            "enable_ipv4_fallback = false\nenable_lan_discovery = false\n"
            f"enable_tcp_relay = true\ntcp_relay_ports = [{tcp_port}]\n"
            "enable_motd = false\nbootstrap_nodes = ()\n"
        )
        with open(workdir / "relay.out", "wb") as out:
            proc = subprocess.Popen(
                [BOOTSTRAPD, "--config=relay.conf", "--foreground", "--log-backend=stdout"],
                cwd=workdir, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        target = Target("bootstrapd", tcp_port, public_key, proc.pid, workdir, udp_port, _proc=proc)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and proc.poll() is None and not _accepts(tcp_port):
            time.sleep(0.05)
        if proc.poll() is None and _accepts(tcp_port):
            return target
        target.stop()
        failures.append((workdir / "relay.out").read_text(errors="replace")[-500:])
    raise RuntimeError(f"tox-bootstrapd did not start: {failures}")
