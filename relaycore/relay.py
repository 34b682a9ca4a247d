"""The TCP relay rules of one server process (tcp-relay-protocol.md §1-§13).

``RelayServer`` owns every connection's state (``relaycore.connection``):
handshake, confirmation, the 240 routing slots, links between slots, the key
index, pings and the output queue decisions. It is sans-IO: the adapter
feeds it bytes with ``receive(connection, data, now)``, drives ``tick(now)``
about once a second and, after each call, writes ``data_to_send()`` of every
connection in ``take_dirty()`` and closes every connection in ``take_closed()``
(after writing what it still has).
While ``connection.more_input`` is set it calls ``receive(connection, b"",
now)`` again on a later turn, and while ``connection.waiting_for`` is set it
should stop reading that connection's socket (issue 10: bounded work per
call, bounded input held).

Two parts live in modules of their own: the onion / forwarding first hop
(``relaycore.firsthop``) and, in a cluster, the links to clients on other
shards (``relaycore.crossshard``). The relay calls the latter through the
hooks of ``Neighbours``; a stand-alone relay's neighbour is ``Alone``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Generator

from relaycore.connection import (
    ZERO_PING_ID,
    ConnectionRefused,
    ConnectionState,
    ServerConnection,
    Slot,
    SlotState,
)
from relaycore.constants import (
    MAX_PLAINTEXT_SIZE,
    NUM_CLIENT_CONNECTIONS,
    NUM_RESERVED_PORTS,
    SERVER_PING_ID_SIZE,
    TCP_CLIENT_HANDSHAKE_SIZE,
    PacketId,
)
from relaycore.crossshard import CrossShard
from relaycore.crypto import CryptoError, beforenm, buffer_of, generate_keypair, public_key_of
from relaycore.errors import InvariantBroken, ProtocolViolation
from relaycore.firsthop import FirstHop
from relaycore.framing import PLAINTEXT, SecureChannel
from relaycore.handshake import open_client_hello_keyed, seal_server_reply
from relaycore.limits import PendingByAddress, address_key
from relaycore.neighbours import Alone, Neighbours
from relaycore.onion import Datagram, OnionSecrets
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
    connect_notification,
    decode_client_packet,
    disconnect_notification,
    oob_receive,
    pong,
    routing_response,
    server_ping,
)
from relaycore.shardlink import ShardId

__all__ = [
    "FRAMES_PER_RECEIVE",
    "MAX_HELD_INPUT",
    "ConnectionRefused",
    "ConnectionState",
    "RelayServer",
    "ServerConnection",
    "Slot",
    "SlotState",
]

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

CONFIRMED = ConnectionState.CONFIRMED
_ID_BYTES = [bytes((value,)) for value in range(256)]
# The counter of each packet id a client may send (decode_client_packet has
# refused the others before it is looked up).
_PACKETS_IN = {packet_id: f"packets_in.{packet_id.name.lower()}" for packet_id in PacketId}
LINKED = SlotState.LINKED


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
        onion_secrets: OnionSecrets | None = None,
    ) -> None:
        """``shard`` set = one shard of a cluster with that id: the relay then
        has a cross-shard part (``self.cluster``, relaycore.crossshard), whose
        own interface the adapter drives. ``onion_secrets``: the cluster's
        shared onion/forwarding keys (random when None: fine stand-alone)."""
        self.secret_key = secret_key
        self.public_key = public_key_of(secret_key)
        self.options = options or RelayOptions()
        self._random_bytes = random_bytes
        self._keypair = keypair
        self.by_key: dict[bytes, ServerConnection] = {}  # CONFIRMED only (R-CONF-5)
        self.by_epoch: dict[int, ServerConnection] = {}  # the same, for UDP return paths
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
        self.shard = shard  # this shard's id in a cluster (None: stand-alone)
        self.cluster: Neighbours = Alone(self.stats) if shard is None else CrossShard(self, shard)
        self.first_hop = FirstHop(self.options, self.stats, random_bytes, onion_secrets, shard or 0)

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
            self.settle()

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
        self._read_frames(connection, channel, data, now)

    def _read_frames(
        self, connection: ServerConnection, channel: SecureChannel, data: bytes, now: float
    ) -> None:
        """The per-frame loop (§5, §8), at most FRAMES_PER_RECEIVE frames. Routed
        data over a link, the bulk of a relay's work, is handled inline: for a
        client on this shard its plaintext is re-sealed for the peer straight
        from the channel's buffer (R-DATA-4), one new object per frame; for
        one on another shard it goes to the bus; counters are added once per
        call. Every other packet takes ``_handle_packet``."""
        frames = channel.open_frames(data)
        stats = self.stats
        plaintext = buffer_of(PLAINTEXT)
        slots = connection.slots
        soft_limit = self.options.output_soft_limit
        dirty = self._dirty
        send_remote = self.cluster.send_data
        count = relayed = relayed_bytes = dropped = 0
        # Data for a client on another shard, gathered per link while it runs
        # on; handed to the bus before anything else the read causes.
        remote = remote_payloads = None
        try:
            for size in frames:
                count += 1
                packet_id = PLAINTEXT[0]
                if packet_id >= NUM_RESERVED_PORTS and connection.state is CONFIRMED:
                    slot = slots[packet_id - NUM_RESERVED_PORTS]
                    if slot is not None and slot.state is LINKED:  # R-DATA-4
                        peer = slot.peer
                        if peer is None:  # linked to a client on another shard
                            if slot.remote is remote:
                                remote_payloads.append(plaintext[1:size])  # type: ignore[union-attr]
                            else:
                                if remote_payloads:
                                    send_remote(connection, remote, remote_payloads)  # type: ignore[arg-type]
                                remote, remote_payloads = slot.remote, [plaintext[1:size]]
                        elif peer.outbox_size + peer.transport_backlog > soft_limit:
                            dropped += 1  # R-OUT-2: no nonce used
                        elif peer.state is CONFIRMED:
                            PLAINTEXT[0] = slot.peer_slot + NUM_RESERVED_PORTS  # type: ignore[union-attr]
                            frame = peer.channel.seal_frame(size)  # type: ignore[union-attr]
                            if not peer.outbox:
                                dirty.append(peer)
                            peer.outbox.append(frame)
                            peer.outbox_size += len(frame)
                            relayed += 1
                            relayed_bytes += size
                        if count == FRAMES_PER_RECEIVE:
                            self._stop_reading(connection, channel, frames)
                            break
                        continue
                if remote_payloads:  # (stream order on the bus)
                    send_remote(connection, remote, remote_payloads)  # type: ignore[arg-type]
                    remote = remote_payloads = None
                if connection.state is ConnectionState.UNCONFIRMED:
                    self._confirm(connection, now)  # R-CONF-1
                    slots = connection.slots
                self._handle_packet(connection, plaintext[:size], now)
                if connection.state is ConnectionState.CLOSED:
                    return
                if connection.waiting_for is not None:
                    break  # the rest waits for the other shard's answer
                if count == FRAMES_PER_RECEIVE:
                    self._stop_reading(connection, channel, frames)
                    break
        except ProtocolViolation as violation:
            if remote_payloads:  # the frames before the bad one, before its UNLINKs
                send_remote(connection, remote, remote_payloads)  # type: ignore[arg-type]
                remote_payloads = None
            self.kill(connection, violation.rule)
        finally:
            frames.close()
            if remote_payloads:
                send_remote(connection, remote, remote_payloads)  # type: ignore[arg-type]
            stats["frames_in"] += count
            self._count_relayed(relayed, relayed_bytes, dropped)

    def _stop_reading(
        self,
        connection: ServerConnection,
        channel: SecureChannel,
        frames: Generator[int, None, None],
    ) -> None:
        """This call's share of frames is used up: the rest stays buffered
        for a later turn (``more_input`` when a whole frame is left)."""
        frames.close()  # the buffer now starts at the next frame
        connection.more_input = channel.has_frame()

    def settle(self) -> None:
        """Kill what passed output_hard_limit during the call that ends now:
        killed in the middle of it, a connection could be linked (or its slots
        changed) after its kill, by the code that was sending to it. Every
        entry point calls it last (the cross-shard part's too)."""
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
        self.cluster.check_invariants()

    def peer_closed(self, connection: ServerConnection, now: float) -> None:
        """The client's socket reached EOF or failed (R-KILL-4)."""
        if connection.state is ConnectionState.CLOSED:
            return
        connection.peer_closed = True
        if self.options.close_on_peer_eof or connection.state is not ConnectionState.CONFIRMED:
            self.kill(connection, "R-KILL-4")
            if self._over_limit:
                self.settle()
        # else: 0.2.18 behaviour, the ping timeout (R-PING-4) ends it later.

    def tick(self, now: float) -> None:
        """Timers: server pings, ping timeouts, handshake timeouts (§10)."""
        options = self.options
        for connection in list(self.by_key.values()):
            if connection.state is not ConnectionState.CONFIRMED:
                continue  # killed earlier in this loop (a peer's ping timeout)
            if now >= connection.last_pinged + options.ping_interval:  # R-PING-2
                ping_id = self._random_bytes(SERVER_PING_ID_SIZE)
                if ping_id == ZERO_PING_ID:
                    ping_id = b"\x00" * (SERVER_PING_ID_SIZE - 1) + b"\x01"
                self._send_priority(connection, server_ping(ping_id))
                connection.ping_id = ping_id
                connection.last_pinged = now
            if (
                connection.ping_id != ZERO_PING_ID
                and now >= connection.last_pinged + options.ping_timeout
            ):
                self.kill(connection, "R-PING-4")
        self.cluster.tick(now)
        if options.handshake_timeout:
            deadline = now - options.handshake_timeout
            for connection in [c for c in self.pending if c.opened_at <= deadline]:
                self.kill(connection, "handshake_timeout")
        self.first_hop.tick(now)
        self.settle()

    def take_dirty(self) -> list[ServerConnection]:
        """Connections with new output since the last call: the adapter writes
        each one's ``data_to_send()``."""
        if self._over_limit:  # (every entry point settles; this is a backstop)
            self.settle()
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
            self.cluster.closed(connection)
        else:
            self.pending.discard(connection)
            self._pending_by_address.remove(connection.address, connection)
        connection.slots = [None] * NUM_CLIENT_CONNECTIONS
        connection.slot_of_key.clear()
        connection.waiting_for = None
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

    def _confirm(self, connection: ServerConnection, now: float) -> None:
        key = connection.public_key
        assert key is not None
        epoch = self.cluster.next_epoch()  # (refused before anything changes)
        previous = self.by_key.get(key)
        if previous is not None:  # R-CONF-3: last confirmed wins
            self.kill(previous, "R-CONF-3")
        self.pending.discard(connection)
        self._pending_by_address.remove(connection.address, connection)
        self._identifier += 1
        connection.identifier = self._identifier  # R-CONF-4
        connection.epoch = epoch
        connection.last_pinged = now
        connection.ping_id = ZERO_PING_ID
        connection.state = ConnectionState.CONFIRMED
        self.by_key[key] = connection
        self.by_epoch[connection.epoch] = connection
        self.stats["confirmed"] += 1
        self.cluster.confirmed(connection)

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
                    self.cluster.send_data(connection, slot.remote, [plain[1:]])  # type: ignore[arg-type]
            else:
                self.stats["dropped.not_linked"] += 1  # R-DATA-3
            return
        packet = decode_client_packet(plain)
        self.stats[_PACKETS_IN[packet_id]] += 1
        if isinstance(packet, RoutingRequest):
            self._route_request(connection, packet.public_key, now)
        elif isinstance(packet, Ping):  # R-PING-1
            self._send_priority(connection, pong(packet.ping_id))
        elif isinstance(packet, Pong):  # R-PING-3
            if packet.ping_id == ZERO_PING_ID:
                raise ProtocolViolation("R-PING-3", "PONG with id 0")
            if packet.ping_id == connection.ping_id:
                connection.ping_id = ZERO_PING_ID
        elif isinstance(packet, OobSend):
            self._oob_send(connection, packet.destination, packet.data, now)
        elif isinstance(packet, DisconnectNotification):
            self._disconnect_request(connection, packet.connection_id)
        elif isinstance(packet, ConnectNotification):
            pass  # R-NOTIF-1: ignored
        elif isinstance(packet, OnionRequest):
            self.first_hop.onion_request(connection, packet.body, now)
        elif isinstance(packet, ForwardRequest):
            self.first_hop.forward_request(connection, packet.address, packet.data, now)

    def _oob_send(
        self, connection: ServerConnection, destination: bytes, data: bytes, now: float
    ) -> None:
        sender = connection.public_key
        assert sender is not None
        local = self.by_key.get(destination)
        if local is not None:  # R-OOB-2
            self._send_nonpriority(local, oob_receive(sender, data))
            return
        self.cluster.send_oob(connection, destination, data, now)

    def _route_request(self, connection: ServerConnection, public_key: bytes, now: float) -> None:
        if public_key == connection.public_key:  # R-ROUTE-2
            self._send_priority(connection, routing_response(None, public_key))
            return
        existing = connection.slot_of_key.get(public_key)
        if existing is not None:  # R-ROUTE-3
            self._send_priority(connection, routing_response(existing, public_key))
            return
        try:
            index = connection.slots.index(None)  # R-ROUTE-5: lowest free slot
        except ValueError:  # R-ROUTE-4: all 240 used
            self._send_priority(connection, routing_response(None, public_key))
            return
        self._send_priority(connection, routing_response(index, public_key))
        if connection.over_limit:
            return  # the reply passed output_hard_limit: no slot, no link
        slot = connection.slots[index] = Slot(public_key)
        connection.slot_of_key[public_key] = index
        self.cluster.slot_requested(connection, public_key)
        other = self.by_key.get(public_key)  # R-ROUTE-6
        if other is None:  # on another shard? ask it, wait for the answer
            self.cluster.request_remote(connection, public_key, now)
            return
        other_index = other.slot_of_key.get(connection.public_key)  # type: ignore[arg-type]
        if other_index is None:
            return  # R-ROUTE-7
        other_slot = other.slots[other_index]
        assert other_slot is not None
        if other_slot.state is not SlotState.REQUESTED:
            if other_slot.remote is None:
                return
            # O is still linked to our key's connection on another shard, which
            # ours replaced (R-CONF-3): that link ends first (O: 03).
            self.cluster.take_over(other, other_index)
        self._send_priority(connection, connect_notification(index))
        if connection.over_limit:
            return  # passed output_hard_limit before the link existed: O is not told
        slot.state = other_slot.state = SlotState.LINKED
        slot.peer, slot.peer_slot = other, other_index
        other_slot.peer, other_slot.peer_slot = connection, index
        self._send_priority(other, connect_notification(other_index))
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
        if slot.state is SlotState.LINKED and slot.remote is None:
            self._unlink_peer(slot)
        self.cluster.slot_released(connection, slot)

    def _unlink_peer(self, slot: Slot) -> None:
        """The link of ``slot`` ends: the peer's slot reverts to REQUESTED and the
        peer gets a DISCONNECT_NOTIFICATION (R-DISC-3, R-KILL-1)."""
        peer, peer_index = slot.peer, slot.peer_slot
        assert peer is not None
        peer_slot = peer.slots[peer_index]
        assert peer_slot is not None
        peer_slot.unlink()
        slot.unlink()
        self._send_priority(peer, disconnect_notification(peer_index))

    # ------------------------------------------------------------------
    # Onion and forwarding replies (the first hop itself: relaycore.firsthop)
    # ------------------------------------------------------------------

    def take_datagrams(self) -> list[Datagram]:
        """UDP datagrams produced since the last call, in order."""
        return self.first_hop.take_datagrams()

    def receive_datagram(self, data: bytes, now: float) -> None:
        """A UDP datagram arrived on the relay's port (from anyone)."""
        reply = self.first_hop.open_reply(data, now)
        if reply is not None and not self.cluster.reply_elsewhere(reply.path, reply.plain):
            self.deliver_reply(reply.path.epoch, reply.plain)

    def deliver_reply(self, epoch: int, plain: bytes) -> None:
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
            if plain[0] == 9:
                self.stats["onion.replies_delivered"] += 1
                self.stats[f"onion.replies_delivered_{plain[1]:#04x}"] += 1  # by response id
            else:
                self.stats["forward.replies_delivered"] += 1

    # ------------------------------------------------------------------
    # For the cross-shard part (relaycore.crossshard)
    # ------------------------------------------------------------------

    def notify_linked(self, connection: ServerConnection, index: int) -> None:
        self._send_priority(connection, connect_notification(index))  # R-ROUTE-6

    def notify_unlinked(self, connection: ServerConnection, index: int) -> None:
        self._send_priority(connection, disconnect_notification(index))  # R-KILL-1

    def deliver(self, connection: ServerConnection, plain: bytes) -> None:
        """An OOB from a client on another shard."""
        self._send_nonpriority(connection, plain)

    def deliver_routed(
        self, connection: ServerConnection, connection_id: int, payloads: list[bytes]
    ) -> None:
        """Routed data from a client on another shard, for the slot
        ``connection_id`` of ``connection`` (R-DATA-4): ``_send_nonpriority``
        of ``connection_id · payload`` for each payload, in order, counted once."""
        if connection.state is not CONFIRMED:
            return
        soft_limit = self.options.output_soft_limit
        channel = connection.channel
        id_byte = _ID_BYTES[connection_id]
        outbox = connection.outbox
        was_empty = not outbox
        seal_frame = channel.seal_frame  # type: ignore[union-attr]
        relayed = relayed_bytes = dropped = 0
        for payload in payloads:
            if connection.outbox_size + connection.transport_backlog > soft_limit:
                dropped += 1  # R-OUT-2: no nonce used
                continue
            plain = id_byte + payload
            if len(plain) > MAX_PLAINTEXT_SIZE:  # R-FRAME-6 (a bus message is not a frame)
                self.stats["dropped.data_too_long"] += 1
                continue
            frame = seal_frame(len(plain), plain)
            outbox.append(frame)
            connection.outbox_size += len(frame)
            relayed += 1
            relayed_bytes += 1 + len(payload)
        if was_empty and outbox:
            self._dirty.append(connection)
        self._count_relayed(relayed, relayed_bytes, dropped)

    def _count_relayed(self, relayed: int, relayed_bytes: int, dropped: int) -> None:
        """Counters of a run of routed data handled in one go (what
        ``_send_nonpriority`` counts per packet): frames queued, their
        plaintext bytes, and those dropped for backpressure (R-OUT-2)."""
        stats = self.stats
        if relayed:
            stats["frames_out"] += relayed
            stats["relayed"] += relayed
            stats["relayed_bytes"] += relayed_bytes
        if dropped:
            stats["dropped.backpressure"] += dropped

    def resume(self, connection: ServerConnection, now: float) -> None:
        """Its routing request was answered: read the frames that waited."""
        if connection.state is not ConnectionState.CLOSED:
            self._receive(connection, b"", now)

    def renew_epochs(self, new_epoch: Callable[[], int]) -> list[tuple[bytes, int]]:
        """Every confirmed connection gets a new epoch (our shard was dropped
        while alive); the (key, epoch) pairs. Replies to the old epochs are lost."""
        self.by_epoch.clear()
        renewed = []
        for key, connection in self.by_key.items():
            connection.epoch = new_epoch()
            self.by_epoch[connection.epoch] = connection
            renewed.append((key, connection.epoch))
        return renewed

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
