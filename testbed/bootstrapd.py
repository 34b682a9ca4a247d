"""Start Debian's ``tox-bootstrapd`` (toxcore 0.2.18) on loopback for differential tests.

This module owns everything about running the *reference* TCP relay: writing its
``relay.conf`` and keys file into a scratch directory, choosing free ports (with
retries, because ports in the ephemeral range can be taken by other processes'
connections between our check and the daemon's ``bind``), waiting for readiness,
reading back the real UDP DHT port (the daemon silently moves it up to +100 when
busy) and stopping the daemon again by PID only.

See /work/shared/spec/tox-bootstrapd-reference.md for the daemon's behaviour.

Public API:

* :class:`ReferenceRelay` - a running daemon (address, ports, key pair, pid, workdir).
* :class:`DhtNode` - where a daemon's UDP DHT side can be reached (for ``bootstrap_nodes``
  and ``tox_bootstrap``).
* :func:`bootstrapd_available` - whether the binary is installed.
* :func:`start_bootstrapd` - start one daemon in ``workdir``; optionally as a pure DHT
  node (``tcp_relay=False``) that bootstraps off other nodes (``bootstrap_nodes``).
* :func:`reference_relay` - pytest fixture: a daemon with the test-vectors server key
  (bytes 0x40..0x5f). Import it into a ``conftest.py`` to use it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

BOOTSTRAPD_PATH = "/usr/bin/tox-bootstrapd"
HOST = "127.0.0.1"

#: Server secret key of test-vectors.md (SERVER_SK = bytes 0x40..0x5f).
TEST_VECTOR_SERVER_SK = bytes(range(0x40, 0x60))

CONF_NAME = "relay.conf"
KEYS_NAME = "relay.keys"
STDOUT_NAME = "relay.out"
STDERR_NAME = "relay.err"

READY_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
_POLL_S = 0.02

_PUBLIC_KEY_RE = re.compile(rb"Public Key: ([0-9A-Fa-f]{64})")
_FAILURE_MARKERS = (b"Couldn't initialize", b"Couldn't read")

# Relays started by this process and not stopped yet; stopped at interpreter exit.
_LIVE: dict[int, ReferenceRelay] = {}


@dataclass(frozen=True)
class DhtNode:
    """A DHT node's UDP address and DHT public key."""

    host: str
    port: int
    public_key: bytes


@dataclass
class ReferenceRelay:
    """A running ``tox-bootstrapd`` acting as the reference TCP relay (``port`` is
    its TCP relay port; 0 for a daemon started with ``tcp_relay=False``)."""

    host: str
    port: int
    udp_port: int
    public_key: bytes
    secret_key: bytes
    pid: int
    workdir: Path
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False, compare=False)
    ports: list[int] = field(default_factory=list)  # every TCP relay port; port == ports[0]

    def stop(self) -> None:
        """SIGTERM by PID, wait up to 5 s, then SIGKILL by PID. Idempotent.

        The ``Popen`` object is kept until the child is reaped, so the PID cannot
        have been recycled for another process while we signal it.
        """
        proc = self._proc
        if proc is None:
            return
        try:
            _terminate(proc)
        finally:
            self._proc = None
            _LIVE.pop(id(self), None)

    @property
    def dht_node(self) -> DhtNode:
        """Its UDP side as a DHT node (what other nodes and clients bootstrap off)."""
        return DhtNode(self.host, self.udp_port, self.public_key)

    @property
    def running(self) -> bool:
        """True while the daemon process is alive (and not stopped by us)."""
        return self._proc is not None and self._proc.poll() is None

    def stdout_text(self) -> str:
        """The daemon's stdout log so far (info messages)."""
        return _read(self.workdir / STDOUT_NAME).decode(errors="replace")

    def stderr_text(self) -> str:
        """The daemon's stderr log so far (warnings and errors)."""
        return _read(self.workdir / STDERR_NAME).decode(errors="replace")


def bootstrapd_available() -> bool:
    """Whether ``/usr/bin/tox-bootstrapd`` is installed and executable."""
    return os.path.exists(BOOTSTRAPD_PATH) and shutil.which(BOOTSTRAPD_PATH) is not None


