"""The worker shard over real loopback sockets: the documented improvements
over tox-bootstrapd 0.2.18 (docs/differences.md) and isolation of bad clients."""

from __future__ import annotations

import asyncio
import os

import pytest
import uvloop

from cluster.client import ConnectionClosed, RelayClient
from relaycore.client import ClientConnection
from relaycore.options import RelayOptions
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    Ping,
    RoutedData,
    RoutingResponse,
)
from relaycore.relay import ConnectionState
from tests.support.inprocess import live_relay, wait_for


def run(coro):  # type: ignore[no-untyped-def]
    return uvloop.run(asyncio.wait_for(coro, 30))


async def linked_pair(relay) -> tuple[RelayClient, RelayClient]:  # type: ignore[no-untyped-def]
    a, b = await relay.client(), await relay.client()
    a.route_request(b.public_key)
    assert (await a.expect(RoutingResponse)).connection_id == 16
    b.route_request(a.public_key)
    assert (await b.expect(RoutingResponse)).connection_id == 16
    await b.expect(ConnectNotification)
    await a.expect(ConnectNotification)
    return a, b


def test_closed_socket_noticed_at_once_r_kill_4() -> None:
    """R-KILL-4 (improvement, close_on_peer_eof): the peer is notified at once."""

    async def scenario() -> None:
        async with live_relay() as relay:
            a, b = await linked_pair(relay)
            started = asyncio.get_running_loop().time()
            await a.close()
            assert await b.expect(DisconnectNotification, timeout=2) == DisconnectNotification(16)
            assert asyncio.get_running_loop().time() - started < 1.0
            assert a.public_key not in relay.shard.server.by_key

    run(scenario())


def test_closed_socket_kept_until_ping_timeout_when_disabled() -> None:
    """R-KILL-4 with close_on_peer_eof=false: 0.2.18 behaviour, the ping timeout ends it."""

    async def scenario() -> None:
        options = RelayOptions(close_on_peer_eof=False, ping_interval=0.3, ping_timeout=0.2)
        async with live_relay(options) as relay:
            a, b = await linked_pair(relay)
            await a.close()
            with pytest.raises(TimeoutError):
                await b.next_event(timeout=0.2)
            assert a.public_key in relay.shard.server.by_key
            event = await b.next_event(timeout=3)
            while isinstance(event, Ping):
                event = await b.next_event(timeout=3)
            assert event == DisconnectNotification(16)
            assert a.public_key not in relay.shard.server.by_key

    run(scenario())


def test_handshake_timeout_closes_silent_and_unconfirmed_sockets() -> None:
    """Improvement over R-TIME-2: INCOMING and UNCONFIRMED sockets are closed
    after handshake_timeout; confirmed ones are not."""

    async def scenario() -> None:
        async with live_relay(RelayOptions(handshake_timeout=0.3)) as relay:
            silent_reader, silent_writer = await relay.raw_socket()
            half = await relay.client(confirm=False)  # replied to, never confirmed
            good = await relay.client()
            assert await silent_reader.read() == b""  # closed by the relay
            await asyncio.wait_for(asyncio.shield(half.closed), 2)
            assert not good.closed.done()
            await good.ping()
            silent_writer.close()

    run(scenario())


def test_handshake_timeout_zero_disables_it() -> None:
    async def scenario() -> None:
        async with live_relay(RelayOptions(handshake_timeout=0)) as relay:
            reader, writer = await relay.raw_socket()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(reader.read(), 0.5)
            writer.close()

    run(scenario())


def test_max_connections_per_ip_refuses_only_that_address() -> None:
    async def scenario() -> None:
        async with live_relay(RelayOptions(max_connections_per_ip=2)) as relay:
            first = await relay.client(local_addr=("127.0.0.2", 0))
            await relay.client(local_addr=("127.0.0.2", 0))
            with pytest.raises(ConnectionClosed):
                await relay.client(local_addr=("127.0.0.2", 0))
            other = await relay.client(local_addr=("127.0.0.3", 0))  # another address is fine
            await other.ping()
            await first.close()
            await wait_for(lambda: relay.shard.server.connections_per_ip["127.0.0.2"] == 1)
            await relay.client(local_addr=("127.0.0.2", 0))  # room again

    run(scenario())


def test_max_connections_refuses_beyond_the_limit() -> None:
    async def scenario() -> None:
        async with live_relay(RelayOptions(max_connections=3)) as relay:
            clients = [await relay.client() for _ in range(3)]
            with pytest.raises(ConnectionClosed):
                await relay.client()
            assert relay.shard.server.stats["refused.max_connections"] == 1
            for client in clients:
                await client.ping()

    run(scenario())


