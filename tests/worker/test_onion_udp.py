"""The shard's UDP side over real loopback sockets: a client's type 8 / type 10
leaves from the relay's UDP port to the address it names, and the answer a
stand-in next hop sends back reaches that client as type 9 / type 11
(onion-over-tcp.md R-ONION-5, R-ORET-5, R-FWD-4, R-FWD-5)."""

from __future__ import annotations

import asyncio
import os
import struct

import pytest
import uvloop

from relaycore.options import RelayOptions
from relaycore.packets import Forwarding, OnionResponse
from tests.support.inprocess import HOST, live_relay, wait_for

# The stand-in next hops are on loopback: opt in, as a LAN-only relay would.
LOOPBACK_HOPS = RelayOptions(allow_private_next_hops=True)


def run(coro):  # type: ignore[no-untyped-def]
    return uvloop.run(asyncio.wait_for(coro, 30))


class NextHop(asyncio.DatagramProtocol):
    """A UDP socket standing in for DHT node 2 / a forwarding destination."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[tuple[bytes, tuple]] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.received.put_nowait((data, addr))


async def next_hop() -> tuple[NextHop, int]:
    loop = asyncio.get_running_loop()
    _, hop = await loop.create_datagram_endpoint(NextHop, local_addr=(HOST, 0))
    assert hop.transport is not None
    return hop, hop.transport.get_extra_info("sockname")[1]


def onion_request(port: int, size: int = 300) -> bytes:
    address = b"\x02" + bytes((127, 0, 0, 1)) + bytes(12) + struct.pack(">H", port)
    head = b"\x08" + bytes(range(24)) + address
    return head + bytes(i % 256 for i in range(size - len(head)))


def forward_request(port: int, data: bytes) -> bytes:
    return b"\x0a\x02" + bytes((127, 0, 0, 1)) + struct.pack(">H", port) + data


def test_onion_request_goes_out_and_the_answer_comes_back() -> None:
    run(_onion_request_goes_out_and_the_answer_comes_back())


async def _onion_request_goes_out_and_the_answer_comes_back() -> None:
    async with live_relay(LOOPBACK_HOPS) as relay:
        hop, hop_port = await next_hop()
        client = await relay.client()
        other = await relay.client()
        client.send_plain(onion_request(hop_port))
        data, source = await asyncio.wait_for(hop.received.get(), 5)
        assert source == (HOST, relay.udp_port)  # from the relay's UDP port [obs]
        assert data[0] == 0x81 and len(data) == 300 - 25 + 65
        assert data[1:25] == bytes(range(24))
        assert hop.transport is not None
        hop.transport.sendto(b"\x8e" + data[-59:] + b"\x84answer", source)
        response = await client.expect(OnionResponse, timeout=5)
        assert response == OnionResponse(b"\x84answer")
        await other.ping()
        assert other.pending_events() == []  # only the asker got it
        stats = relay.shard.server.stats
        assert stats["onion.requests_sent"] == 1 and stats["onion.replies_delivered"] == 1
        assert stats["udp.sent"] == 1
        await client.close()
        await other.close()
        hop.transport.close()


@pytest.mark.parametrize(
    "payload", [b"", b"forward me", bytes(1792)], ids=["empty", "short", "max"]
)
def test_forward_request_and_reply(payload: bytes) -> None:
    run(_forward_request_and_reply(payload))


async def _forward_request_and_reply(payload: bytes) -> None:
    async with live_relay(LOOPBACK_HOPS) as relay:
        hop, hop_port = await next_hop()
        client = await relay.client()
        client.send_plain(forward_request(hop_port, payload))
        data, source = await asyncio.wait_for(hop.received.get(), 5)
        assert data[:2] == b"\x91\x2d" and data[47:] == payload  # R-FWD-4
        assert hop.transport is not None
        hop.transport.sendto(b"\x92" + data[1:47] + b"back " + payload[:100], source)
        reply = await client.expect(Forwarding, timeout=5)
        assert reply == Forwarding(b"back " + payload[:100])
        await client.close()
        hop.transport.close()


def test_answer_after_the_client_reconnected_is_dropped() -> None:
    run(_answer_after_the_client_reconnected_is_dropped())


async def _answer_after_the_client_reconnected_is_dropped() -> None:
    """A return path names a connection instance: the same key connected again
    never gets the old connection's answers."""
    async with live_relay(LOOPBACK_HOPS) as relay:
        hop, hop_port = await next_hop()
        key = os.urandom(32)
        first = await relay.client(secret_key=key)
        first.send_plain(onion_request(hop_port))
        data, source = await asyncio.wait_for(hop.received.get(), 5)
        await first.close()
        second = await relay.client(secret_key=key)
        await second.ping()
        assert hop.transport is not None
        hop.transport.sendto(b"\x8e" + data[-59:] + b"\x84late", source)
        stats = relay.shard.server.stats
        await wait_for(lambda: stats["dropped.reply_stale"] == 1)
        await second.ping()
        assert second.pending_events() == []
        await second.close()
        hop.transport.close()


def test_rate_limit_drops_and_counts_without_closing() -> None:
    run(_rate_limit_drops_and_counts_without_closing())


async def _rate_limit_drops_and_counts_without_closing() -> None:
    options = RelayOptions(
        onion_rate_per_client=1.0, onion_burst_per_client=2.0, allow_private_next_hops=True
    )
    async with live_relay(options) as relay:
        hop, hop_port = await next_hop()
        client = await relay.client()
        for _ in range(5):
            client.send_plain(onion_request(hop_port))
        await client.ping()
        stats = relay.shard.server.stats
        await wait_for(lambda: stats["onion.requests_sent"] == 2)
        assert stats["dropped.onion_rate_client"] == 3
        assert hop.received.qsize() <= 2
        await client.close()
        assert hop.transport is not None
        hop.transport.close()


