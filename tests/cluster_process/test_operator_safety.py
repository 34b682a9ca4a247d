"""Operator mistakes (issue 10 finding 9, issue 14 points 5 and 6): each is a
clear one-line error before anything is served, loses no data, splits no
relay and leaves nothing behind. Real `cluster start` processes on loopback,
stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from testbed.relay_process import HOST, TEST_VECTOR_SERVER_SK, start_relay, write_keys

CLI = [sys.executable, "-m", "cluster.cli"]


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_command(workdir: Path, *args: str) -> list[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    keys = workdir / "relay.keys"
    if not keys.exists():
        write_keys(keys, TEST_VECTOR_SERVER_SK)
    return [*CLI, "start", "--host", HOST, "--keys", str(keys), *args]


def run_start(
    workdir: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """A `cluster start` expected to fail at once (killed by PID after 30 s)."""
    return subprocess.run(
        start_command(workdir, *args),
        capture_output=True,
        text=True,
        cwd=workdir,
        timeout=30,
        env=env,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The error line; asserts it is the only thing said and nothing was served."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    assert "Listening on" not in result.stdout, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("cluster: error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def tox_relay_dirs(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.iterdir() if p.name.startswith("tox-relay-"))


def test_admin_socket_on_the_keys_file_keeps_the_keys(tmp_path: Path) -> None:
    """`--admin-socket relay.keys` deleted the keys file (it unlinked whatever
    was there); only a stale socket may be replaced."""
    workdir = tmp_path / "relay"
    port = free_port()
    start_command(workdir)  # writes the keys file
    keys = workdir / "relay.keys"
    before = keys.read_bytes()
    result = run_start(workdir, "--port", str(port), "--udp-port", "0", "--admin-socket", str(keys))
    error = one_line_error(result)
    assert f"admin_socket: {keys} exists and is not a socket" in error
    assert keys.read_bytes() == before
    with socket.socket() as probe:  # nothing kept the port
        probe.bind((HOST, port))


def test_stale_admin_socket_is_replaced(tmp_path: Path) -> None:
    workdir = tmp_path / "relay"
    workdir.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(workdir / "relay-admin.sock"))
    stale.close()  # a socket file nobody answers on: a cluster that died
    relay = start_relay(workdir)
    try:
        assert relay.status()["workers"]
    finally:
        relay.stop()
    assert not (workdir / "relay-admin.sock").exists()


def test_second_cluster_on_the_same_port_is_refused(tmp_path: Path) -> None:
    """It joined the first through SO_REUSEPORT and took half its clients."""
    port = free_port()
    first = start_relay(tmp_path / "first", extra_args=["--port", str(port)], ports=0)
    try:
        assert first.ports == [port]
        result = run_start(tmp_path / "second", "--port", str(port), "--udp-port", "0")
        error = one_line_error(result)
        assert f"another cluster already serves TCP {HOST}:{port}" in error
        # Another user's lock directory (here: another TMPDIR) cannot see the
        # lock; the plain-bind probe still finds the listening workers.
        env = {**os.environ, "TMPDIR": str(tmp_path)}
        result = run_start(tmp_path / "third", "--port", str(port), "--udp-port", "0", env=env)
        error = one_line_error(result)
        assert f"cannot use TCP {HOST}:{port}: Address already in use" in error
        # The same UDP port with other TCP ports would share the onion replies.
        assert first.udp_port is not None
        result = run_start(tmp_path / "fourth", "--port", "0", "--udp-port", str(first.udp_port))
        error = one_line_error(result)
        assert f"UDP {HOST}:{first.udp_port}" in error
        assert first.running and first.status()["workers"]
    finally:
        first.stop()


def test_busy_udp_port_is_one_line(tmp_path: Path) -> None:
    """It was a worker traceback (issue 14 point 5)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind((HOST, 0))
        udp_port = holder.getsockname()[1]
        result = run_start(tmp_path / "relay", "--port", "0", "--udp-port", str(udp_port))
    error = one_line_error(result)
    assert f"cannot use UDP {HOST}:{udp_port}: Address already in use" in error


