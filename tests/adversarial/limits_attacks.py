"""Attack clients for the limits of issue 10 #5-#8 (next hops, half-open
floods, cross-worker amplification, onion budget), and the cluster's
counters read from its Prometheus endpoint. Loopback only; every attacker
and honest client binds its own 127.x source address."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from cluster.client import ConnectionClosed, RelayClient
from tests.cluster_process.support import Cluster, ShardLine
from tests.support.relay_process import start_relay

_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def start_limits_cluster(workdir: Path, config: str = "", workers: int = 2) -> Cluster:
    """`cluster start --workers N --shard-ports --metrics` with ``config`` (TOML)."""
    relay = start_relay(
        workdir,
        config=config or None,
        workers=workers,
        extra_args=["--shard-ports", "--metrics", "127.0.0.1:0"],
    )
    cluster = Cluster(relay)
    assert len(cluster.shards()) == workers, relay.stdout_lines
    return cluster


def metrics_url(cluster: Cluster) -> str:
    return next(line.split()[-1] for line in cluster.lines if line.startswith("Metrics on"))


def counters(cluster: Cluster) -> dict[str, float]:
    """Every sample of the endpoint: ``name`` or ``name{labels}`` -> value."""
    with urllib.request.urlopen(metrics_url(cluster), timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = match["labels"]
            key = match["name"] + (f"{{{labels}}}" if labels else "")
            samples[key] = float(match["value"])
    return samples


def dropped(samples: dict[str, float], reason: str) -> float:
    return samples.get(f'toxrelay_dropped_packets_total{{reason="{reason}"}}', 0.0)


async def settled_counters(cluster: Cluster) -> dict[str, float]:
    """The counters once every worker has reported what it did (1 s reports)."""
    await asyncio.sleep(2.2)
    return counters(cluster)


async def connect_from(
    cluster: Cluster,
    source: str,
    where: ShardLine | None = None,
    *,
    secret_key: bytes | None = None,
    timeout: float = 5.0,
) -> RelayClient:
    """A confirmed client from ``source`` on ``where``'s shard (or the shared port)."""
    host, port = where.address if where is not None else (cluster.relay.host, cluster.relay.port)
    return await RelayClient.connect(
        host,
        port,
        cluster.relay.public_key,
        secret_key=secret_key,
        local_addr=(source, 0),
        timeout=timeout,
    )


# ----------------------------------------------------------------------
# Onion / forward requests (onion-over-tcp.md)
# ----------------------------------------------------------------------


def forward_request(host: str, port: int, data: bytes) -> bytes:
    """Type 10 to an IPv4 next hop."""
    return b"\x0a\x02" + socket.inet_aton(host) + struct.pack(">H", port) + data


def onion_request(host: str, port: int, size: int = 300) -> bytes:
    """Type 8 whose node 2 is an IPv4 address (contents opaque to the relay)."""
    address = b"\x02" + socket.inet_aton(host) + bytes(12) + struct.pack(">H", port)
    head = b"\x08" + bytes(range(24)) + address
    return head + bytes(i % 251 for i in range(size - len(head)))


class UdpSink(asyncio.DatagramProtocol):
    """A UDP socket that counts what arrives (a service on the host, a DHT node)."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        self.datagrams.append(data)


@contextlib.asynccontextmanager
async def udp_sink(host: str = "127.0.0.1"):  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    transport, sink = await loop.create_datagram_endpoint(UdpSink, local_addr=(host, 0))
    try:
        yield sink, transport.get_extra_info("sockname")[1]
    finally:
        transport.close()


# ----------------------------------------------------------------------
# Half-open floods
# ----------------------------------------------------------------------


def bare_sockets(host: str, port: int, sources: list[str], per_source: int) -> list[socket.socket]:
    """TCP connections that never send a byte, ``per_source`` from each source
    address (non-blocking connects: the kernel completes them)."""
    opened: list[socket.socket] = []
    for _ in range(per_source):
        for source in sources:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            sock.bind((source, 0))
            with contextlib.suppress(BlockingIOError):
                sock.connect((host, port))
            opened.append(sock)
    return opened


def close_all(sockets: list[socket.socket]) -> None:
    for sock in sockets:
        sock.close()


async def newcomer_connects(cluster: Cluster, source: str, timeout: float = 3.0) -> bool:
    """Whether an honest client from ``source`` connects and is confirmed."""
    try:
        client = await connect_from(cluster, source, timeout=timeout)
    except (ConnectionClosed, TimeoutError, OSError):
        return False
    await client.close()
    return True


def sources(prefix: str, count: int) -> Iterator[str]:
    """``prefix``.1 .. ``prefix``.count (e.g. "127.0.3")."""
    return (f"{prefix}.{number}" for number in range(1, count + 1))