def start_bootstrapd(
    workdir: Path,
    secret_key: bytes | None = None,
    attempts: int = 8,
    *,
    tcp_relay: bool = True,
    bootstrap_nodes: Sequence[DhtNode] = (),
    tcp_ports: int = 1,
    binary: str = BOOTSTRAPD_PATH,
    motd: str | None = None,
) -> ReferenceRelay:
    """Start ``tox-bootstrapd`` in ``workdir`` (created if missing) on free loopback ports.

    ``secret_key`` is the relay's 32-byte DHT/TCP secret key; a random one is
    generated when omitted (the key is always known to the caller).
    ``tcp_relay=False`` starts a DHT node without a TCP relay (``port`` is then 0);
    ``bootstrap_nodes`` are the DHT nodes it joins at start (none: its DHT stays
    idle, but its UDP port still serves onion hops and forwarding). ``tcp_ports`` > 1
    makes the relay listen on that many ports (``ports``; one key, one relay). ``binary``
    is the daemon to run (Debian's 0.2.18 by default; ``tests/support/toxcore0223.py``
    builds 0.2.23, which reads the same configuration). ``motd`` switches on its answer
    to bootstrap-info requests (0xF0) with that message. Each failed
    attempt (process exit, "Couldn't initialize", or no readiness within ~5 s) is
    killed by PID and retried with new ports; after ``attempts`` failures a
    ``RuntimeError`` carrying the daemon's stdout/stderr is raised.
    """
    if not os.access(binary, os.X_OK):
        raise RuntimeError(f"{binary} not found (apt-get install toxcore-utils)")
    if attempts < 1:
        raise ValueError("attempts must be >= 1")
    if secret_key is None:
        secret_key = os.urandom(32)
    if len(secret_key) != 32:
        raise ValueError("secret_key must be 32 bytes")
    public_key = crypto_scalarmult_base(secret_key)

    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    _write_keys(workdir / KEYS_NAME, public_key, secret_key)

    failures: list[str] = []
    for attempt in range(1, attempts + 1):
        tcp_port_list, udp_port = _pick_ports(tcp_ports if tcp_relay else 0)
        (workdir / CONF_NAME).write_text(
            _config_text(udp_port, tcp_port_list, bootstrap_nodes, motd)
        )
        relay, error = _try_start(binary, workdir, tcp_port_list, public_key, secret_key)
        if relay is not None:
            return relay
        failures.append(f"--- attempt {attempt} (tcp {tcp_port_list}, udp {udp_port}): {error}")
    raise RuntimeError(
        f"tox-bootstrapd failed to start after {attempts} attempts in {workdir}:\n"
        + "\n".join(failures)
    )


@pytest.fixture
def reference_relay(tmp_path: Path) -> Iterator[ReferenceRelay]:
    """A started reference relay with the test-vectors server key; stopped afterwards.

    Fails (rather than skips) when the binary is missing and ``$CI`` is set.
    """
    if not bootstrapd_available():
        reason = f"{BOOTSTRAPD_PATH} not installed (apt-get install toxcore-utils)"
        if _in_ci():
            pytest.fail(f"{reason}; required when CI is set")
        pytest.skip(reason)
    relay = start_bootstrapd(tmp_path / "reference-relay", TEST_VECTOR_SERVER_SK)
    try:
        yield relay
    finally:
        relay.stop()


# ---------------------------------------------------------------------------
# internals
# ---------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _config_text(
    udp_port: int,
    tcp_ports: Sequence[int],
    bootstrap_nodes: Sequence[DhtNode] = (),
    motd: str | None = None,
) -> str:
    """libconfig text; no ``tcp_ports`` switches the TCP relay off."""
    port_list = ", ".join(str(port) for port in tcp_ports)
    tcp = f"enable_tcp_relay = true\ntcp_relay_ports = [{port_list}]\n"
    if not tcp_ports:
        tcp = "enable_tcp_relay = false\n"
    nodes = ",\n".join(
        f'  {{ address = "{node.host}"; port = {node.port}; '
        f'public_key = "{node.public_key.hex().upper()}"; }}'
        for node in bootstrap_nodes
    )
    return (
        f"port = {udp_port}\n"
        f'keys_file_path = "{KEYS_NAME}"\n'
        'pid_file_path = "relay.pid"\n'
        "enable_ipv6 = false\n"
        "enable_ipv4_fallback = false\n"
        "enable_lan_discovery = false\n"
        f"{tcp}"
        + ("enable_motd = false\n" if motd is None else f'enable_motd = true\nmotd = "{motd}"\n')
        + f"bootstrap_nodes = ({nodes and chr(10) + nodes + chr(10)})\n"
    )


