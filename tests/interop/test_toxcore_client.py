"""A real toxcore 0.2.18 client (Debian's libtoxcore, public tox.h API via ctypes)
against our relay, and against tox-bootstrapd 0.2.18 for comparison.

What a toxcore client does on a TCP relay (tcp-relay-protocol.md §14): it presents
its DHT public key, its first frame is a PING, and it answers the server's pings.
With no friends and no DHT nodes (UDP off) it sends nothing else, so the bytes on
its socket are exactly: 128 (hello) + 27 (PING frame) out, 96 (server reply) +
27 (PONG frame) in.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from relaycore.options import RelayOptions
from relaycore.relay import RelayServer
from testbed.bootstrapd import ReferenceRelay
from testbed.toxcore import (
    ToxLoop,
    load_toxcore,
    tcp_byte_counts,
    tcp_sockets_to,
    toxcore_error,
)
from tests.support.inprocess import live_relay, wait_for

# A PING/PONG frame: 2-byte length + 16-byte MAC + 1-byte type + 8-byte ping id.
PING_FRAME = 2 + 16 + 1 + 8
CLIENT_HELLO = 128
SERVER_REPLY = 96
#: (bytes sent, bytes received) on the client's socket once the handshake and the
#: client's first PING/PONG are done, and before any server ping.
HANDSHAKE_AND_FIRST_PING = (CLIENT_HELLO + PING_FRAME, SERVER_REPLY + PING_FRAME)

# Short server ping timers: a ping every 1.2 s, answer due within 0.8 s. The timeout
# must be below the interval, or a new ping would always come first and reset it.
FAST_PINGS = RelayOptions(ping_interval=1.2, ping_timeout=0.8)
PING_ROUNDS = 4
CONFIRM_TIMEOUT_S = 10.0
CLOSE_NOTICED_S = 1.0


@pytest.fixture(autouse=True)
def _toxcore_installed() -> None:
    if load_toxcore() is None:
        reason = f"libtoxcore not loadable ({toxcore_error()}); apt-get install libtoxcore2"
        if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
            pytest.fail(f"{reason}; required when CI is set")
        pytest.skip(reason)


def _packets_in(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.startswith("packets_in.") and v}


def _context(client: ToxLoop, server: RelayServer) -> str:
    logs = "\n".join(client.log_lines[-20:])
    return f"stats={dict(server.stats)!r} toxcore log:\n{logs}"


def test_toxcore_client_is_confirmed_answers_pings_and_its_close_is_seen() -> None:
    async def scenario() -> None:
        async with live_relay(FAST_PINGS) as relay:
            server = relay.shard.server
            with ToxLoop(relay.host, relay.port, relay.public_key, max_seconds=20.0) as client:
                dht_key = await asyncio.to_thread(client.wait_started)

                # (1) CONFIRMED under exactly its DHT key; its first frame was a PING.
                await wait_for(lambda: dht_key in server.by_key, CONFIRM_TIMEOUT_S)
                assert _packets_in(server.stats) == {"packets_in.ping": 1}, _context(client, server)
                assert list(server.by_key) == [dht_key]
                connection = server.by_key[dht_key]
                identifier = connection.identifier

                # (2) Several server pings later: every one answered, same connection.
                await wait_for(
                    lambda: (
                        server.stats["packets_in.pong"] >= PING_ROUNDS
                        or dht_key not in server.by_key
                    ),
                    PING_ROUNDS * FAST_PINGS.ping_interval + 3.0,
                )
                assert server.stats["closed.R-PING-4"] == 0, _context(client, server)
                assert server.by_key.get(dht_key) is connection, _context(client, server)
                assert connection.identifier == identifier
                assert server.stats["accepted"] == 1
                assert server.stats["confirmed"] == 1
                assert server.stats["packets_in.pong"] >= PING_ROUNDS
                assert server.stats["packets_in.ping"] == 1  # the client pings every 30 s
                sockets = tcp_sockets_to(relay.port)
                assert [s.state for s in sockets] == ["ESTABLISHED"], sockets

                # (3) tox_kill closes the socket; the relay drops the key at once.
                async def key_gone_at() -> float:
                    deadline = time.monotonic() + 5.0
                    while dht_key in server.by_key and time.monotonic() < deadline:
                        await asyncio.sleep(0.001)
                    return time.monotonic()

                watcher = asyncio.create_task(key_gone_at())
                killed_at = await asyncio.to_thread(client.stop)
                gone_at = await watcher
            assert dht_key not in server.by_key
            assert gone_at - killed_at < CLOSE_NOTICED_S
            assert server.stats["closed.R-KILL-4"] == 1, dict(server.stats)
            assert server.stats["closed.R-PING-4"] == 0

    asyncio.run(scenario())


def test_toxcore_client_that_stops_answering_is_killed_by_ping_timeout() -> None:
    """Negative control for the test above: the PONG count is what keeps it alive."""

    async def scenario() -> None:
        async with live_relay(FAST_PINGS) as relay:
            server = relay.shard.server
            with ToxLoop(relay.host, relay.port, relay.public_key, max_seconds=15.0) as client:
                dht_key = await asyncio.to_thread(client.wait_started)
                await wait_for(lambda: dht_key in server.by_key, CONFIRM_TIMEOUT_S)
                client.pause(FAST_PINGS.ping_interval + FAST_PINGS.ping_timeout + 1.0)
                await wait_for(
                    lambda: server.stats["closed.R-PING-4"] == 1,
                    FAST_PINGS.ping_interval + FAST_PINGS.ping_timeout + 2.0,
                )
                assert dht_key not in server.by_key
                assert server.stats["packets_in.pong"] == 0

    asyncio.run(scenario())


def _observe_client_socket(
    host: str, port: int, public_key: bytes, hold_s: float = 1.5
) -> tuple[tuple[int, int], list[str]]:
    """Run a toxcore client against one relay; once its socket carried the handshake
    and first PING/PONG, keep watching it for ``hold_s``. Returns the final byte
    counts and problems seen (socket replaced, not ESTABLISHED, counts changed)."""
    problems: list[str] = []
    with ToxLoop(host, port, public_key, max_seconds=15.0) as client:
        client.wait_started()
        deadline = time.monotonic() + CONFIRM_TIMEOUT_S
        first = None
        while time.monotonic() < deadline:
            sockets = tcp_sockets_to(port)
            if len(sockets) == 1:
                counts = tcp_byte_counts(sockets[0].inode)
                if counts is None:
                    pytest.skip("this kernel's TCP_INFO lacks tcpi_bytes_sent (Linux < 5.5)")
                if counts == HANDSHAKE_AND_FIRST_PING:
                    first = (sockets[0], counts)
                    break
            time.sleep(0.02)
        if first is None:
            sockets = tcp_sockets_to(port)
            counts = [tcp_byte_counts(s.inode) for s in sockets]
            return (0, 0), [f"no completed handshake within the deadline: {sockets} {counts}"]
        sock, counts = first
        hold_until = time.monotonic() + hold_s
        while time.monotonic() < hold_until:
            time.sleep(0.1)
            sockets = tcp_sockets_to(port)
            if [(s.inode, s.state) for s in sockets] != [(sock.inode, "ESTABLISHED")]:
                problems.append(f"socket changed: {sockets}")
                break
            now_counts = tcp_byte_counts(sock.inode)
            if now_counts != counts:
                problems.append(f"unexpected traffic: {counts} -> {now_counts}")
                break
        return counts, problems


@pytest.mark.reference
def test_toxcore_client_exchanges_the_same_bytes_with_bootstrapd_and_our_relay(
    reference_relay: ReferenceRelay,
) -> None:
    reference = _observe_client_socket(
        reference_relay.host, reference_relay.port, reference_relay.public_key
    )

    async def ours() -> tuple[tuple[int, int], list[str]]:
        async with live_relay() as relay:
            return await asyncio.to_thread(
                _observe_client_socket, relay.host, relay.port, relay.public_key
            )

    our = asyncio.run(ours())
    assert reference == (HANDSHAKE_AND_FIRST_PING, []), reference
    assert our == reference
