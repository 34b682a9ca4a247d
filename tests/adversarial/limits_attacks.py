"""Attack clients for the limits of issue 10 #5-#8 (next hops, half-open
floods, cross-worker amplification, onion budget), and the cluster's
counters read from its Prometheus endpoint. Loopback only; every attacker
and honest client binds its own 127.x source address.

Floods run in a child process of their own (``AttackProcess``): in the test's
event loop they would delay the honest pair's round trips themselves and the
RTT bound would measure the test client, not the relay."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import socket
import struct
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from multiprocessing.connection import Connection
from multiprocessing.synchronize import Event as EventType
from typing import TypeVar

from cluster.client import ConnectionClosed, RelayClient
from relaycore.crypto import public_key_of
from relaycore.packets import OobSend
from tests.adversarial.support import HonestPair, connect_from, percentile, rtt_bound
from tests.cluster_process.support import Cluster

T = TypeVar("T")

_SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


# Added to an attack cluster's config: the counters are read from the endpoint.
METRICS_CONFIG = 'metrics = "127.0.0.1:0"\n'


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


def half_open_flood(
    host: str, port: int, flooders: list[str], per_source: int, seconds: float
) -> int:
    """``per_source`` bare sockets from each flooder, then 5 more from each every
    50 ms (the flooders replace what the relay closes), all held ``seconds``;
    the number opened. Runs in an AttackProcess."""
    held = bare_sockets(host, port, flooders, per_source)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.05)
        held += bare_sockets(host, port, flooders, 5)
    close_all(held)
    return len(held)


def onion_flood(
    host: str,
    shard_ports: list[int],
    relay_key: bytes,
    flooders: list[str],
    hop_port: int,
    seconds: float,
) -> int:
    """From each flooder a steady stream of forward requests to ``hop_port``
    (4 every 2 ms), over a new connection every 0.25 s, alternating workers;
    the number of requests sent. Runs in an AttackProcess."""

    async def one(source: str) -> int:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        clients: list[RelayClient] = []
        sent = 0
        try:
            while loop.time() < deadline:
                port = shard_ports[len(clients) % len(shard_ports)]
                client = await RelayClient.connect(
                    host, port, relay_key, local_addr=(source, 0), timeout=5
                )
                clients.append(client)
                switch_at = min(deadline, loop.time() + 0.25)
                while loop.time() < switch_at:
                    for _ in range(4):
                        client.core.send_plain(forward_request("127.0.0.1", hop_port, b"flood"))
                    client.flush()
                    sent += 4
                    await asyncio.sleep(0.002)
        finally:
            for client in clients:
                client.abort()
        return sent

    async def every() -> int:
        return sum(await asyncio.gather(*(one(source) for source in flooders)))

    return asyncio.run(every())


def _child(connection: Connection, target: Callable[..., object], args: tuple) -> None:
    try:
        connection.send(("ok", target(*args)))
    except BaseException as error:  # reported to the test
        connection.send(("error", repr(error)))


def attack_events() -> tuple[EventType, EventType]:
    """Two events an AttackProcess can take as arguments (ready, go)."""
    context = multiprocessing.get_context("spawn")
    return context.Event(), context.Event()


class AttackProcess:
    """``target(*args)`` in a child process (spawned: no state of the test's
    event loop), started at once; ``result()`` waits for what it returned
    (a failure in the child is raised here)."""

    def __init__(self, target: Callable[..., object], *args: object) -> None:
        context = multiprocessing.get_context("spawn")
        self._receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=_child, args=(sender, target, args), daemon=True)
        self.process.start()
        sender.close()

    @classmethod
    async def run(cls, target: Callable[..., object], *args: object, timeout: float = 60) -> object:
        """Start ``target(*args)`` in a child and wait for its result."""
        attack = cls(target, *args)
        try:
            return await attack.result(timeout)
        finally:
            attack.stop()

    async def result(self, timeout: float = 30.0) -> object:
        loop = asyncio.get_running_loop()
        try:
            ready = await loop.run_in_executor(None, self._receiver.poll, timeout)
            if not ready:
                raise TimeoutError(f"the attack process gave no result in {timeout} s")
            status, value = self._receiver.recv()
        finally:
            self.stop()
        if status != "ok":
            raise RuntimeError(f"the attack process failed: {value}")
        return value

    def stop(self) -> None:
        """End the child by its PID if it still runs."""
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)


async def honest_p99_during(
    pair: HonestPair, attack: Callable[[], Awaitable[T]], *, baseline_seconds: float = 1.0
) -> tuple[float, float, T]:
    """(baseline p99, p99 while ``attack()`` runs, what it returned): the pair
    samples round trips first alone, then from the attack's start to its end
    (check the p99s with ``assert_rtt_within_bound`` after the attack's own
    measures, so that a failure still shows them)."""
    baseline = percentile(await pair.measure(baseline_seconds), 0.99)
    pair.start()
    try:
        result = await attack()
    finally:
        samples = await pair.stop()
    assert not pair.failures, pair.failures
    assert len(samples) >= 10, f"only {len(samples)} round trips during the attack"
    return baseline, percentile(samples, 0.99), result


def assert_rtt_within_bound(baseline: float, during: float) -> None:
    """Issue 10: the honest pair's p99 during an attack."""
    print(f"honest pair RTT p99: {baseline * 1000:.1f} ms alone, {during * 1000:.1f} ms attacked")
    assert during <= rtt_bound(baseline), f"p99 {during:.4f} s, baseline {baseline:.4f} s"


