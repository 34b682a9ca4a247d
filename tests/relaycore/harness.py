"""In-memory test harness for the sans-IO relay core.

A :class:`Network` holds one :class:`RelayServer` and any number of named
:class:`Peer` s, each a :class:`ClientConnection` paired with its
:class:`ServerConnection`. :meth:`Network.pump` moves bytes both ways until
nothing moves (client PONGs included), the way the asyncio adapter would:
client bytes go to ``RelayServer.receive``; after every core call the outbox
of each dirty server connection is delivered to its client and every closed
connection is marked closed.

Per peer it records the decoded packets the client received (``received``)
and whether the server closed its connection (``closed``, ``close_reason``).
Time is a plain number (``Network.now``); nothing sleeps.

Like the adapter, the harness writes what a connection's outbox holds when the
core closes it (packets made earlier in the same call, R-ORDER-2) and then
closes it; for a ``held`` peer those bytes were still unsent and die with the
socket. Bytes queued for a connection after its close was handled fail the
test (R-KILL-1: a killed connection receives nothing more).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from relaycore.client import ClientConnection
from relaycore.onion import OnionSecrets
from relaycore.options import RelayOptions
from relaycore.packets import ConnectNotification, Packet, RoutingRequest, RoutingResponse
from relaycore.relay import ConnectionState, RelayServer, ServerConnection

# The test-vector server key (bytes 0x40..0x5f, test-vectors.md §1).
SERVER_SK = bytes(range(0x40, 0x60))

# The spec checkout lives beside the repository: <repo>/../shared/spec.
VECTORS_PATH = Path(__file__).resolve().parents[2].parent / "shared" / "spec" / "vectors.json"

# First frame used to confirm a connection (R-CONF-1/2). A CONNECTION_NOTIFICATION
# of length 2 is ignored by the server (R-NOTIF-1), so confirming leaves no trace.
CONFIRM_PACKET = ConnectNotification(16)


def load_vectors() -> dict[str, Any]:
    """vectors.json, or a pytest skip (visible) where the spec checkout is absent."""
    if not VECTORS_PATH.exists():  # pragma: no cover - depends on the checkout
        pytest.skip(f"{VECTORS_PATH} not found")
    return json.loads(VECTORS_PATH.read_text())


def secret_key_for(name: str) -> bytes:
    """A fixed long-term secret key per name (reconnecting with a name keeps the key)."""
    return hashlib.sha256(b"relaycore-test:" + name.encode()).digest()


class CountingRandom:
    """Deterministic stand-in for ``os.urandom``: distinct, never all-zero outputs.

    ``queue`` values are returned first (exact sizes are checked), which lets a
    test choose the next ping id.
    """

    def __init__(self) -> None:
        self.counter = 0
        self.queue: list[bytes] = []

    def __call__(self, size: int) -> bytes:
        if self.queue:
            value = self.queue.pop(0)
            assert len(value) == size, (len(value), size)
            return value
        self.counter += 1
        return hashlib.sha256(self.counter.to_bytes(8, "big")).digest()[:size]


@dataclass(eq=False)
class Peer:
    """One client of the network and what it has seen."""

    name: str
    client: ClientConnection
    connection: ServerConnection
    received: list[Packet] = field(default_factory=list)
    closed: bool = False
    close_reason: str | None = None
    held: bool = False  # server output stays in the outbox (a slow reader)
    eof: bool = False  # the client closed its socket: no bytes move either way

    @property
    def public_key(self) -> bytes:
        return self.client.public_key

    @property
    def secret_key(self) -> bytes:
        return self.client.secret_key

    def take(self) -> list[Packet]:
        """The packets received since the last call."""
        packets, self.received = self.received, []
        return packets


class Network:
    """A RelayServer plus named clients, connected by in-memory byte pipes."""

    def __init__(
        self,
        options: RelayOptions | None = None,
        *,
        now: float = 0.0,
        random_bytes: Callable[[int], bytes] | None = None,
        keypair: Callable[[], tuple[bytes, bytes]] | None = None,
        server_sk: bytes = SERVER_SK,
        onion_secrets: OnionSecrets | None = None,
        shard: int | None = None,
    ) -> None:
        """``shard``: make the server that shard of a cluster (its epochs' high 32 bits)."""
        self.random = CountingRandom()
        extra: dict[str, object] = {"random_bytes": random_bytes or self.random}
        if onion_secrets is not None:
            extra["onion_secrets"] = onion_secrets
        if shard is not None:
            extra["shard"] = shard
        if keypair is not None:
            extra["keypair"] = keypair
        self.server = RelayServer(server_sk, options, **extra)  # type: ignore[arg-type]
        self.now = now
        self.peers: dict[str, Peer] = {}
        self._by_connection: dict[ServerConnection, Peer] = {}

    # ------------------------------------------------------------------
    # Connections
    # ------------------------------------------------------------------

    def open(
        self,
        name: str,
        secret_key: bytes | None = None,
        *,
        ip: str = "10.0.0.1",
        answer_pings: bool = True,
    ) -> Peer:
        """Accept a socket; the client's hello is queued but not yet delivered."""
        client = ClientConnection(
            secret_key if secret_key is not None else secret_key_for(name),
            self.server.public_key,
            answer_pings=answer_pings,
        )
        connection = self.server.open_connection(ip, self.now)
        peer = Peer(name, client, connection)
        self.peers[name] = peer
        self._by_connection[connection] = peer
        return peer

    def handshake(self, name: str, secret_key: bytes | None = None, **kwargs: object) -> Peer:
        """Open and exchange hello/reply: the server side is UNCONFIRMED."""
        peer = self.open(name, secret_key, **kwargs)  # type: ignore[arg-type]
        self.pump()
        assert peer.connection.state is ConnectionState.UNCONFIRMED, peer.connection
        return peer

    def connect(self, name: str, secret_key: bytes | None = None, **kwargs: object) -> Peer:
        """Handshake and confirm with CONFIRM_PACKET: the server side is CONFIRMED."""
        peer = self.handshake(name, secret_key, **kwargs)
        self.send(name, CONFIRM_PACKET)
        assert peer.connection.state is ConnectionState.CONFIRMED, peer.connection
        assert peer.received == []
        return peer

    def __getitem__(self, name: str) -> Peer:
        return self.peers[name]

    # ------------------------------------------------------------------
    # Traffic
    # ------------------------------------------------------------------

    def send(self, name: str, *packets: Packet) -> None:
        for packet in packets:
            self.peers[name].client.send(packet)
        self.pump()

    def link(self, first: str, second: str) -> tuple[int, int]:
        """Two peers that have not asked for each other yet request each other
        (R-ROUTE-6); returns (first's id, second's id) and leaves both
        ``received`` lists empty."""
        a, b = self.peers[first], self.peers[second]
        self.send(first, RoutingRequest(b.public_key))
        self.send(second, RoutingRequest(a.public_key))
        response_a, notification_a = a.take()
        response_b, notification_b = b.take()
        assert isinstance(response_a, RoutingResponse) and response_a.connection_id >= 16
        assert isinstance(response_b, RoutingResponse) and response_b.connection_id >= 16
        assert notification_a == ConnectNotification(response_a.connection_id)
        assert notification_b == ConnectNotification(response_b.connection_id)
        return response_a.connection_id, response_b.connection_id

    def send_plain(self, name: str, *plains: bytes) -> None:
        for plain in plains:
            self.peers[name].client.send_plain(plain)
        self.pump()

    def send_raw(self, name: str, data: bytes) -> None:
        """Append raw bytes to the client's stream (hello or frames, any content)."""
        self.peers[name].client.outbox += data
        self.pump()

    def receive_datagram(self, data: bytes) -> None:
        """A UDP datagram arrives on the relay's port; deliver what it makes."""
        self.server.receive_datagram(data, self.now)
        self.pump()

    def pump(self) -> None:
        """Move bytes both ways until nothing is left to move."""
        self._collect()
        moved = True
        while moved:
            moved = False
            for peer in list(self._by_connection.values()):
                data = peer.client.take_outbox()
                if peer.closed or peer.eof:
                    continue
                if data:
                    self.server.receive(peer.connection, data, self.now)
                elif peer.connection.more_input:  # the adapter's later turn
                    self.server.receive(peer.connection, b"", self.now)
                else:
                    continue
                self._collect()
                moved = True

    def tick(self, now: float) -> None:
        """Advance the fake clock to ``now`` and run the server timers."""
        assert now >= self.now
        self.now = now
        self.server.tick(now)
        self.pump()

    def peer_eof(self, name: str) -> None:
        """The client closed its socket (the adapter's connection_lost): from now
        on nothing it writes arrives and what the server writes is lost."""
        peer = self.peers[name]
        peer.eof = True
        self.server.peer_closed(peer.connection, self.now)
        self.pump()

    def hold(self, name: str) -> None:
        """Stop delivering server output to ``name`` (it piles up in the outbox)."""
        self.peers[name].held = True

    def release(self, name: str) -> None:
        peer = self.peers[name]
        peer.held = False
        self._deliver(peer)
        self.pump()

    # ------------------------------------------------------------------

    def _collect(self) -> None:
        for connection in self.server.take_dirty():
            peer = self._by_connection[connection]
            if not peer.held:
                self._deliver(peer)
        for connection in self.server.take_closed():
            peer = self._by_connection[connection]
            if peer.held:  # still unsent: the socket's close drops it
                connection.data_to_send()
            else:
                self._deliver(peer)
            peer.closed = True
            peer.close_reason = connection.close_reason

    def _deliver(self, peer: Peer) -> None:
        data = peer.connection.data_to_send()
        if not data:
            return
        assert not peer.closed, f"{peer.name}: {len(data)} bytes queued after its close"
        if not peer.eof:
            peer.received.extend(peer.client.receive(data))