def test_unconfirmed_cap_evicts_the_flooders_oldest_and_lets_newcomers_in() -> None:
    """Issue 10 #6 over real sockets: at the cap a bare socket of the address
    holding the most handshakes is closed, an honest newcomer from another
    address connects; one address over its own cap is refused on accept."""

    async def scenario() -> None:
        options = RelayOptions(max_unconfirmed=3, max_unconfirmed_per_ip=3)
        async with live_relay(options) as relay:
            server = relay.shard.server
            bare = [await relay.raw_socket("127.0.0.2") for _ in range(3)]
            await wait_for(lambda: len(server.pending) == 3)
            honest = await relay.client()  # from 127.0.0.1
            await honest.ping()
            oldest_reader = bare[0][0]
            assert await asyncio.wait_for(oldest_reader.read(1), 2) == b""
            assert server.stats["closed.evicted_unconfirmed"] == 1
            await wait_for(lambda: len(server.pending) == 2)
            another = await relay.raw_socket("127.0.0.2")  # 3 of its own again: the cap
            extra_reader, _ = await relay.raw_socket("127.0.0.2")
            assert await asyncio.wait_for(extra_reader.read(1), 2) == b""
            assert server.stats["refused.max_unconfirmed_per_ip"] == 1
            for _, writer in [*bare, another]:
                writer.close()
            await honest.close()

    run(scenario())


def test_malformed_frame_closes_only_that_connection() -> None:
    """R-FRAME-2: a bad client is killed; linked pairs on the same shard go on."""

    async def scenario() -> None:
        async with live_relay() as relay:
            a, b = await linked_pair(relay)
            bad = await relay.client()
            bad.send_raw(b"\x08\x01" + os.urandom(40))  # length 2049
            await asyncio.wait_for(asyncio.shield(bad.closed), 2)
            garbage_reader, garbage_writer = await relay.raw_socket()
            garbage_writer.write(os.urandom(128))  # a hello that does not open
            assert await garbage_reader.read() == b""
            a.send_data(16, b"still here")
            assert await b.expect(RoutedData) == RoutedData(16, b"still here")
            garbage_writer.close()

    run(scenario())


def test_server_pings_are_answered_by_the_client_library() -> None:
    """R-PING-2/R-TIME-3: the client answers PINGs itself and stays connected."""

    async def scenario() -> None:
        options = RelayOptions(ping_interval=0.3, ping_timeout=0.2)
        async with live_relay(options) as relay:
            client = await relay.client()
            pings = 0
            while pings < 3:
                event = await client.next_event(timeout=2)
                pings += isinstance(event, Ping)
            assert not client.closed.done()
            assert relay.shard.server.stats["closed.R-PING-4"] == 0

    run(scenario())


def test_client_that_does_not_read_is_bounded_and_others_are_unaffected() -> None:
    """R-OUT-1/R-OUT-2: data to a client that stops reading is dropped once its
    buffer passes the soft limit; its partner and other pairs keep going."""

    async def scenario() -> None:
        options = RelayOptions(output_soft_limit=16 * 1024, output_hard_limit=64 * 1024)
        async with live_relay(options) as relay:
            sender, sleeper = await linked_pair(relay)
            c, d = await linked_pair(relay)
            sleeper.transport.pause_reading()  # type: ignore[union-attr]
            payload = os.urandom(2000)
            for _ in range(3000):  # ~6 MB at a reader that reads nothing
                sender.send_data(16, payload)
                await asyncio.sleep(0)
            server = relay.shard.server
            await wait_for(lambda: server.stats["dropped.backpressure"] > 0, timeout=5)
            c.send_data(16, b"ping through")
            assert await d.expect(RoutedData) == RoutedData(16, b"ping through")
            await sender.ping()
            sleeper_connection = server.by_key[sleeper.public_key]
            assert sleeper_connection.state is ConnectionState.CONFIRMED
            assert sleeper_connection.outbox_size == 0
            sleeper.transport.resume_reading()  # type: ignore[union-attr]
            # Nothing was lost from the stream itself: the frames that were sent decrypt.
            received = 0
            while True:
                try:
                    event = await sleeper.next_event(timeout=0.5)
                except TimeoutError:
                    break
                assert event == RoutedData(16, payload)
                received += 1
            assert 0 < received < 3000

    run(scenario())


def test_hello_then_frames_in_one_write() -> None:
    """R-HS-1/R-ORDER-2 over a real socket: bytes after the hello are frames."""

    async def scenario() -> None:
        async with live_relay() as relay:
            core = ClientConnection(os.urandom(32), relay.public_key)
            reader, writer = await relay.raw_socket()
            writer.write(core.take_outbox())
            core.receive(await reader.readexactly(96))
            core.send(Ping(b"\x01" * 8))
            core.send(Ping(b"\x02" * 8))
            writer.write(core.take_outbox())
            events = core.receive(await reader.readexactly(2 * (2 + 16 + 9)))
            assert [e.ping_id for e in events] == [b"\x01" * 8, b"\x02" * 8]  # type: ignore[union-attr]
            writer.close()

    run(scenario())
