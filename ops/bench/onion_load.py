"""Onion requests (type 8) over TCP, counted where the relay sends them: a UDP sink.

    python -m ops.bench.onion_load HOST PORT PUBKEY_HEX [-N REQUESTS] [-K CLIENTS] [--json]

Opens K client connections (handshake + PING), then sends N onion requests spread
over them, in rounds of at most ``--window`` per client; each request's node-2
address (onion-over-tcp.md, form A) is a UDP socket of this process on 127.0.0.1,
so every request the relay forwards (R-ONION-5, type 0x81) lands here. A round ends
when its datagrams have arrived or after ``--round-timeout``. Prints sent, delivered
and the seconds taken; the relay's onion rate limits must be off (0) to measure its
cost, or most requests are dropped by design. The body is random bytes of valid
lengths: the relay opens no box of it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

from cluster.client import RelayClient
from relaycore.packets import OnionRequest

FAMILY_INET = 2
ONION_TAIL = 32 + 150  # node-2 temporary key + an opaque box for node 2 (len(P) > 153)


def onion_body(sink_port: int) -> bytes:
    """nonce · node-2 address (form A: 127.0.0.1:sink_port) · temp key · box."""
    address = bytes((FAMILY_INET, 127, 0, 0, 1)) + bytes(12) + sink_port.to_bytes(2, "big")
    return os.urandom(24) + address + os.urandom(ONION_TAIL)


class Sink(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received = 0
        self.changed = asyncio.Event()

    def datagram_received(self, data: bytes, addr: object) -> None:
        self.received += 1
        self.changed.set()


async def run(args: argparse.Namespace) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(
        Sink, local_addr=("127.0.0.1", 0), family=socket.AF_INET
    )
    sock = transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sink_port = transport.get_extra_info("sockname")[1]
    key = bytes.fromhex(args.pubkey)
    clients = [
        await RelayClient.connect(args.host, args.port, key, local_addr=(f"127.0.0.{i % 4 + 1}", 0))
        for i in range(args.clients)
    ]
    packet = OnionRequest(onion_body(sink_port))
    sent = 0
    started = time.perf_counter()
    while sent < args.requests:
        for client in clients:
            burst = min(args.window, args.requests - sent)
            for _ in range(burst):
                client.queue(packet)
            client.flush()
            sent += burst
        round_end = time.perf_counter() + args.round_timeout
        while sink.received < sent and time.perf_counter() < round_end:
            sink.changed.clear()
            try:
                await asyncio.wait_for(sink.changed.wait(), round_end - time.perf_counter())
            except TimeoutError:
                break
    elapsed = time.perf_counter() - started
    await asyncio.sleep(0.05)  # stragglers
    for client in clients:
        await client.close()
    transport.close()
    return {"sent": sent, "delivered": sink.received, "elapsed_s": elapsed}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("pubkey", help="relay public key, 64 hex digits")
    parser.add_argument("-N", "--requests", type=int, default=20_000)
    parser.add_argument("-K", "--clients", type=int, default=8)
    parser.add_argument("--window", type=int, default=32, help="requests per client per round")
    parser.add_argument("--round-timeout", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import uvloop

    result = uvloop.run(run(args))
    print(json.dumps(result) if args.json else result)
    return 0 if result["delivered"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
