"""A relay shard on the test's own event loop, on a kernel-chosen loopback port,
with adjustable options and a fast timer, for integration tests over real
sockets that must not wait 30 s for a ping."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass

from nacl.bindings import crypto_scalarmult_base

from cluster.client import RelayClient
from relaycore.options import RelayOptions
from runtime.sockets import open_listening_socket, open_udp_socket
from worker.shard import Shard

HOST = "127.0.0.1"


@dataclass
class LiveRelay:
    shard: Shard
    host: str
    port: int
    public_key: bytes
    udp_port: int  # onion / forwarding replies come back here

    async def client(self, **kwargs: object) -> RelayClient:
        return await RelayClient.connect(self.host, self.port, self.public_key, **kwargs)  # type: ignore[arg-type]

    async def raw_socket(
        self, source: str = HOST
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port, local_addr=(source, 0))


@contextlib.asynccontextmanager
async def live_relay(
    options: RelayOptions | None = None, tick_interval: float = 0.05
) -> AsyncIterator[LiveRelay]:
    secret_key = os.urandom(32)
    sock = open_listening_socket(HOST, 0, 128)
    udp = open_udp_socket(HOST, 0)
    udp_port = udp.getsockname()[1]
    shard = Shard(secret_key, options or RelayOptions(), asyncio.get_running_loop(), tick_interval)
    await shard.serve([sock], udp_socket=udp)
    try:
        yield LiveRelay(
            shard, HOST, sock.getsockname()[1], crypto_scalarmult_base(secret_key), udp_port
        )
    finally:
        await shard.stop()


async def wait_for(predicate, timeout: float = 3.0, interval: float = 0.01) -> None:  # type: ignore[no-untyped-def]
    """Poll until ``predicate()`` is true; AssertionError after ``timeout``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(interval)
