"""Process-level pieces of the worker: listeners and the open-file limit."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys

from runtime.sockets import open_listening_socket
from worker.process import ListenSpec, bind_listeners, format_address


def test_listeners_share_a_port_with_so_reuseport() -> None:
    """Several shards bind the same port: each listener has SO_REUSEPORT set."""
    first = open_listening_socket("127.0.0.1", 0, 16)
    try:
        port = first.getsockname()[1]
        assert first.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        second = open_listening_socket("127.0.0.1", port, 16)
        assert second.getsockname()[1] == port
        second.close()
    finally:
        first.close()


def test_a_port_that_cannot_be_bound_is_named_and_nothing_stays_bound() -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))  # bound without SO_REUSEPORT: nobody can share it
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        try:
            bind_listeners(ListenSpec("127.0.0.1", [0, port], 16))
        except OSError as error:
            assert f"port {port}" in str(error)
        else:
            raise AssertionError("binding a taken port succeeded")
    finally:
        blocker.close()


def test_format_address() -> None:
    sock = open_listening_socket("127.0.0.1", 0, 4)
    try:
        assert format_address(sock) == f"127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def test_open_file_limit_is_raised_to_the_hard_limit() -> None:
    """Run in a child whose soft limit starts low; it must end at the hard limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    code = (
        "import resource, logging\n"
        "from worker.process import raise_open_file_limit\n"
        "logging.basicConfig()\n"
        f"resource.setrlimit(resource.RLIMIT_NOFILE, (256, {hard}))\n"
        "print(raise_open_file_limit(10**9))\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True
    )
    reported, actual = (int(line) for line in result.stdout.split())
    expected = hard if hard != resource.RLIM_INFINITY else reported
    assert reported == actual == expected
    assert actual > 256
    assert "open-file limit is" in result.stderr  # below the (huge) minimum: a warning


def test_configured_backlog_survives_create_server() -> None:
    """asyncio's create_server(sock=...) listens again; the shard must pass the
    configured backlog or the kernel queue shrinks to 100 (found by loadtest)."""
    import asyncio

    from relaycore.options import RelayOptions
    from worker.shard import Shard

    async def scenario() -> int:
        sock = open_listening_socket("127.0.0.1", 0, 16)
        port = sock.getsockname()[1]
        shard = Shard(bytes(32), RelayOptions(), asyncio.get_running_loop())
        await shard.serve([sock], backlog=777)
        try:
            listing = subprocess.run(
                ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, check=True
            ).stdout.split()
            return int(listing[2])  # Send-Q of a listener = its backlog
        finally:
            await shard.stop()

    assert asyncio.run(scenario()) == 777