def test_ipv6_next_hop_from_an_ipv4_relay_is_counted_not_sent() -> None:
    run(_ipv6_next_hop_from_an_ipv4_relay_is_counted_not_sent())


async def _ipv6_next_hop_from_an_ipv4_relay_is_counted_not_sent() -> None:
    async with live_relay(LOOPBACK_HOPS) as relay:
        client = await relay.client()
        address = b"\x0a" + bytes(15) + b"\x01" + struct.pack(">H", 9)
        client.send_plain(b"\x08" + bytes(24) + address + bytes(300))
        await client.ping()
        stats = relay.shard.server.stats
        await wait_for(lambda: stats["dropped.udp_unreachable"] == 1)
        await client.close()


def test_loopback_and_own_udp_port_are_refused_next_hops() -> None:
    """Issue 10 #5: by default nothing is sent to a next hop on the relay's own
    host (loopback here); opted in, loopback is a next hop but the relay's own
    UDP socket never is. Each refusal is counted, nothing reaches the hop."""
    run(_loopback_and_own_udp_port_are_refused_next_hops())


async def _loopback_and_own_udp_port_are_refused_next_hops() -> None:
    hop, hop_port = await next_hop()
    async with live_relay() as relay:
        client = await relay.client()
        client.send_plain(onion_request(hop_port))
        client.send_plain(forward_request(hop_port, b"x" * 40))
        await client.ping()
        stats = relay.shard.server.stats
        assert stats["dropped.next_hop_own_address"] == 2
        assert stats["udp.sent"] == 0
        await client.close()
    async with live_relay(LOOPBACK_HOPS) as relay:
        client = await relay.client()
        client.send_plain(forward_request(relay.udp_port, b"x" * 40))
        client.send_plain(forward_request(hop_port, b"y" * 40))
        await client.ping()
        stats = relay.shard.server.stats
        await wait_for(lambda: stats["udp.sent"] == 1)
        assert stats["dropped.next_hop_self"] == 1
        await client.close()
    data, _ = await asyncio.wait_for(hop.received.get(), 2)
    assert data.endswith(b"y" * 40)
    await asyncio.sleep(0.1)
    assert hop.received.empty()
    assert hop.transport is not None
    hop.transport.close()


# ----------------------------------------------------------------------
# Bootstrap info (0xF0) for status pages
# ----------------------------------------------------------------------


async def udp_client() -> tuple[NextHop, asyncio.DatagramTransport]:
    hop, _ = await next_hop()
    assert hop.transport is not None
    return hop, hop.transport


def test_bootstrap_info_request_is_answered_with_version_and_motd() -> None:
    run(_bootstrap_info_request_is_answered_with_version_and_motd())


async def _bootstrap_info_request_is_answered_with_version_and_motd() -> None:
    options = RelayOptions(motd="$worker_connections connections", info_version=1_000_002_023)
    async with live_relay(options) as relay:
        client = await relay.client()
        asker, transport = await udp_client()
        transport.sendto(b"\xf0" + bytes(76), (HOST, relay.udp_port))  # 77 bytes: ignored
        transport.sendto(b"\xf0" + bytes(77), (HOST, relay.udp_port))
        answer, source = await asyncio.wait_for(asker.received.get(), 5)
        assert source == (HOST, relay.udp_port)
        assert answer == b"\xf0" + (1_000_002_023).to_bytes(4, "big") + b"1 connections\x00"
        stats = relay.shard.server.stats
        assert stats["udp.info_answered"] == 1 and stats["udp.ignored"] == 1
        assert asker.received.empty()
        await client.close()
        transport.close()


def test_bootstrap_info_answers_are_rate_limited() -> None:
    """Attack: forged 78-byte requests make the relay send up to 3.3x as many bytes to
    the forged source. At most the burst plus rate x time is answered, the rest is
    dropped and counted."""
    run(_bootstrap_info_answers_are_rate_limited())


async def _bootstrap_info_answers_are_rate_limited() -> None:
    options = RelayOptions(motd="m" * 255, info_rate_per_worker=5.0)
    async with live_relay(options) as relay:
        asker, transport = await udp_client()
        for _ in range(200):
            transport.sendto(b"\xf0" + bytes(77), (HOST, relay.udp_port))
        stats = relay.shard.server.stats
        await wait_for(lambda: stats["udp.info_answered"] + stats["dropped.info_rate"] == 200)
        assert stats["udp.info_answered"] <= 6, stats  # burst 5 (+1 refilled meanwhile)
        assert stats["dropped.info_rate"] >= 194
        await asyncio.sleep(0.05)
        assert asker.received.qsize() == stats["udp.info_answered"]
        transport.close()


def test_no_motd_no_answer() -> None:
    run(_no_motd_no_answer())


async def _no_motd_no_answer() -> None:
    async with live_relay(RelayOptions(motd="")) as relay:
        asker, transport = await udp_client()
        transport.sendto(b"\xf0" + bytes(77), (HOST, relay.udp_port))
        stats = relay.shard.server.stats
        await wait_for(lambda: stats["udp.ignored"] == 1)
        assert asker.received.empty() and stats["udp.info_answered"] == 0
        transport.close()
