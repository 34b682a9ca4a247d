"""Onion and forwarding through a running cluster: a request leaves from the
shared UDP port, and a reply that the kernel hands to *another* worker's UDP
socket still reaches the asking client, over the peer bus (onion-over-tcp.md
R-ONION-5, R-ORET-5, R-FWD-5; docs/architecture.md "Onion and forwarding")."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import struct
from collections.abc import Callable, Iterator

from cluster.client import RelayClient
from relaycore.packets import Forwarding, OnionResponse
from tests.cluster_process.support import Cluster, closed_within, run, wait_until

REPLY_SOCKETS = 24  # distinct source ports: the kernel spreads them over the shards


@contextlib.contextmanager
def udp_sockets(count: int) -> Iterator[list[socket.socket]]:
    """``count`` UDP sockets on loopback ports (a stand-in next hop and the
    sources its replies come from), closed after."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
            sock.settimeout(5)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


def onion_request(port: int) -> bytes:
    address = b"\x02" + bytes((127, 0, 0, 1)) + bytes(12) + struct.pack(">H", port)
    head = b"\x08" + bytes(range(24)) + address
    return head + bytes(300 - len(head))


def test_replies_reach_the_client_whichever_worker_receives_them(
    make_cluster: Callable[..., Cluster],
) -> None:
    cluster = make_cluster(workers=2, allow_private_next_hops=True)
    udp_port = cluster.relay.udp_port
    assert udp_port, cluster.lines

    async def body() -> None:
        with udp_sockets(1 + REPLY_SOCKETS) as (hop, *repliers):
            first, _ = cluster.shards()
            client = await cluster.connect(first)
            client.send_plain(onion_request(hop.getsockname()[1]))
            request, source = await asyncio.to_thread(hop.recvfrom, 4096)
            assert source == ("127.0.0.1", udp_port) and request[0] == 0x81
            for index, replier in enumerate(repliers):
                payload = b"\x84" + struct.pack(">I", index)
                replier.sendto(b"\x8e" + request[-59:] + payload, ("127.0.0.1", udp_port))
            got = set()
            for _ in range(REPLY_SOCKETS):
                response = await client.expect(OnionResponse, timeout=5)
                got.add(struct.unpack(">I", response.data[1:5])[0])
            assert got == set(range(REPLY_SOCKETS))

            # Forwarding: the same path for type 10 / 0x92 / type 11.
            client.send_plain(
                b"\x0a\x02\x7f\x00\x00\x01" + hop.getsockname()[1].to_bytes(2, "big") + b"fw"
            )
            forward, _ = await asyncio.to_thread(hop.recvfrom, 4096)
            assert forward[:2] == b"\x91\x2d" and forward.endswith(b"fw")
            for replier in repliers[:8]:
                replier.sendto(b"\x92" + forward[1:47] + b"back", ("127.0.0.1", udp_port))
            for _ in range(8):
                assert await client.expect(Forwarding, timeout=5) == Forwarding(b"back")
            await client.close()

        def crossed() -> bool:
            totals = cluster.relay.status()["totals"]
            return totals["onion_replies"] == REPLY_SOCKETS and totals["forward_replies"] == 8

        await wait_until(crossed, timeout=10, what="the replies in the counters", interval=0.5)
        totals = cluster.relay.status()["totals"]
        # With 24 source ports over 2 workers, both sockets got some replies.
        assert 0 < totals["onion_replies_crossed_shards"] < REPLY_SOCKETS, totals

    run(body())


def test_answers_for_a_killed_workers_client_never_reach_its_new_connection(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Done-when of the onion issue: the return path was lost (its worker got
    SIGKILL, the client reconnected with the same key on the replacement);
    answers to the old requests, whichever worker receives them, are dropped,
    while a new request of the new connection is answered."""
    cluster = make_cluster(workers=2, allow_private_next_hops=True)
    udp_port = cluster.relay.udp_port
    victim, _ = cluster.shards()

    async def body() -> None:
        with udp_sockets(1 + REPLY_SOCKETS) as (hop, *repliers):
            key = os.urandom(32)
            old = await cluster.connect(victim, secret_key=key)
            old.send_plain(onion_request(hop.getsockname()[1]))
            old_request, _ = await asyncio.to_thread(hop.recvfrom, 4096)
            os.kill(victim.pid, signal.SIGKILL)
            await closed_within(old, 2.0)
            replacement = await cluster.wait_for_shard(victim.worker, victim.shard, 3.0)
            new = await cluster.connect(replacement, secret_key=key, timeout=3.0)
            for replier in repliers:
                replier.sendto(b"\x8e" + old_request[-59:] + b"\x84old", ("127.0.0.1", udp_port))
            new.send_plain(onion_request(hop.getsockname()[1]))
            new_request, _ = await asyncio.to_thread(hop.recvfrom, 4096)
            repliers[0].sendto(b"\x8e" + new_request[-59:] + b"\x84new", ("127.0.0.1", udp_port))
            assert await client_answer(new) == OnionResponse(b"\x84new")
            await asyncio.sleep(0.5)  # let any stray old answer arrive
            await new.ping()
            assert [e for e in new.pending_events() if isinstance(e, OnionResponse)] == []
            await new.close()

    run(body())


async def client_answer(client: RelayClient) -> OnionResponse:
    return await client.expect(OnionResponse, timeout=5)