# ----------------------------------------------------------------------
# Amplification across workers
# ----------------------------------------------------------------------


def want_storm(
    host: str,
    requester_port: int,
    key_port: int,
    relay_key: bytes,
    source: str,
    requesters: int,
    rounds: int,
    parallel: int,
    ready: EventType,
    go: EventType,
) -> int:
    """``requesters`` connections on one worker ask for key K (a routing
    request each), then ``ready`` is set; on ``go``, K connects ``rounds`` x
    ``parallel`` times on the other worker, ``parallel`` at once, 20 ms apart (each
    replaces the one before, R-CONF-3): every connection of K is a SET that made the
    first worker re-send one WANT per requester. The number of K's
    connections. Runs in an AttackProcess."""
    key = os.urandom(32)

    async def storm() -> int:
        loop = asyncio.get_running_loop()
        asking = [
            await RelayClient.connect(host, requester_port, relay_key, local_addr=(source, 0))
            for _ in range(requesters)
        ]
        target = public_key_of(key)
        for client in asking:
            client.route_request(target)
        for client in asking:
            await client.ping()
        ready.set()
        await loop.run_in_executor(None, go.wait, 30)
        made = 0
        for _ in range(rounds):
            batch = await asyncio.gather(
                *(
                    RelayClient.connect(
                        host, key_port, relay_key, secret_key=key, local_addr=(source, 0)
                    )
                    for _ in range(parallel)
                ),
                return_exceptions=True,
            )
            made += sum(isinstance(client, RelayClient) for client in batch)
            for client in batch:
                if isinstance(client, RelayClient):
                    client.abort()
            await asyncio.sleep(0.02)
        for client in asking:
            client.abort()
        return made

    return asyncio.run(storm())


def oob_flood(host: str, port: int, relay_key: bytes, source: str, count: int) -> int:
    """``count`` OOB packets to random (offline) keys from one address, over
    4 connections (no fresh allowance per connection); the number sent.
    Runs in an AttackProcess."""

    async def flood() -> int:
        clients = [
            await RelayClient.connect(host, port, relay_key, local_addr=(source, 0))
            for _ in range(4)
        ]
        for number in range(count):
            client = clients[number % len(clients)]
            client.core.send(OobSend(os.urandom(32), b"amplify me"))
            if number % 100 == 99:
                for each in clients:
                    each.flush()
                await asyncio.sleep(0.01)
        for client in clients:
            client.flush()
            await client.ping()
            client.abort()
        return count

    return asyncio.run(flood())
