"""Issue 10 finding 1 against a real `--workers 2` cluster: one over-long UDP
0x92 forwarding reply used to cut a worker off from the cluster.

The attacker gets a valid sendback by sending a type 10 whose next hop is its
own UDP socket, then answers with 3000 bytes of data (a frame holds 2001). A
reply that reaches the other worker's UDP socket crosses the peer bus; there
SecureChannel.encrypt raised inside PeerBus._readable, which never read
again: that worker's clients could no longer link across workers. The reply
is now dropped where it arrives (R-FWD-6), and the bus reader survives any
exception anyway (tests/worker/test_containment.py)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from relaycore.packets import Forwarding
from tests.adversarial.support import (
    ATTACKER,
    HonestPair,
    check_cross_worker_link,
    connect_from,
)
from tests.cluster_process.support import Cluster, run

# The attacker's next hop is its own loopback socket: private next hops are
# refused by default (issue 10 finding 5), so this test opts in.
CONFIG = "allow_private_next_hops = true\n"


def _forward_request(udp: socket.socket, data: bytes) -> bytes:
    """A type 10 plaintext whose next hop is ``udp`` (the attacker's socket)."""
    host, port = udp.getsockname()
    return b"\x0a\x02" + socket.inet_aton(host) + port.to_bytes(2, "big") + data


async def _receive(udp: socket.socket, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        return await loop.sock_recv(udp, 4096)


def test_over_long_forward_replies_leave_every_worker_linked(
    attack_cluster: Callable[..., Cluster],
) -> None:
    cluster = attack_cluster(CONFIG)
    relay_udp = (cluster.relay.host, cluster.relay.udp_port)
    # Replies from many source ports: SO_REUSEPORT spreads them over both
    # workers' UDP sockets, so some reach the worker that did not ask.
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(16)]
    for udp in sockets:
        udp.bind((ATTACKER, 0))
        udp.setblocking(False)

    async def body() -> None:
        pair = await HonestPair.open(cluster)
        for where in cluster.shards():
            attacker = await connect_from(cluster, ATTACKER, where)
            listener = sockets[0]
            attacker.send_plain(_forward_request(listener, b"give me a sendback"))
            datagram = await _receive(listener)
            assert datagram[:2] == b"\x91\x2d"
            sendback = datagram[2:47]
            for udp in sockets:
                udp.sendto(b"\x92\x2d" + sendback + bytes(3000), relay_udp)
            await asyncio.sleep(0.3)
            # Every worker still delivers well-formed replies, from any socket
            # (across the bus too), and the attacker is still connected.
            for index, udp in enumerate(sockets):
                udp.sendto(b"\x92\x2d" + sendback + b"fine %d" % index, relay_udp)
            got = set()
            for _ in sockets:
                event = await attacker.expect(Forwarding, timeout=3.0)
                got.add(event.data)
            assert got == {b"fine %d" % index for index in range(len(sockets))}
            await attacker.close()
        await pair.round_trip()
        await check_cross_worker_link(cluster)
        await pair.close()

    try:
        run(body(), timeout=40)
    finally:
        for udp in sockets:
            udp.close()
