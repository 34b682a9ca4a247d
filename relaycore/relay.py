"""The relay table of one server process (tcp-relay-protocol.md §3, §6, §8-§13).

``RelayServer`` owns every connection's state: handshake progress, session
channel, the 240 routing slots, links between slots, the key index, pings and
the output queue decisions. It is sans-IO: the adapter feeds it bytes with
``receive(connection, data, now)``, drives ``tick(now)`` about once a second
and, after each call, writes ``connection.outbox`` of every connection in
``take_dirty()`` and closes every connection in ``take_closed()``. While
``connection.more_input`` is set it calls ``receive(connection, b"", now)``
again on a later turn, and while ``connection.waiting_for`` is set it should
stop reading that connection's socket (issue 10: bounded work per call,
bounded input held).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

from relaycore.constants import (
    MAX_PLAINTEXT_SIZE,
    NUM_CLIENT_CONNECTIONS,
    NUM_RESERVED_PORTS,
    SERVER_PING_ID_SIZE,
    TCP_CLIENT_HANDSHAKE_SIZE,
    PacketId,
)
from relaycore.crypto import CryptoError, beforenm, generate_keypair, public_key_of
from relaycore.errors import InvariantBroken, ProtocolViolation
from relaycore.framing import SecureChannel
from relaycore.handshake import open_client_hello_keyed, seal_server_reply
from relaycore.limits import AddressBuckets, PendingByAddress, address_key
from relaycore.nexthop import NextHopPolicy
from relaycore.onion import (
    MAX_DATAGRAM_SIZE,
    NET_PACKET_FORWARD_REPLY,
    NET_PACKET_ONION_RECV_1,
    Datagram,
    Dropped,
    OnionSecrets,
    ReturnPath,
    TokenBucket,
    forward_reply,
    forwarding,
    onion_recv_1,
    onion_send_1,
    return_period,
    seal_return_block,
)
from relaycore.options import RelayOptions
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    ForwardRequest,
    OnionRequest,
    OobSend,
    Ping,
    Pong,
    RoutingRequest,
    decode_client_packet,
)
from relaycore.shardlink import (
    EPOCH_COUNTER_BITS,
    EPOCH_COUNTER_MAX,
    INCARNATION_MAX,
    Epoch,
    Link,
    MapUpdate,
    Registry,
    ShardId,
)

_ZERO_PING_ID = bytes(SERVER_PING_ID_SIZE)
# Seconds a connection waits for another shard to answer its routing request
# before it reads on anyway (a dead shard is also dropped by the coordinator).
LINK_ANSWER_TIMEOUT = 2.0
# Seconds a link to a connection that the map says is gone may wait for that
# shard's own UNLINK before it is ended anyway.
UNLINK_GRACE = 1.0
# Seconds a remote connection that the map says was replaced (R-CONF-3) or
# ended is remembered as dead, so that a WANT or LINKED from it that a shard
# sent before it read that update, and that arrives late, cannot take a link
# over from the key's newer connection. Longer than the coordinator's silence
# limit (3 s): a shard that lags more than that is dropped, and what it sent
# before is refused through _dropped_shards. At most MAX_DEAD_EPOCHS of them.
DEAD_EPOCH_MEMORY = 10.0
MAX_DEAD_EPOCHS = 65536
# Snapshot requests remembered until their answer (one is usually outstanding).
MAX_SNAPSHOT_REQUESTS = 16
# The share of the worker's onion budget kept for addresses that have spent
# less than half of their own burst (onion_rate_per_worker).
ONION_WORKER_RESERVE = 0.25
# Seconds between two rounds of WANTs re-sent for one key after SETs of it: a
# key that reconnects faster costs its requesters' workers one round per
# interval, the newest connection of the key WANTed (issue 10 #7).
REWANT_INTERVAL = 0.1
# Bytes a connection may have buffered, unread, while its routing request waits
# for another shard's answer (its adapter stops reading from the socket then,
# so only what one read brought can arrive: 256 KiB with uvloop and asyncio).
# More is killed ("hold_limit"): the input is not ours to keep.
MAX_HELD_INPUT = 512 * 1024
# Frames one ``receive`` call handles for one connection; the rest stays
# buffered, ``more_input`` is set and the adapter calls ``receive(c, b"")``
# again on a later event-loop turn (with reading paused meanwhile), so no
# client holds the loop for more than about 1.5 ms (~6 us per PING frame).
FRAMES_PER_RECEIVE = 256


class ConnectionState(Enum):
    INCOMING = "incoming"  # waiting for the 128-byte hello
    UNCONFIRMED = "unconfirmed"  # replied; waiting for the first valid frame
    CONFIRMED = "confirmed"  # registered under its key, visible to others
    CLOSED = "closed"


class SlotState(Enum):
    REQUESTED = "requested"  # the owner asked for this key; not linked
    LINKED = "linked"  # both sides asked for each other


@dataclass(frozen=True, slots=True)
class RemotePeer:
    """The far end of a link to a client on another shard."""

    shard: ShardId
    public_key: bytes
    epoch: Epoch


class Slot:
    """One of a connection's 240 routing slots (a free slot is ``None``).

    A LINKED slot points either at a local connection (``peer``, ``peer_slot``)
    or at a client on another shard (``remote``).
    """

    __slots__ = ("public_key", "state", "peer", "peer_slot", "remote")

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.state = SlotState.REQUESTED
        self.peer: ServerConnection | None = None
        self.peer_slot = -1
        self.remote: RemotePeer | None = None

    def unlink(self) -> None:
        self.state = SlotState.REQUESTED
        self.peer = None
        self.peer_slot = -1
        self.remote = None


class ServerConnection:
    """Server-side state of one client connection."""

    __slots__ = (
        "serial",
        "peer_ip",
        "address",
        "opened_at",
        "state",
        "public_key",
        "channel",
        "_hello",
        "slots",
        "slot_of_key",
        "identifier",
        "epoch",
        "waiting_for",
        "waiting_since",
        "last_pinged",
        "ping_id",
        "outbox",
        "outbox_size",
        "transport_backlog",
        "peer_closed",
        "close_reason",
        "handle",
        "onion_budget",
        "over_limit",
        "more_input",
    )

    def __init__(self, serial: int, peer_ip: str, now: float) -> None:
        self.serial = serial
        self.peer_ip = peer_ip
        self.address = address_key(peer_ip)  # what per-address limits count
        self.opened_at = now
        self.state = ConnectionState.INCOMING
        self.public_key: bytes | None = None
        self.channel: SecureChannel | None = None
        self._hello = bytearray()
        self.slots: list[Slot | None] = [None] * NUM_CLIENT_CONNECTIONS
        self.slot_of_key: dict[bytes, int] = {}
        self.identifier = 0  # R-CONF-4, set on confirmation
        # Cluster-unique id of this connection: set on confirmation, renewed when
        # the coordinator dropped our shard while we lived (_renew_after_own_drop).
        self.epoch: Epoch = 0
        # While a routing request waits for the other shard's answer, this
        # connection's later frames stay unread, so its clients sees events in
        # the order one process would produce them (equivalence invariant).
        self.waiting_for: RemotePeer | None = None
        self.waiting_since = 0.0
        self.last_pinged = now
        self.ping_id = _ZERO_PING_ID
        self.outbox: list[bytes] = []  # bytes for the adapter to write, in order
        self.outbox_size = 0
        self.transport_backlog = 0  # bytes the adapter's transport still holds
        self.peer_closed = False
        self.close_reason: str | None = None
        self.handle: object = None  # the adapter's own reference (its transport)
        self.onion_budget: TokenBucket | None = None  # made at its first type 8/10
        # Its unsent output would have passed output_hard_limit: nothing more
        # is queued for it, and it is killed when the current call ends.
        self.over_limit = False
        # receive() stopped at FRAMES_PER_RECEIVE with complete frames left.
        self.more_input = False

    def __repr__(self) -> str:
        key = self.public_key.hex()[:8] if self.public_key else "-"
        return f"<ServerConnection #{self.serial} {self.state.value} {key}>"

    @property
    def unsent(self) -> int:
        return self.outbox_size + self.transport_backlog


class ConnectionRefused(Exception):
    """A new connection is over a configured limit; ``reason`` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RelayServer:
    """All connections of one relay process and the rules between them."""

    def __init__(
        self,
        secret_key: bytes,
        options: RelayOptions | None = None,
        *,
        random_bytes: Callable[[int], bytes] = os.urandom,
        keypair: Callable[[], tuple[bytes, bytes]] = generate_keypair,
        shard: ShardId | None = None,
        incarnation: int = 0,
        onion_secrets: OnionSecrets | None = None,
    ) -> None:
        """``shard`` set = one shard of a cluster: the server then reports
        registrations (``take_registry``), sends link messages for other shards
        (``take_bus``) and accepts theirs (``receive_link``, ``apply_map_update``).
        ``incarnation`` must be cluster-unique per server instance (epochs).
        ``onion_secrets``: the cluster's shared onion/forwarding keys (random
        when None: fine for a stand-alone relay)."""
        self.secret_key = secret_key
        self.public_key = public_key_of(secret_key)
        self.options = options or RelayOptions()
        self._random_bytes = random_bytes
        self._keypair = keypair
        self.by_key: dict[bytes, ServerConnection] = {}  # CONFIRMED only (R-CONF-5)
        self.by_epoch: dict[Epoch, ServerConnection] = {}  # the same, for UDP return paths
        self.pending: set[ServerConnection] = set()  # INCOMING + UNCONFIRMED
        self._pending_by_address = PendingByAddress()  # the same, per address key
        self.connections_per_ip: Counter[str] = Counter()
        self.connection_count = 0
        self._serial = 0
        self._identifier = 0  # R-CONF-4: first value 1, never reused
        self._dirty: list[ServerConnection] = []
        self._closed: list[ServerConnection] = []
        self._over_limit: list[ServerConnection] = []  # killed when the call ends
        self.stats: Counter[str] = Counter()
        # Cluster state (unused with shard=None).
        self.shard = shard
        self.clustered = shard is not None
        if not 0 <= incarnation <= INCARNATION_MAX:
            raise ValueError(f"incarnation {incarnation} does not fit the epoch's high 32 bits")
        self._epoch_base = incarnation << EPOCH_COUNTER_BITS
        self._epoch_serial = 0  # a connection gets a new epoch when our keys were dropped
        self.directory: dict[bytes, RemotePeer] = {}  # replica of the routing map, other shards
        self._remote_links: dict[RemotePeer, set[ServerConnection]] = {}
        self.peer_shards: set[ShardId] = set()  # the other live shards (coordinator's view)
        self._waiting: set[ServerConnection] = set()  # connections waiting for an answer
        self._doomed: dict[RemotePeer, float] = {}
        self._dropped_shards: set[ShardId] = set()  # DROP_SHARD seen, no SET since
        self._dead: dict[RemotePeer, float] = {}  # replaced / ended -> forget at (in order)
        self._mapped: set[Epoch] = set()  # our connections whose SET we have seen
        # Our epochs only grow and each REGISTER is queued as its epoch is
        # given: every epoch up to this one has had its REGISTER taken.
        self._registered_upto: Epoch = 0
        self._snapshot_marks: dict[int, Epoch] = {}  # request -> _registered_upto then
        self._wanting: dict[bytes, set[ServerConnection]] = {}  # key -> local holders of a slot
        self._bus: list[tuple[ShardId, tuple]] = []
        self._registry: list[tuple] = []
        # Onion and forwarding first hop (onion-over-tcp.md).
        self.onion_secrets = onion_secrets or OnionSecrets(os.urandom(32))
        self._forward_key = self.onion_secrets.forward_key()
        self._return_keys_period = -1
        self._return_keys: list[bytes] = []
        options = self.options
        self._onion_budget = TokenBucket(
            options.onion_rate_per_worker, options.onion_rate_per_worker, 0.0
        )
        self._onion_by_address = AddressBuckets(
            options.onion_rate_per_ip, options.onion_burst_per_ip
        )
        self._oob_broadcast_budget = TokenBucket(
            options.oob_broadcast_rate_per_worker, options.oob_broadcast_rate_per_worker, 0.0
        )
        self._oob_broadcast_by_address = AddressBuckets(
            options.oob_broadcast_rate_per_ip, options.oob_broadcast_burst_per_ip
        )
        # Where datagrams may go; the adapter replaces it with one that knows
        # the host's own addresses and the relay's UDP port.
        self.next_hops = NextHopPolicy(options.allow_private_next_hops)
        # Keys whose SET arrived since the last take_bus: their REQUESTED
        # holders WANT the newest entry once per batch, not once per SET.
        self._rewant: dict[bytes, None] = {}
        self._rewanted_at: dict[bytes, float] = {}  # key -> last round, oldest first
        self.datagrams: list[Datagram] = []  # for the adapter: take_datagrams()

    # ------------------------------------------------------------------
    # Adapter interface
    # ------------------------------------------------------------------

    def open_connection(self, peer_ip: str, now: float) -> ServerConnection:
        """A socket was accepted. Raises ConnectionRefused when over a limit;
        at the ``max_unconfirmed`` cap an older handshake is evicted instead."""
        options = self.options
        address = address_key(peer_ip)
        if (
            options.max_unconfirmed_per_ip
            and self._pending_by_address.count(address) >= options.max_unconfirmed_per_ip
        ):
            self.stats["refused.max_unconfirmed_per_ip"] += 1
            raise ConnectionRefused("max_unconfirmed_per_ip")
        if options.max_connections and self.connection_count >= options.max_connections:
            self.stats["refused.max_connections"] += 1
            raise ConnectionRefused("max_connections")
        if (
            options.max_connections_per_ip
            and self.connections_per_ip[peer_ip] >= options.max_connections_per_ip
        ):
            self.stats["refused.max_connections_per_ip"] += 1
            raise ConnectionRefused("max_connections_per_ip")
        if options.max_unconfirmed and len(self.pending) >= options.max_unconfirmed:
            # Half-open flood: the address holding the most handshakes loses
            # its oldest, so the newcomer (honest or not) gets a chance.
            victim = self._pending_by_address.oldest_of_busiest()
            if not isinstance(victim, ServerConnection):
                raise InvariantBroken(f"{len(self.pending)} pending, none held per address")
            self.kill(victim, "evicted_unconfirmed")
        self._serial += 1
        connection = ServerConnection(self._serial, peer_ip, now)
        self.pending.add(connection)
        self._pending_by_address.add(connection.address, connection)
        self.connections_per_ip[peer_ip] += 1
        self.connection_count += 1
        self.stats["accepted"] += 1
        return connection

    def receive(self, connection: ServerConnection, data: bytes, now: float) -> None:
        """Bytes arrived from a client; handle its complete frames in order, at
        most FRAMES_PER_RECEIVE of them (see ``more_input``)."""
        self._receive(connection, data, now)
        if self._over_limit:
            self._settle()

    def _receive(self, connection: ServerConnection, data: bytes, now: float) -> None:
        connection.more_input = False
        if connection.state is ConnectionState.CLOSED:
            return
        if connection.state is ConnectionState.INCOMING:
            data = self._receive_hello(connection, data)
            if not data:
                return
        channel = connection.channel
        assert channel is not None
        if connection.waiting_for is not None:
            if channel.buffered + len(data) > MAX_HELD_INPUT:
                self.kill(connection, "hold_limit")
                return
            channel.hold(data)
            return
        frames = channel.receive(data)
        try:
            stats = self.stats
            budget = FRAMES_PER_RECEIVE
            for plain in frames:
                stats["frames_in"] += 1
                if connection.state is ConnectionState.UNCONFIRMED:
                    self._confirm(connection, now)  # R-CONF-1
                self._handle_packet(connection, plain, now)
                if connection.state is ConnectionState.CLOSED:
                    return
                if connection.waiting_for is not None:
                    break  # the rest waits for the other shard's answer
                budget -= 1
                if not budget:
                    frames.close()  # the buffer now starts at the next frame
                    # The rest waits for a later turn (if a whole frame is left).
                    connection.more_input = channel.has_frame()
                    break
        except ProtocolViolation as violation:
            self.kill(connection, violation.rule)
        finally:
            frames.close()

    def _settle(self) -> None:
        """Kill what passed output_hard_limit during the call that ends now:
        killed in the middle of it, a connection could be linked (or its slots
        changed) after its kill, by the code that was sending to it."""
        over_limit = self._over_limit
        while over_limit:
            self.kill(over_limit.pop(), "output_hard_limit", discard_output=True)

    def check_invariants(self) -> None:
        """Cheap consistency checks of the relay table; raises InvariantBroken.
        A table that fails them is wedged in ways no client can repair: the
        adapter must end the process (the supervisor starts a clean one)."""
        confirmed, pending = len(self.by_key), len(self.pending)
        if self.connection_count != confirmed + pending:
            raise InvariantBroken(
                f"{self.connection_count} connections counted, "
                f"{confirmed} confirmed + {pending} pending held"
            )
        if len(self.by_epoch) != confirmed:
            raise InvariantBroken(f"{len(self.by_epoch)} epochs for {confirmed} keys")
        if sum(self.connections_per_ip.values()) != self.connection_count:
            raise InvariantBroken("per-address counts do not add up")
        if self._pending_by_address.size != pending:
            raise InvariantBroken(
                f"{self._pending_by_address.size} handshakes per address, {pending} pending"
            )
        if self._over_limit:
            raise InvariantBroken("a kill at output_hard_limit was never made")
        for connection in self._waiting:
            if connection.state is not ConnectionState.CONFIRMED or connection.waiting_for is None:
                raise InvariantBroken(f"{connection!r} waits but cannot be answered")

    def peer_closed(self, connection: ServerConnection, now: float) -> None:
        """The client's socket reached EOF or failed (R-KILL-4)."""
        if connection.state is ConnectionState.CLOSED:
            return
        connection.peer_closed = True
        if self.options.close_on_peer_eof or connection.state is not ConnectionState.CONFIRMED:
            self.kill(connection, "R-KILL-4")
            if self._over_limit:
                self._settle()
        # else: 0.2.18 behaviour, the ping timeout (R-PING-4) ends it later.

    def tick(self, now: float) -> None:
        """Timers: server pings, ping timeouts, handshake timeouts (§10)."""
        options = self.options
        for connection in list(self.by_key.values()):
            if connection.state is not ConnectionState.CONFIRMED:
                continue  # killed earlier in this loop (a peer's ping timeout)
            if now >= connection.last_pinged + options.ping_interval:  # R-PING-2
                ping_id = self._random_bytes(SERVER_PING_ID_SIZE)
                if ping_id == _ZERO_PING_ID:
                    ping_id = b"\x00" * (SERVER_PING_ID_SIZE - 1) + b"\x01"
                self._send_priority(connection, b"\x04" + ping_id)
                connection.ping_id = ping_id
                connection.last_pinged = now
            if (
                connection.ping_id != _ZERO_PING_ID
                and now >= connection.last_pinged + options.ping_timeout
            ):
                self.kill(connection, "R-PING-4")
        dead = self._dead
        while dead and next(iter(dead.values())) <= now:
            del dead[next(iter(dead))]
        for remote, deadline in list(self._doomed.items()):
            if now >= deadline:
                del self._doomed[remote]
                if remote in self._remote_links:
                    self.stats["unlinked_by_map"] += 1
                    self._end_remote_links(remote)
        for connection in [
            c for c in self._waiting if now - c.waiting_since >= LINK_ANSWER_TIMEOUT
        ]:
            self.stats["link_answer_timeout"] += 1  # that shard is stuck or gone
            self._stop_waiting(connection, now)
        if options.handshake_timeout:
            deadline = now - options.handshake_timeout
            for connection in [c for c in self.pending if c.opened_at <= deadline]:
                self.kill(connection, "handshake_timeout")
        self._onion_by_address.forget_refilled(now)
        self._oob_broadcast_by_address.forget_refilled(now)
        rewanted = self._rewanted_at
        while rewanted and next(iter(rewanted.values())) <= now - REWANT_INTERVAL:
            del rewanted[next(iter(rewanted))]
        self._settle()

    def take_dirty(self) -> list[ServerConnection]:
        """Connections with new bytes in ``outbox`` since the last call."""
        if self._over_limit:  # (every entry point settles; this is a backstop)
            self._settle()
        dirty, self._dirty = self._dirty, []
        return dirty

    def take_closed(self) -> list[ServerConnection]:
        """Connections the adapter must close, after writing what is still in
        their ``outbox`` and discarding whatever its transport could not send."""
        closed, self._closed = self._closed, []
        return closed

    def kill(
        self, connection: ServerConnection, reason: str, *, discard_output: bool = False
    ) -> None:
        """Close one connection and tell its linked peers (R-KILL-1, R-KILL-5).

        Packets produced before the kill in the same call (a PONG to a frame
        that preceded the bad one, the handshake reply) stay in ``outbox``:
        tox-bootstrapd has sent them by the time it kills (R-ORDER-2). What the
        transport still holds unsent is the 0.2.18 "queued output" and is
        dropped by the adapter's abort. ``discard_output`` drops the outbox too.
        """
        if connection.state is ConnectionState.CLOSED:
            return
        if connection.state is ConnectionState.CONFIRMED:
            for slot in connection.slots:
                if slot is not None:
                    self._release_slot(connection, slot)
            if self.by_key.get(connection.public_key) is connection:  # type: ignore[arg-type]
                del self.by_key[connection.public_key]  # type: ignore[arg-type]
            self.by_epoch.pop(connection.epoch, None)
            if self.clustered:
                self._mapped.discard(connection.epoch)
                self._registry.append(
                    (Registry.UNREGISTER, connection.public_key, connection.epoch)
                )
        else:
            self.pending.discard(connection)
            self._pending_by_address.remove(connection.address, connection)
        connection.slots = [None] * NUM_CLIENT_CONNECTIONS
        connection.slot_of_key.clear()
        connection.waiting_for = None
        self._waiting.discard(connection)
        connection.state = ConnectionState.CLOSED
        connection.close_reason = reason
        if discard_output:
            connection.outbox.clear()
            connection.outbox_size = 0
        self.connections_per_ip[connection.peer_ip] -= 1
        if not self.connections_per_ip[connection.peer_ip]:
            del self.connections_per_ip[connection.peer_ip]
        self.connection_count -= 1
        self.stats[f"closed.{reason}"] += 1
        self._closed.append(connection)

    # ------------------------------------------------------------------
    # Handshake and confirmation
    # ------------------------------------------------------------------

    def _receive_hello(self, connection: ServerConnection, data: bytes) -> bytes:
        """Collect the 128-byte hello (R-HS-1); return the bytes after it."""
        hello = connection._hello
        hello += data
        if len(hello) < TCP_CLIENT_HANDSHAKE_SIZE:
            return b""
        rest = bytes(hello[TCP_CLIENT_HANDSHAKE_SIZE:])
        try:
            client_pk, client_half, handshake_key = open_client_hello_keyed(
                bytes(hello[:TCP_CLIENT_HANDSHAKE_SIZE]), self.secret_key
            )
        except ProtocolViolation as violation:
            self.kill(connection, violation.rule)  # R-HS-2: no reply
            return b""
        connection._hello = bytearray()
        temp_pk, temp_sk = self._keypair()
        try:  # R-HS-5; beforenm fails for a low-order T_c such as all zeros
            session_key = beforenm(client_half.temp_public_key, temp_sk)
        except CryptoError:
            self.kill(connection, "R-HS-2")  # no usable session: no reply
            return b""
        base_nonce = self._random_bytes(24)
        reply = seal_server_reply(handshake_key, temp_pk, base_nonce, self._random_bytes(24))
        connection.public_key = client_pk
        connection.channel = SecureChannel(  # R-HS-5
            session_key,
            send_base_nonce=base_nonce,
            recv_base_nonce=client_half.base_nonce,
        )
        connection.state = ConnectionState.UNCONFIRMED
        self._append(connection, reply)  # R-HS-4
        self.stats["handshakes"] += 1
        return rest

    @property
    def epochs_left(self) -> int:
        """Confirmations this server can still give a cluster-unique epoch."""
        return EPOCH_COUNTER_MAX - self._epoch_serial

    def _confirm(self, connection: ServerConnection, now: float) -> None:
        key = connection.public_key
        assert key is not None
        if self._epoch_serial >= EPOCH_COUNTER_MAX:
            # One more would carry into the incarnation bits: another shard's
            # epochs. Refused before anything changes; the worker is replaced.
            raise ProtocolViolation("epochs_exhausted")
        previous = self.by_key.get(key)
        if previous is not None:  # R-CONF-3: last confirmed wins
            self.kill(previous, "R-CONF-3")
        self.pending.discard(connection)
        self._pending_by_address.remove(connection.address, connection)
        self._identifier += 1
        connection.identifier = self._identifier  # R-CONF-4
        self._epoch_serial += 1
        connection.epoch = self._epoch_base | self._epoch_serial
        connection.last_pinged = now
        connection.ping_id = _ZERO_PING_ID
        connection.state = ConnectionState.CONFIRMED
        self.by_key[key] = connection
        self.by_epoch[connection.epoch] = connection
        self.stats["confirmed"] += 1
        if self.clustered:
            self._registry.append((Registry.REGISTER, key, connection.epoch))

    # ------------------------------------------------------------------
    # Packets (§8). The per-packet hot path is routed data, handled first;
    # `cluster loadtest throughput` is the benchmark that guards it.
    # ------------------------------------------------------------------

    def _handle_packet(self, connection: ServerConnection, plain: bytes, now: float) -> None:
        packet_id = plain[0]
        if packet_id >= NUM_RESERVED_PORTS:
            slot = connection.slots[packet_id - NUM_RESERVED_PORTS]
            if slot is None:
                raise ProtocolViolation("R-DATA-2", f"data for unused id {packet_id}")
            if slot.state is SlotState.LINKED:  # R-DATA-4
                peer = slot.peer
                if peer is not None:
                    peer_id = slot.peer_slot + NUM_RESERVED_PORTS
                    self._send_nonpriority(peer, bytes((peer_id,)) + plain[1:])
                else:  # linked to a client on another shard
                    self._send_remote_data(connection, slot.remote, plain[1:])  # type: ignore[arg-type]
            else:
                self.stats["dropped.not_linked"] += 1  # R-DATA-3
            return
        packet = decode_client_packet(plain)
        self.stats[f"packets_in.{PacketId(packet_id).name.lower()}"] += 1
        if isinstance(packet, RoutingRequest):
            self._route_request(connection, packet.public_key, now)
        elif isinstance(packet, Ping):  # R-PING-1
            self._send_priority(connection, b"\x05" + packet.ping_id)
        elif isinstance(packet, Pong):  # R-PING-3
            if packet.ping_id == _ZERO_PING_ID:
                raise ProtocolViolation("R-PING-3", "PONG with id 0")
            if packet.ping_id == connection.ping_id:
                connection.ping_id = _ZERO_PING_ID
        elif isinstance(packet, OobSend):
            self._oob_send(connection, packet.destination, packet.data, now)
        elif isinstance(packet, DisconnectNotification):
            self._disconnect_request(connection, packet.connection_id)
        elif isinstance(packet, ConnectNotification):
            pass  # R-NOTIF-1: ignored
        elif isinstance(packet, OnionRequest):
            self._onion_request(connection, packet.body, now)
        elif isinstance(packet, ForwardRequest):
            self._forward_request(connection, packet.address, packet.data, now)

    def _oob_send(
        self, connection: ServerConnection, destination: bytes, data: bytes, now: float
    ) -> None:
        sender = connection.public_key
        assert sender is not None
        local = self.by_key.get(destination)
        if local is not None:  # R-OOB-2
            self._send_nonpriority(local, b"\x07" + sender + data)
            return
        remote = self.directory.get(destination)
        if remote is not None:
            self._bus.append((remote.shard, (Link.OOB, sender, destination, remote.epoch, data)))
        elif self.peer_shards:
            # Not in our replica: the key may have registered on another shard a
            # moment ago, so each shard delivers it if it holds the key (epoch None).
            # Every offline key lands here: one copy per shard, so it is rate
            # limited per address and per worker (amplification, issue 10).
            if not self._oob_broadcast_allowed(connection, now):
                return
            message = (Link.OOB, sender, destination, None, data)
            self._bus.extend((shard, message) for shard in self.peer_shards)
            self.stats["oob_broadcast"] += 1
        else:
            self.stats["dropped.oob_offline"] += 1  # R-OOB-3

    def _oob_broadcast_allowed(self, connection: ServerConnection, now: float) -> bool:
        if not self._oob_broadcast_by_address.take(connection.address, now):
            self.stats["dropped.oob_broadcast_rate_ip"] += 1
            return False
        if not self._oob_broadcast_budget.take(now):
            self.stats["dropped.oob_broadcast_rate_worker"] += 1
            return False
        return True

    def _send_remote_data(
        self, connection: ServerConnection, remote: RemotePeer, payload: bytes
    ) -> None:
        message = (
            Link.DATA, connection.public_key, connection.epoch,
            remote.public_key, remote.epoch, payload,
        )  # fmt: skip
        self._bus.append((remote.shard, message))

    def _route_request(self, connection: ServerConnection, public_key: bytes, now: float) -> None:
        if public_key == connection.public_key:  # R-ROUTE-2
            self._send_priority(connection, b"\x01\x00" + public_key)
            return
        existing = connection.slot_of_key.get(public_key)
        if existing is not None:  # R-ROUTE-3
            self._send_priority(connection, bytes((1, existing + NUM_RESERVED_PORTS)) + public_key)
            return
        try:
            index = connection.slots.index(None)  # R-ROUTE-5: lowest free slot
        except ValueError:  # R-ROUTE-4: all 240 used
            self._send_priority(connection, b"\x01\x00" + public_key)
            return
        self._send_priority(connection, bytes((1, index + NUM_RESERVED_PORTS)) + public_key)
        if connection.over_limit:
            return  # the reply passed output_hard_limit: no slot, no link
        slot = connection.slots[index] = Slot(public_key)
        connection.slot_of_key[public_key] = index
        if self.clustered:
            self._wanting.setdefault(public_key, set()).add(connection)
        other = self.by_key.get(public_key)  # R-ROUTE-6
        if other is None:
            remote = self.directory.get(public_key)
            if remote is not None:  # on another shard: ask it, wait for the answer
                self._send_want(connection, remote)
                connection.waiting_for = remote
                connection.waiting_since = now
                self._waiting.add(connection)
            return
        other_index = other.slot_of_key.get(connection.public_key)  # type: ignore[arg-type]
        if other_index is None:
            return  # R-ROUTE-7
        other_slot = other.slots[other_index]
        assert other_slot is not None
        if other_slot.state is not SlotState.REQUESTED:
            old = other_slot.remote
            if old is None:
                return
            # O is still linked to our key's connection on another shard, which
            # ours replaced (R-CONF-3; its SET / UNLINK has not come yet): as in
            # _linked_by_remote, that link ends first (O: 03), then R-ROUTE-6.
            self._send_link(Link.UNLINK, other.public_key, other.epoch, old)  # type: ignore[arg-type]
            self._end_remote_link(other, other_index, old)
        self._send_priority(connection, bytes((2, index + NUM_RESERVED_PORTS)))
        if connection.over_limit:
            return  # passed output_hard_limit before the link existed: O is not told
        slot.state = other_slot.state = SlotState.LINKED
        slot.peer, slot.peer_slot = other, other_index
        other_slot.peer, other_slot.peer_slot = connection, index
        self._send_priority(other, bytes((2, other_index + NUM_RESERVED_PORTS)))
        self.stats["links"] += 1

    def _disconnect_request(self, connection: ServerConnection, connection_id: int) -> None:
        index = (connection_id - NUM_RESERVED_PORTS) % 256  # R-DISC-2
        if index >= NUM_CLIENT_CONNECTIONS or connection.slots[index] is None:
            raise ProtocolViolation("R-DISC-2", f"disconnect for unused id {connection_id}")
        slot = connection.slots[index]
        assert slot is not None
        self._release_slot(connection, slot)  # R-DISC-3
        connection.slots[index] = None
        del connection.slot_of_key[slot.public_key]

    def _release_slot(self, connection: ServerConnection, slot: Slot) -> None:
        """The owner gives up ``slot`` (disconnect request or kill): a linked
        peer, here or on another shard, gets its DISCONNECT_NOTIFICATION."""
        if self.clustered:
            holders = self._wanting.get(slot.public_key)
            if holders is not None:
                holders.discard(connection)
                if not holders:
                    del self._wanting[slot.public_key]
        if slot.state is not SlotState.LINKED:
            return
        remote = slot.remote
        if remote is None:
            self._unlink_peer(slot)
            return
        self._forget_remote_link(remote, connection)
        self._send_link(Link.UNLINK, connection.public_key, connection.epoch, remote)  # type: ignore[arg-type]
        slot.unlink()

    def _unlink_peer(self, slot: Slot) -> None:
        """The link of ``slot`` ends: the peer's slot reverts to REQUESTED and the
        peer gets a DISCONNECT_NOTIFICATION (R-DISC-3, R-KILL-1)."""
        peer, peer_index = slot.peer, slot.peer_slot
        assert peer is not None
        peer_slot = peer.slots[peer_index]
        assert peer_slot is not None
        peer_slot.unlink()
        slot.unlink()
        self._send_priority(peer, bytes((3, peer_index + NUM_RESERVED_PORTS)))

    # ------------------------------------------------------------------
    # Onion and forwarding: the first hop for TCP clients (onion-over-tcp.md).
    # Requests leave as UDP datagrams (take_datagrams); replies come back to
    # any shard's UDP socket (receive_datagram) and reach the connection the
    # return path names, over the bus when another shard holds it.
    # ------------------------------------------------------------------

    def take_datagrams(self) -> list[Datagram]:
        """UDP datagrams produced since the last call, in order."""
        datagrams, self.datagrams = self.datagrams, []
        return datagrams

    def receive_datagram(self, data: bytes, now: float) -> None:
        """A UDP datagram arrived on the relay's port (from anyone)."""
        stats = self.stats
        if len(data) > MAX_DATAGRAM_SIZE:
            stats["dropped.datagram_too_long"] += 1  # no valid reply is (R-FWD-6)
            return
        kind = data[0] if data else -1
        try:
            if kind == NET_PACKET_ONION_RECV_1:
                reply = onion_recv_1(data, self._current_return_keys(now))
            elif kind == NET_PACKET_FORWARD_REPLY:
                reply = forward_reply(data, self._forward_key, now)
            else:
                stats["udp.ignored"] += 1  # DHT and onion hops 2-3: not a relay's job
                return
        except Dropped as drop:
            stats[f"dropped.{drop.reason}"] += 1
            return
        path = reply.path
        if not self.clustered or path.shard == self.shard:
            self._deliver_reply(path.epoch, reply.plain)
        elif path.shard in self._dropped_shards:
            stats["dropped.reply_stale"] += 1  # that shard is gone, and its clients
        else:
            # Not only to peer_shards: a shard that started a moment ago may not
            # be listed there yet. A dead shard's id stops here once its
            # DROP_SHARD is in; until then the bus bounds what queues for it.
            stats["onion.replies_to_other_shards"] += 1
            self._bus.append((path.shard, (Link.REPLY, path.epoch, reply.plain)))

    def _deliver_reply(self, epoch: Epoch, plain: bytes) -> None:
        """Type 9 / 11 to the connection instance that asked (R-ORET-5, R-FWD-5)."""
        if len(plain) > MAX_PLAINTEXT_SIZE:
            # Checked where it arrived (R-FWD-6); this one came over the bus.
            self.stats["dropped.reply_too_long"] += 1
            return
        connection = self.by_epoch.get(epoch)
        if connection is None:
            self.stats["dropped.reply_stale"] += 1  # it closed or reconnected since
            return
        if self._queue_nonpriority(connection, plain):
            counter = "onion.replies_delivered" if plain[0] == 9 else "forward.replies_delivered"
            self.stats[counter] += 1

    def _onion_allowed(self, connection: ServerConnection, now: float) -> bool:
        """The per-client, per-address and per-worker rate limits on types 8
        and 10. The worker's bucket is shared fairly: its last
        ONION_WORKER_RESERVE is only for addresses whose own bucket is at
        least half full, so a flood (from however many connections of a few
        addresses) cannot starve everyone else."""
        budget = connection.onion_budget
        options = self.options
        if budget is None:
            budget = connection.onion_budget = TokenBucket(
                options.onion_rate_per_client, options.onion_burst_per_client, now
            )
        if not budget.take(now):
            self.stats["dropped.onion_rate_client"] += 1
            return False
        light = True
        if options.onion_rate_per_ip > 0:
            # Spent even when the worker refuses below: an address that keeps
            # trying empties its own bucket and stops counting as light.
            by_address = self._onion_by_address.bucket(connection.address, now)
            if not by_address.take(now):
                self.stats["dropped.onion_rate_ip"] += 1
                return False
            light = by_address.tokens >= by_address.burst / 2
        worker = self._onion_budget
        if worker.rate > 0:
            floor = 1.0 if light else 1.0 + worker.burst * ONION_WORKER_RESERVE
            if worker.level(now) < floor:
                self.stats["dropped.onion_rate_worker"] += 1
                return False
            worker.tokens -= 1
        return True

    def _next_hop_refused(self, datagram: Datagram) -> bool:
        reason = self.next_hops.refusal(datagram.host, datagram.port)
        if reason is None:
            return False
        self.stats[f"dropped.{reason}"] += 1
        return True

    def _return_path(self, connection: ServerConnection) -> ReturnPath:
        return ReturnPath(self.shard or 0, connection.epoch)

    def _current_return_keys(self, now: float) -> list[bytes]:
        """[Ks of this period, Ks of the previous one] (R-ONION-8)."""
        period = return_period(now)
        if period != self._return_keys_period:
            secrets = self.onion_secrets
            self._return_keys = [secrets.return_key(period), secrets.return_key(period - 1)]
            self._return_keys_period = period
        return self._return_keys

    def _onion_request(self, connection: ServerConnection, body: bytes, now: float) -> None:
        """Type 8 -> UDP 0x81 to node 2 (R-ONION-2..5); failures are silent drops."""
        if not self._onion_allowed(connection, now):
            return
        try:
            block = seal_return_block(
                self._current_return_keys(now)[0],
                self._random_bytes(24),
                self._return_path(connection),
            )
            datagram = onion_send_1(body, block)
        except Dropped as drop:
            self.stats[f"dropped.{drop.reason}"] += 1
            return
        if self._next_hop_refused(datagram):
            return
        self.datagrams.append(datagram)
        self.stats["onion.requests_sent"] += 1

    def _forward_request(
        self, connection: ServerConnection, address: bytes, data: bytes, now: float
    ) -> None:
        """Type 10 -> UDP 0x91 (R-FWD-2..4); the kill rules were checked in decoding."""
        if not self._onion_allowed(connection, now):
            return
        try:
            datagram = forwarding(
                address, data, self._forward_key, self._return_path(connection), now
            )
        except Dropped as drop:
            self.stats[f"dropped.{drop.reason}"] += 1
            return
        if self._next_hop_refused(datagram):
            return
        self.datagrams.append(datagram)
        self.stats["forward.requests_sent"] += 1

    # ------------------------------------------------------------------
    # Cluster: links to clients on other shards (docs/architecture.md)
    # ------------------------------------------------------------------

    def take_bus(self, now: float) -> list[tuple[ShardId, tuple]]:
        """(destination shard, link message) pairs produced since the last call."""
        if self._rewant:
            self._send_rewants(now)
        bus, self._bus = self._bus, []
        return bus

    def _send_rewants(self, now: float) -> None:
        """R-ROUTE-6 across shards: each local connection with a REQUESTED
        slot for a key that got a SET WANTs the key's newest connection, once
        for all the SETs of a batch (a key that reconnects N times in a batch
        costs one WANT per holder, not N), and at most once per
        REWANT_INTERVAL per key: a later SET waits for a later call (every
        flush makes one; the tick at the latest)."""
        rewant, self._rewant = self._rewant, {}
        rewanted = self._rewanted_at
        for public_key in rewant:
            last = rewanted.get(public_key)
            if last is not None and now - last < REWANT_INTERVAL:
                self._rewant[public_key] = None  # too soon: a later call sends it
                continue
            rewanted.pop(public_key, None)
            rewanted[public_key] = now
            remote = self.directory.get(public_key)
            if remote is None:
                continue  # gone again (DEL, DROP_SHARD) within the batch
            for connection in list(self._wanting.get(public_key, ())):
                index = connection.slot_of_key[public_key]
                slot = connection.slots[index]
                if (
                    slot is not None
                    and slot.state is SlotState.REQUESTED
                    and connection.waiting_for != remote
                ):
                    self._send_want(connection, remote)  # requests that crossed converge
                    self.stats["wants_after_set"] += 1

    def take_registry(self) -> list[tuple]:
        """REGISTER / UNREGISTER events for the coordinator since the last call."""
        registry, self._registry = self._registry, []
        for kind, _, epoch in registry:
            if kind == Registry.REGISTER and epoch > self._registered_upto:
                self._registered_upto = epoch
        return registry

    def snapshot_requested(self, request: int, events_delivered: bool = True) -> None:
        """The adapter sends snapshot request ``request`` now, on the channel
        of the registry events and behind every one taken so far, so the
        coordinator has applied those REGISTERs when it answers; pass
        ``events_delivered=False`` when some may be pending or were lost.
        ``reset_directory`` with the same ``request`` then knows which of our
        connections the snapshot reflects (R-CONF-3 after a gap)."""
        marks = self._snapshot_marks
        marks[request] = self._registered_upto if events_delivered else 0
        while len(marks) > MAX_SNAPSHOT_REQUESTS:
            del marks[next(iter(marks))]

    def registrations(self) -> list[tuple[bytes, Epoch]]:
        """Every confirmed key and its epoch (to rebuild a restarted coordinator)."""
        return [(key, connection.epoch) for key, connection in self.by_key.items()]

    def _local(self, public_key: bytes, epoch: Epoch) -> ServerConnection | None:
        """The local connection with this key *and* epoch; None means stale."""
        connection = self.by_key.get(public_key)
        if connection is None or connection.epoch != epoch:
            self.stats["dropped.stale_epoch"] += 1
            return None
        return connection

    def receive_link(self, from_shard: ShardId, message: tuple, now: float) -> None:
        """A link message from another shard (handlers are idempotent)."""
        self._receive_link(from_shard, message, now)
        if self._over_limit:
            self._settle()

    def _receive_link(self, from_shard: ShardId, message: tuple, now: float) -> None:
        kind = message[0]
        if kind == Link.DATA:
            _, from_pk, from_epoch, to_pk, to_epoch, payload = message
            connection = self._local(to_pk, to_epoch)
            if connection is None:
                return
            index = connection.slot_of_key.get(from_pk)
            slot = connection.slots[index] if index is not None else None
            remote = slot.remote if slot is not None else None
            if remote is None or remote.epoch != from_epoch or remote.shard != from_shard:
                self.stats["dropped.stale_link"] += 1
                return
            self._send_nonpriority(connection, bytes((index + NUM_RESERVED_PORTS,)) + payload)  # type: ignore[operator]
        elif kind == Link.OOB or kind == Link.OOB_FORWARDED:
            self._receive_oob(message)
        elif kind == Link.WANT or kind == Link.LINKED:
            _, from_pk, from_epoch, to_pk, to_epoch = message
            remote = RemotePeer(from_shard, from_pk, from_epoch)
            if from_shard in self._dropped_shards:
                # Sent before that shard died (or was dropped while alive), read
                # after its DROP_SHARD: a link made now would never end. No
                # link; if it lives, the answer ends its side, and the SETs of
                # its registering again make us WANT again.
                self.stats["dropped.dead_shard"] += 1
                reply = Link.NOLINK if kind == Link.WANT else Link.UNLINK
                self._send_link(reply, to_pk, to_epoch, remote)
                return
            if remote in self._dead:
                # Sent before its shard read the update that replaced or ended
                # it, read after ours did: it must not take the link over from
                # the key's newer connection (no 03/02 for our client).
                self.stats["dropped.dead_epoch"] += 1
                reply = Link.NOLINK if kind == Link.WANT else Link.UNLINK
                self._send_link(reply, to_pk, to_epoch, remote)
                connection = self.by_key.get(to_pk)
                if connection is not None and connection.epoch == to_epoch:
                    self._answer_arrived(connection, remote, now)
                return
            self._linked_by_remote(remote, to_pk, to_epoch, answer=kind == Link.WANT, now=now)
        elif kind == Link.REPLY:
            _, to_epoch, plain = message
            self._deliver_reply(to_epoch, plain)
        elif kind == Link.NOLINK:
            _, from_pk, from_epoch, to_pk, to_epoch = message
            connection = self._local(to_pk, to_epoch)
            if connection is not None:
                self._answer_arrived(connection, RemotePeer(from_shard, from_pk, from_epoch), now)
        elif kind == Link.UNLINK:
            _, from_pk, from_epoch, to_pk, to_epoch = message
            self._end_remote_links(
                RemotePeer(from_shard, from_pk, from_epoch), only=(to_pk, to_epoch)
            )

    def _receive_oob(self, message: tuple) -> None:
        """An OOB from a client on another shard (R-OOB-2), for the key's
        connection ``to_epoch`` (None: a broadcast, for whoever holds the key).

        The sender's shard names the connection its replica maps the key to;
        when that one was replaced (R-CONF-3) by a connection the sender's
        replica has not heard of yet, one process would have delivered to the
        new one: so does the cluster (issue 12). The old connection's shard
        read the update that replaced it (that is what closed it), so it
        knows the key's current connection: its own, delivered here, or
        another shard's, forwarded there once (as OOB_FORWARDED, which is not
        forwarded again: two replicas that lag differently cannot bounce it)."""
        kind, from_pk, to_pk, to_epoch, data = message
        connection = self.by_key.get(to_pk)
        if to_epoch is None:  # a broadcast: delivered by whoever holds the key
            if connection is None:
                self.stats["dropped.oob_offline"] += 1  # R-OOB-3
                return
        elif connection is None or connection.epoch != to_epoch:
            if connection is not None and connection.epoch > to_epoch:
                # Ours replaced it (same shard: epochs grow): the key's current one.
                self.stats["oob_redirected"] += 1
            else:
                current = self.directory.get(to_pk)
                if current is None or current.epoch == to_epoch or kind == Link.OOB_FORWARDED:
                    self.stats["dropped.stale_epoch"] += 1
                    return
                self.stats["oob_forwarded"] += 1
                self._bus.append(
                    (current.shard, (Link.OOB_FORWARDED, from_pk, to_pk, current.epoch, data))
                )
                return
        self._send_nonpriority(connection, b"\x07" + from_pk + data)  # R-OOB-2

    def apply_map_update(self, update: tuple, now: float) -> None:
        """One sequenced update of the routing map from the coordinator."""
        self._apply_map_update(update, now)
        if self._over_limit:
            self._settle()

    def _apply_map_update(self, update: tuple, now: float) -> None:
        kind = update[0]
        if kind == MapUpdate.SET:
            _, public_key, shard, epoch, replaced_shard, replaced_epoch = update
            if replaced_epoch is not None:
                if replaced_shard == self.shard:  # R-CONF-3 across shards: newest wins
                    old = self.by_key.get(public_key)
                    if old is not None and old.epoch == replaced_epoch:
                        self.kill(old, "R-CONF-3")
                else:
                    replaced = RemotePeer(replaced_shard, public_key, replaced_epoch)
                    self._note_dead(replaced, now)
                    self._doom(replaced, now)
            self._dropped_shards.discard(shard)  # (dropped while alive, registers again)
            self._dead.pop(RemotePeer(shard, public_key, epoch), None)  # (the same: alive)
            if shard == self.shard:
                self.directory.pop(public_key, None)
                self._mapped.add(epoch)
                return
            self.directory[public_key] = RemotePeer(shard, public_key, epoch)
            if public_key in self._wanting:
                self._rewant[public_key] = None  # WANTed at take_bus (_send_rewants)
        elif kind == MapUpdate.DEL:
            _, public_key, shard, epoch = update
            current = self.directory.get(public_key)
            if current is not None and current.epoch == epoch:
                del self.directory[public_key]
            if shard != self.shard:
                ended = RemotePeer(shard, public_key, epoch)
                self._note_dead(ended, now)
                self._doom(ended, now)
        elif kind == MapUpdate.DROP_SHARD:
            _, shard, _exited = update  # (exited or silent: the same to the relay table)
            if shard == self.shard:
                self._renew_after_own_drop(now)
                return
            self.peer_shards.discard(shard)
            self._dropped_shards.add(shard)
            for public_key, remote in list(self.directory.items()):
                if remote.shard == shard:
                    del self.directory[public_key]
                    # (if that shard lives, it gives its clients new epochs)
                    self._note_dead(remote, now)
            for remote in [r for r in self._remote_links if r.shard == shard]:
                # Said on the bus too (lost if that worker is dead): one dropped
                # while alive may have linked on a LINKED we sent before this.
                for connection in list(self._remote_links[remote]):
                    self._send_link(Link.UNLINK, connection.public_key, connection.epoch, remote)  # type: ignore[arg-type]
                self._end_remote_links(remote)
            for connection in [c for c in self._waiting if c.waiting_for.shard == shard]:  # type: ignore[union-attr]
                self._stop_waiting(connection, now)

    def _renew_after_own_drop(self, now: float) -> None:
        """The coordinator took us for dead (silent too long: SIGSTOP, a stalled
        host) and dropped our keys; the other shards ended their links to our
        clients. Our side of each link ends too, and is UNLINKed on the bus for
        a shard that linked again before it read the drop (or never reads it).

        Then every confirmed connection gets a *new epoch* and registers again.
        Link messages the other shards sent before they read the drop (a LINKED
        answering crossed WANTs, a WANT re-sent on a SET, an UNLINK of the drop
        itself) may still be queued for us, behind that drop; they name the old
        epochs, so they are dropped as stale (``_local``) instead of making
        links their senders have already ended or ending the new ones (a client
        saw 03 02 03 02). Each new registration makes a SET that names a new
        epoch, so every shard with a REQUESTED slot on the key WANTs it again:
        that relinks, once (R-ROUTE-6)."""
        ended = [(c, r) for r, holders in self._remote_links.items() for c in holders]
        for connection, remote in ended:
            self._send_link(Link.UNLINK, connection.public_key, connection.epoch, remote)  # type: ignore[arg-type]
        self._mapped.clear()
        # Onion answers to the old epochs' requests are lost with them (rare:
        # clients send new requests within seconds).
        self.by_epoch.clear()
        for key, connection in self.by_key.items():
            self._epoch_serial += 1
            connection.epoch = self._epoch_base | self._epoch_serial
            self.by_epoch[connection.epoch] = connection
            self._registry.append((Registry.REGISTER, key, connection.epoch))
        for remote in list(self._remote_links):
            self._end_remote_links(remote)
        # An answer to a WANT sent before the drop names the old epoch: it
        # would never arrive, so do not wait for it.
        for connection in list(self._waiting):
            self._stop_waiting(connection, now)

    def reset_directory(
        self,
        entries: list[tuple[bytes, ShardId, Epoch]],
        now: float,
        *,
        merge: bool = False,
        request: int | None = None,
    ) -> None:
        """Load a snapshot of the routing map.

        After a gap in the updates (``merge=False``) the snapshot replaces the
        replica, and links to remote epochs it no longer holds end exactly as
        if their DEL had been received. After a coordinator restart
        (``merge=True``) the snapshot may still be filling up, so it only adds.
        ``request`` is the one given to ``snapshot_requested`` (None: unknown).
        """
        upto = self._snapshot_marks.pop(request, 0) if request is not None else 0
        snapshot = {
            key: RemotePeer(shard, key, epoch)
            for key, shard, epoch in entries
            if shard != self.shard
        }
        if not merge:
            # The snapshot reflects our connections whose SET we have seen and
            # those whose REGISTER went before the request. Any other may be
            # newer than the snapshot: its SET comes later.
            def reflected(connection: ServerConnection) -> bool:
                return connection.epoch in self._mapped or connection.epoch <= upto

            # R-CONF-3: a reflected connection of ours that the snapshot maps
            # to another connection of its key was replaced; the SET saying so
            # may be the update we missed (or one we skipped, buffered while
            # waiting for this snapshot, as older than it).
            listed = {key: (shard, epoch) for key, shard, epoch in entries}
            for key, connection in list(self.by_key.items()):
                entry = listed.get(key)
                if (
                    reflected(connection)
                    and entry is not None
                    and entry != (self.shard, connection.epoch)
                ):
                    self.kill(connection, "R-CONF-3")
            # A reflected connection of ours that the snapshot lacks can only
            # have gone with our DROP_SHARD (a DEL follows our own UNREGISTER):
            # that is the update we missed; do what it would have made us do.
            dropped = any(
                reflected(connection) and key not in listed
                for key, connection in self.by_key.items()
            )
            self._mapped.update(e for s, e in listed.values() if s == self.shard)
            self.directory = {}
            live = set(snapshot.values())
            for remote in [r for r in self._remote_links if r not in live]:
                self._end_remote_links(remote)
            if dropped:
                self._renew_after_own_drop(now)
            else:
                # Our confirmed keys that the map lacks register again: a no-op
                # if their REGISTER is still on its way, and needed if they were
                # registered and dropped with us before we saw their SET.
                self._registry.extend(
                    (Registry.REGISTER, key, connection.epoch)
                    for key, connection in self.by_key.items()
                    if key not in listed
                )
        for public_key, remote in snapshot.items():
            if self.directory.get(public_key) != remote:
                self._apply_map_update(
                    (MapUpdate.SET, public_key, remote.shard, remote.epoch, None, None), now
                )
        self._settle()

    def _note_dead(self, remote: RemotePeer, now: float) -> None:
        """The map says ``remote`` was replaced or has ended: refuse its link
        messages for DEAD_EPOCH_MEMORY seconds (see there)."""
        dead = self._dead
        dead.pop(remote, None)
        dead[remote] = now + DEAD_EPOCH_MEMORY
        if len(dead) > MAX_DEAD_EPOCHS:
            del dead[next(iter(dead))]

    def _doom(self, remote: RemotePeer, now: float) -> None:
        """The map says ``remote`` is gone. Its own shard sends UNLINK over the
        bus, ordered after the data it relayed just before; the map update may
        overtake both, so links to it end only if still there after a grace
        period (a backup for an UNLINK the bus dropped)."""
        if remote in self._remote_links:
            self._doomed[remote] = now + UNLINK_GRACE

    def set_peer_shards(self, shards: list[ShardId], now: float) -> None:
        """The live shards of the cluster, as the coordinator last listed them
        (``now`` as for every input; nothing here depends on it yet)."""
        self.peer_shards = {shard for shard in shards if shard != self.shard}

    def _send_link(self, kind: Link, from_pk: bytes, from_epoch: Epoch, to: RemotePeer) -> None:
        """WANT / LINKED / NOLINK / UNLINK from our (from_pk, from_epoch) to ``to``."""
        self._bus.append((to.shard, (kind, from_pk, from_epoch, to.public_key, to.epoch)))

    def _send_want(self, connection: ServerConnection, remote: RemotePeer) -> None:
        self._send_link(Link.WANT, connection.public_key, connection.epoch, remote)  # type: ignore[arg-type]

    def _linked_by_remote(
        self, remote: RemotePeer, to_pk: bytes, to_epoch: Epoch, *, answer: bool, now: float
    ) -> None:
        """WANT (answer=True) or LINKED from ``remote`` for our client ``to_pk``.

        A WANT is always answered, LINKED or NOLINK, because the requester's
        connection waits for the answer before reading its next frame."""
        connection = self._local(to_pk, to_epoch)
        if connection is None:
            # Our end is gone. A LINKED means theirs linked on a WANT we sent
            # before it went, and the DEL overtook that WANT (so their doom
            # found no link to end): end their side too, or it stays linked.
            self._send_link(Link.NOLINK if answer else Link.UNLINK, to_pk, to_epoch, remote)
            return
        index = connection.slot_of_key.get(remote.public_key)
        if index is None:  # our client does not want theirs (R-ROUTE-7)
            # (LINKED for a slot given up meanwhile: end their side too.)
            self._send_link(Link.NOLINK if answer else Link.UNLINK, to_pk, to_epoch, remote)
            return
        slot = connection.slots[index]
        assert slot is not None
        if slot.state is SlotState.LINKED:
            if slot.remote == remote:
                if answer:  # requests crossed; the other side may still wait
                    self._send_link(Link.LINKED, to_pk, to_epoch, remote)
                self._answer_arrived(connection, remote, now)
                return
            if slot.remote is None:
                self.stats["dropped.link_conflict"] += 1  # linked locally to the same key
                if answer:
                    self._send_link(Link.NOLINK, to_pk, to_epoch, remote)
                return
            # Linked to an older connection of that key: that link ends first.
            old = slot.remote
            self._send_link(Link.UNLINK, to_pk, to_epoch, old)
            self._end_remote_link(connection, index, old)
        slot.state = SlotState.LINKED
        slot.remote = remote
        self._remote_links.setdefault(remote, set()).add(connection)
        self._send_priority(connection, bytes((2, index + NUM_RESERVED_PORTS)))  # R-ROUTE-6
        if to_pk < remote.public_key:  # each cross-shard link counted once, by one end
            self.stats["links"] += 1
        if answer:
            self._send_link(Link.LINKED, to_pk, to_epoch, remote)
        self._answer_arrived(connection, remote, now)

    def _answer_arrived(self, connection: ServerConnection, remote: RemotePeer, now: float) -> None:
        """The shard we asked has answered: read the frames that waited."""
        if connection.waiting_for == remote:
            self._stop_waiting(connection, now)

    def _stop_waiting(self, connection: ServerConnection, now: float) -> None:
        connection.waiting_for = None
        self._waiting.discard(connection)
        if connection.state is not ConnectionState.CLOSED:
            self._receive(connection, b"", now)

    def _end_remote_links(
        self, remote: RemotePeer, only: tuple[bytes, Epoch] | None = None
    ) -> None:
        """The remote end is gone: each local slot linked to it reverts to
        REQUESTED and its owner gets one DISCONNECT_NOTIFICATION (R-KILL-1)."""
        for connection in list(self._remote_links.get(remote, ())):
            if only is not None and (connection.public_key, connection.epoch) != only:
                continue
            index = connection.slot_of_key[remote.public_key]
            self._end_remote_link(connection, index, remote)

    def _end_remote_link(
        self, connection: ServerConnection, index: int, remote: RemotePeer
    ) -> None:
        slot = connection.slots[index]
        assert slot is not None and slot.remote == remote
        slot.unlink()
        self._forget_remote_link(remote, connection)
        self._send_priority(connection, bytes((3, index + NUM_RESERVED_PORTS)))
        current = self.directory.get(remote.public_key)
        if (
            current is not None
            and current != remote
            and connection.state is ConnectionState.CONFIRMED
        ):
            # The map has another connection of that key (it replaced this
            # one): its SET came while this slot was still linked, so the
            # WANT that SET makes for REQUESTED slots was not sent. Send it.
            self._send_want(connection, current)

    def _forget_remote_link(self, remote: RemotePeer, connection: ServerConnection) -> None:
        holders = self._remote_links.get(remote)
        if holders is not None:
            holders.discard(connection)
            if not holders:
                del self._remote_links[remote]

    # ------------------------------------------------------------------
    # Output (§13)
    # ------------------------------------------------------------------

    def _append(self, connection: ServerConnection, data: bytes) -> None:
        if not connection.outbox:
            self._dirty.append(connection)
        connection.outbox.append(data)
        connection.outbox_size += len(data)
        self.stats["frames_out"] += 1

    def _send_priority(self, connection: ServerConnection, plain: bytes) -> None:
        """R-OUT-1: never dropped; but a connection that lets it pile up past the
        hard limit is killed rather than allowed to eat memory."""
        if connection.state is ConnectionState.CLOSED or connection.over_limit:
            return
        if connection.unsent + len(plain) > self.options.output_hard_limit:
            # Killed when the current call ends (_settle), not here: the caller
            # may be in the middle of changing this connection's links.
            connection.over_limit = True
            self._over_limit.append(connection)
            return
        self._append(connection, connection.channel.encrypt(plain))  # type: ignore[union-attr]

    def _queue_nonpriority(self, connection: ServerConnection, plain: bytes) -> bool:
        """R-OUT-2: dropped, without using a nonce, while the receiver is backed
        up; True when queued."""
        if connection.unsent > self.options.output_soft_limit:
            self.stats["dropped.backpressure"] += 1
            return False
        if connection.state is not ConnectionState.CONFIRMED:
            return False
        self._append(connection, connection.channel.encrypt(plain))  # type: ignore[union-attr]
        return True

    def _send_nonpriority(self, connection: ServerConnection, plain: bytes) -> None:
        """Relayed data and OOB (counted as relayed)."""
        if self._queue_nonpriority(connection, plain):
            stats = self.stats
            stats["relayed"] += 1
            stats["relayed_bytes"] += len(plain)