def _write_keys(path: Path, public_key: bytes, secret_key: bytes) -> None:
    """Write ``pk || sk`` (64 bytes) with mode 0600, replacing any existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, public_key + secret_key)
    finally:
        os.close(fd)


def _ports_in_use() -> set[int]:
    """Local port numbers of every TCP/UDP socket ``ss -tanu`` lists (incl. TIME-WAIT)."""
    if shutil.which("ss") is None:
        return set()
    try:
        out = subprocess.run(
            ["ss", "-tanuH"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    ports: set[int] = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 5:
            _, _, port = cols[4].rpartition(":")
            if port.isdigit():
                ports.add(int(port))
    return ports


def _free_port(kind: int, busy: set[int]) -> int:
    """A port the kernel hands out for ``bind(127.0.0.1:0)``, also bindable on 0.0.0.0."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, kind) as s:
            s.bind((HOST, 0))
            port: int = s.getsockname()[1]
        if port in busy:
            continue
        try:
            with socket.socket(socket.AF_INET, kind) as s:
                s.bind(("0.0.0.0", port))
        except OSError:
            continue
        return port
    raise RuntimeError("could not find a free port")


def _pick_ports(tcp_count: int = 1) -> tuple[list[int], int]:
    busy = _ports_in_use()
    tcp_ports = []
    for _ in range(tcp_count):
        tcp_ports.append(_free_port(socket.SOCK_STREAM, busy))
        busy.add(tcp_ports[-1])
    udp_port = _free_port(socket.SOCK_DGRAM, busy)
    return tcp_ports, udp_port


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


def _logs(workdir: Path) -> str:
    out = _read(workdir / STDOUT_NAME).decode(errors="replace")
    err = _read(workdir / STDERR_NAME).decode(errors="replace")
    return f"\n[stdout]\n{out.rstrip()}\n[stderr]\n{err.rstrip()}"


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM, wait up to STOP_TIMEOUT_S, SIGKILL; always reaps. Signals by PID only."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
    proc.wait()


def _tcp_accepts(port: int, deadline: float) -> bool:
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_S)


def _udp_port_of(pid: int) -> int | None:
    """The local port of the (single) UDP socket owned by ``pid``, via /proc, else ``ss``."""
    inodes: set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:
        pass
    if inodes:
        for table in ("udp", "udp6"):
            try:
                lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
            except OSError:
                continue
            for line in lines:
                cols = line.split()
                if len(cols) > 9 and cols[9] in inodes:
                    return int(cols[1].rpartition(":")[2], 16)
    if shutil.which("ss") is not None:
        try:
            out = subprocess.run(
                ["ss", "-lunpH"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            if f"pid={pid}," in line:
                cols = line.split()
                port = cols[3].rpartition(":")[2] if len(cols) > 3 else ""
                if port.isdigit():
                    return int(port)
    return None


def _try_start(
    binary: str, workdir: Path, tcp_ports: list[int], public_key: bytes, secret_key: bytes
) -> tuple[ReferenceRelay | None, str]:
    """One start attempt; returns (relay, "") or (None, reason-with-logs)."""
    out_path, err_path = workdir / STDOUT_NAME, workdir / STDERR_NAME
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen(
            [
                binary,
                f"--config={CONF_NAME}",
                "--foreground",
                "--log-backend=stdout",
            ],
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,  # keep terminal Ctrl-C away; we stop it ourselves
        )
    deadline = time.monotonic() + READY_TIMEOUT_S
    reason = ""
    try:
        match = None
        while True:
            text = _read(out_path)
            match = _PUBLIC_KEY_RE.search(text)
            if match:
                break
            if proc.poll() is not None:
                reason = f"exited with code {proc.returncode}"
                break
            if any(m in text or m in _read(err_path) for m in _FAILURE_MARKERS):
                reason = "reported an initialization failure"
                break
            if time.monotonic() >= deadline:
                reason = f"no 'Public Key:' line within {READY_TIMEOUT_S:.0f} s"
                break
            time.sleep(_POLL_S)
        if match:
            printed = bytes.fromhex(match.group(1).decode())
            if printed != public_key:
                reason = f"printed public key {printed.hex()} != expected {public_key.hex()}"
            elif refused := [port for port in tcp_ports if not _tcp_accepts(port, deadline)]:
                reason = f"TCP port(s) {refused} do not accept connections"
            elif proc.poll() is not None:
                reason = f"exited with code {proc.returncode}"
            else:
                udp_port = _udp_port_of(proc.pid)
                if udp_port is None:
                    reason = "could not determine its UDP port"
                else:
                    relay = ReferenceRelay(
                        host=HOST,
                        port=tcp_ports[0] if tcp_ports else 0,
                        ports=list(tcp_ports),
                        udp_port=udp_port,
                        public_key=public_key,
                        secret_key=secret_key,
                        pid=proc.pid,
                        workdir=workdir,
                        _proc=proc,
                    )
                    _LIVE[id(relay)] = relay
                    return relay, ""
    except BaseException:
        _terminate(proc)
        raise
    _terminate(proc)
    return None, reason + _logs(workdir)


@atexit.register
def _stop_leftovers() -> None:
    for relay in list(_LIVE.values()):
        relay.stop()
