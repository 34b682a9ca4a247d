"""The `cluster` command as a user runs it: real processes, stopped by PID."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.client import RelayClient
from cluster.keys import load_keys
from testbed.relay_process import start_relay

CLI = [sys.executable, "-m", "cluster.cli"]


def cluster(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, cwd=cwd, timeout=30)


def test_help_explains_each_command() -> None:
    result = cluster("--help")
    assert result.returncode == 0
    for command in ("keygen", "pubkey", "start"):
        assert command in result.stdout
    start_help = cluster("start", "--help").stdout
    for flag in ("--config", "--keys", "--host", "--port", "--workers"):
        assert flag in start_help


def test_keygen_then_pubkey(tmp_path: Path) -> None:
    keys = tmp_path / "id.keys"
    made = cluster("keygen", "--keys", str(keys))
    assert made.returncode == 0, made.stderr
    printed = made.stdout.strip()
    assert len(printed) == 64 and printed == printed.upper()
    assert bytes.fromhex(printed) == load_keys(keys).public_key
    shown = cluster("pubkey", "--keys", str(keys))
    assert shown.returncode == 0 and shown.stdout.strip() == printed
    again = cluster("keygen", "--keys", str(keys))
    assert again.returncode != 0 and "already exists" in again.stderr


def test_pubkey_refuses_a_world_readable_file(tmp_path: Path) -> None:
    keys = tmp_path / "id.keys"
    cluster("keygen", "--keys", str(keys))
    keys.chmod(0o644)
    result = cluster("pubkey", "--keys", str(keys))
    assert result.returncode != 0
    assert "readable by group or others" in result.stderr


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_bad_config_exits_before_binding(tmp_path: Path) -> None:
    port = free_port()
    config = tmp_path / "bad.toml"
    config.write_text(f'host = "127.0.0.1"\nports = [{port}]\nmax_unconfirmed = "many"\n')
    result = cluster("start", "--config", str(config), cwd=tmp_path)
    assert result.returncode != 0
    assert "max_unconfirmed: expected an integer" in result.stderr
    assert port_is_free(port)
    assert not (tmp_path / "relay.keys").exists()  # nothing was created either


def test_start_creates_keys_and_reports_addresses(tmp_path: Path) -> None:
    relay = start_relay(tmp_path / "relay", ports=2)
    try:
        assert relay.stdout_lines[0] == f"Public Key: {relay.public_key.hex().upper()}"
        assert len(relay.ports) == 2 and all(relay.ports)

        async def handshake(port: int) -> None:
            client = await RelayClient.connect(relay.host, port, relay.public_key)
            await client.ping()
            await client.close()

        import asyncio

        for port in relay.ports:
            asyncio.run(handshake(port))
    finally:
        relay.stop()


def test_start_generates_a_missing_keys_file_0600(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [*CLI, "start", "--host", "127.0.0.1", "--port", "0", "--udp-port", "0"],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        keys = tmp_path / "relay.keys"
        assert oct(keys.stat().st_mode & 0o777) == oct(0o600)
        assert first.strip() == f"Public Key: {load_keys(keys).public_key_hex}"
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_within_5_seconds(tmp_path: Path, signum: int) -> None:
    relay = start_relay(tmp_path / "relay")

    async def connect_some() -> list[RelayClient]:
        return [
            await RelayClient.connect(relay.host, relay.port, relay.public_key) for _ in range(20)
        ]

    import asyncio

    loop = asyncio.new_event_loop()
    try:
        clients = loop.run_until_complete(connect_some())
        started = time.monotonic()
        code = relay.stop(signum)
        assert time.monotonic() - started < 5
        assert code == 0
        loop.run_until_complete(asyncio.sleep(0.1))
        assert all(client.closed.done() for client in clients)
    finally:
        loop.close()