def test_busy_metrics_port_names_the_address_before_listening(tmp_path: Path) -> None:
    """It said only `[Errno 98] Address already in use`, after `Listening on`."""
    with socket.socket() as holder:
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_start(
            tmp_path / "relay", "--port", "0", "--udp-port", "0", "--metrics", f"{HOST}:{port}"
        )
    error = one_line_error(result)
    assert f"metrics: cannot listen on {HOST}:{port}: Address already in use" in error


def test_failed_port_reservation_leaves_no_runtime_directory(tmp_path: Path) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp)}
    with socket.socket() as holder:  # another program (tox-bootstrapd, say) on the port
        holder.bind((HOST, 0))
        holder.listen()
        port = holder.getsockname()[1]
        result = run_start(tmp_path / "relay", "--port", str(port), "--udp-port", "0", env=env)
    assert f"{port}" in one_line_error(result)
    # Only the per-user lock directory remains: no runtime directory.
    assert tox_relay_dirs(tmp) == [f"tox-relay-locks-{os.getuid()}"]


def children_of(pid: int) -> set[int]:
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found.update(int(child) for child in text)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.parametrize("how", ["SIGTERM to the supervisor", "Ctrl-C to the process group"])
def test_stop_during_start_up_is_prompt_and_clean(tmp_path: Path, how: str) -> None:
    """Issue 14 point 6: with many workers SIGTERM was ignored until start-up
    ended (~85 s with 500), then a traceback and sockets left behind; a
    terminal's Ctrl-C also hit the children still importing (tracebacks)."""
    workdir = tmp_path / "relay"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp)}
    proc = subprocess.Popen(
        start_command(workdir, "--port", str(port), "--udp-port", "0", "--workers", "40"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
        env=env,
        start_new_session=True,  # a process group of its own, like a shell job
    )
    try:
        deadline = time.monotonic() + 20
        seen: set[int] = set()
        while len(seen) < 3 and time.monotonic() < deadline:  # coordinator + workers starting
            seen |= children_of(proc.pid)
            time.sleep(0.02)
        assert len(seen) >= 3, "start-up never began"
        assert proc.poll() is None
        if how.startswith("SIGTERM"):
            os.kill(proc.pid, signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)  # the group we started, as a terminal does
        started = time.monotonic()
        stdout, stderr = proc.communicate(timeout=15)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"{how} during start-up: stopped in {took:.2f} s")
    assert took < 5, f"stop took {took:.1f} s"
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr and "RuntimeError" not in stderr, stderr
    assert "Relay ready" not in stdout
    if 4 * (os.cpu_count() or 1) < 40:
        assert "workers = 40 on" in stderr  # the too-many-workers warning
    seen |= children_of(proc.pid) if alive(proc.pid) else set()
    assert not [child for child in seen if alive(child)]
    assert tox_relay_dirs(tmp) == [f"tox-relay-locks-{os.getuid()}"]  # runtime dir removed
    assert not (workdir / "relay-admin.sock").exists()
    assert port not in listening_tcp_ports()  # the port was released


def listening_tcp_ports() -> set[int]:
    """Local ports of every TCP socket in LISTEN state on this host (a bind
    probe would also fail on a port some unrelated client happens to use as
    its ephemeral port, which a busy machine does)."""
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if fields[3] == "0A":  # TCP_LISTEN
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def test_sighup_during_start_up_is_ignored_not_fatal(tmp_path: Path) -> None:
    """SIGHUP's default action kills the process: during start-up it must not."""
    workdir = tmp_path / "relay"
    proc = subprocess.Popen(
        start_command(workdir, "--port", "0", "--udp-port", "0", "--workers", "6"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=workdir,
    )
    try:
        deadline = time.monotonic() + 20
        while not children_of(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGHUP)
        assert proc.stdout is not None
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Relay ready"):
                break
        assert lines and lines[-1].startswith("Relay ready"), lines
        os.kill(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0
    assert "SIGHUP ignored: the cluster is still starting" in stderr
