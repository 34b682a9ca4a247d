"""Links between clients on different shards of a cluster (the design card's
"Links across shards"; messages in ``relaycore.shardlink``), and the use of
the shard's replica of the routing map.

A stand-alone relay has no cross-shard part (``relaycore.relay.Alone``). In
a cluster, ``CrossShard`` is the relay's neighbour: the relay calls its hooks
when a connection is confirmed or closed, a slot requested or released, data
or an OOB is for a key not held here; it calls the relay back through a
narrow interface (``relay.by_key`` as the local lookup, ``notify_linked``,
``notify_unlinked``, ``deliver``, ``deliver_reply``, ``kill``, ``resume``,
``renew_epochs``, ``settle``).

Its inputs are the adapter's: link messages from other shards
(``receive_link``, dispatched per message kind) and the replica's calls
(``apply_map_update``, dispatched per update kind, ``reset_directory``,
``set_peer_shards``); its outputs are ``take_bus`` (link messages per
destination shard) and ``take_registry`` (REGISTER / UNREGISTER for the
coordinator). Each link message names the epochs of both ends, so a message
about an old connection never reaches a newer one with the same key; a WANT
is always answered (LINKED or NOLINK), because the requester's connection
stops reading until the answer comes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from relaycore.connection import ConnectionState, ServerConnection, Slot, SlotState
from relaycore.constants import NUM_RESERVED_PORTS
from relaycore.errors import InvariantBroken
from relaycore.limits import AddressBuckets
from relaycore.onion import ReturnPath, TokenBucket
from relaycore.packets import oob_receive
from relaycore.shardlink import (
    EPOCH_COUNTER_BITS,
    SHARD_ID_MAX,
    Epoch,
    Link,
    Registry,
    RemotePeer,
    ShardId,
)
from relaycore.shardmap import ShardMap

if TYPE_CHECKING:
    from relaycore.relay import RelayServer

# Payload bytes one DATA message carries at most (send_data adds a link's
# frames to its open message up to this; the bus's batches stay ~64 KiB).
DATA_MESSAGE_BYTES = 16 * 1024

# Seconds a connection waits for another shard to answer its routing request
# before it reads on anyway (a dead shard is also dropped by the coordinator).
LINK_ANSWER_TIMEOUT = 2.0
# Seconds between two rounds of WANTs re-sent for one key after SETs of it: a
# key that reconnects faster costs its requesters' workers one round per
# interval, the newest connection of the key WANTed (issue 10 #7).
REWANT_INTERVAL = 0.1


class CrossShard(ShardMap):
    """The cross-shard part of one shard's relay (see the module docstring)."""

    def __init__(self, relay: RelayServer, shard: ShardId) -> None:
        """``shard``: this shard's cluster-unique id, also the high 32 bits of
        its epochs (a restarted worker is a new shard)."""
        if not 0 <= shard <= SHARD_ID_MAX:
            raise ValueError(f"shard {shard} does not fit the epoch's high 32 bits")
        super().__init__(shard << EPOCH_COUNTER_BITS)
        self.relay = relay
        self.shard = shard
        self.stats = relay.stats
        options = relay.options
        self._remote_links: dict[RemotePeer, set[ServerConnection]] = {}
        self._waiting: set[ServerConnection] = set()  # connections waiting for an answer
        self._wanting: dict[bytes, set[ServerConnection]] = {}  # key -> local holders of a slot
        self._bus: list[tuple[ShardId, tuple]] = []
        # The DATA message send_data may still add payloads to, while it is
        # the last in _bus: [bus entry, connection, remote, payloads, bytes].
        self._open_data: list | None = None
        # Keys whose SET arrived since the last take_bus: their REQUESTED
        # holders WANT the newest entry once per batch, not once per SET.
        self._rewant: dict[bytes, None] = {}
        self._rewanted_at: dict[bytes, float] = {}  # key -> last round, oldest first
        self._oob_broadcast_budget = TokenBucket(
            options.oob_broadcast_rate_per_worker, options.oob_broadcast_rate_per_worker, 0.0
        )
        self._oob_broadcast_by_address = AddressBuckets(
            options.oob_broadcast_rate_per_ip, options.oob_broadcast_burst_per_ip
        )
        self._link_handlers: dict[int, Callable[[ShardId, tuple, float], None]] = {
            Link.WANT: self._on_want_or_linked,
            Link.LINKED: self._on_want_or_linked,
            Link.NOLINK: self._on_nolink,
            Link.UNLINK: self._on_unlink,
            Link.DATA: self._on_data,
            Link.OOB: self._on_oob,
            Link.OOB_FORWARDED: self._on_oob,
            Link.REPLY: self._on_reply,
        }

    # ------------------------------------------------------------------
    # Hooks: what the relay tells its neighbour
    # ------------------------------------------------------------------

    def confirmed(self, connection: ServerConnection) -> None:
        self._registry.append((Registry.REGISTER, connection.public_key, connection.epoch))

    def closed(self, connection: ServerConnection) -> None:
        """A confirmed connection was killed (its slots already released)."""
        self._mapped.discard(connection.epoch)
        self._registry.append((Registry.UNREGISTER, connection.public_key, connection.epoch))
        self._waiting.discard(connection)

    def slot_requested(self, connection: ServerConnection, public_key: bytes) -> None:
        self._wanting.setdefault(public_key, set()).add(connection)

    def request_remote(self, connection: ServerConnection, public_key: bytes, now: float) -> None:
        """No connection of ``public_key`` here (R-ROUTE-6): when the replica
        maps it to another shard, ask that shard and wait for its answer."""
        remote = self.directory.get(public_key)
        if remote is not None:
            self._send_want(connection, remote)
            connection.waiting_for = remote
            connection.waiting_since = now
            self._waiting.add(connection)

    def slot_released(self, connection: ServerConnection, slot: Slot) -> None:
        """The owner gives up ``slot`` (disconnect request or kill); a link to
        another shard ends with an UNLINK there (its owner gets the 03)."""
        holders = self._wanting.get(slot.public_key)
        if holders is not None:
            holders.discard(connection)
            if not holders:
                del self._wanting[slot.public_key]
        remote = slot.remote
        if remote is not None and slot.state is SlotState.LINKED:
            self._forget_remote_link(remote, connection)
            self._send_link(Link.UNLINK, connection.public_key, connection.epoch, remote)  # type: ignore[arg-type]
            slot.unlink()

    def take_over(self, connection: ServerConnection, index: int) -> None:
        """``connection``'s slot ``index`` is still linked to a connection of
        its key on another shard, which a local one replaced (R-CONF-3; its
        SET / UNLINK has not come yet): that link ends first (03), then the
        relay links the new one (R-ROUTE-6)."""
        old = connection.slots[index].remote  # type: ignore[union-attr]
        assert old is not None
        self._send_link(Link.UNLINK, connection.public_key, connection.epoch, old)  # type: ignore[arg-type]
        self._end_remote_link(connection, index, old)

    def send_data(
        self, connection: ServerConnection, remote: RemotePeer, payloads: list[bytes]
    ) -> None:
        """Routed data for a client on another shard, in order. Frames of one
        link with nothing else queued after them travel in one DATA message
        (its last field is the list of payloads, at most DATA_MESSAGE_BYTES of
        them): one lookup and one link check per message on the receiving
        shard. ``payloads`` is the caller's to give away."""
        bus = self._bus
        open_message = self._open_data
        size = sum(map(len, payloads))
        if (
            open_message is not None
            and bus
            and bus[-1] is open_message[0]
            and open_message[1] is connection
            and open_message[2] is remote
            and open_message[4] + size <= DATA_MESSAGE_BYTES
        ):
            open_message[3].extend(payloads)
            open_message[4] += size
            return
        if size > DATA_MESSAGE_BYTES and len(payloads) > 1:  # a long read: a few messages
            part: list[bytes] = []
            part_size = 0
            for payload in payloads:
                if part and part_size + len(payload) > DATA_MESSAGE_BYTES:
                    self.send_data(connection, remote, part)
                    part, part_size = [], 0
                part.append(payload)
                part_size += len(payload)
            self.send_data(connection, remote, part)
            return
        entry = (
            remote.shard,
            (
                Link.DATA, connection.public_key, connection.epoch,
                remote.public_key, remote.epoch, payloads,
            ),
        )  # fmt: skip
        bus.append(entry)
        self._open_data = [entry, connection, remote, payloads, size]

    def send_oob(
        self, connection: ServerConnection, destination: bytes, data: bytes, now: float
    ) -> None:
        """An OOB for a key not held here (R-OOB-2, R-OOB-3)."""
        sender = connection.public_key
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

    def reply_elsewhere(self, path: ReturnPath, plain: bytes) -> bool:
        """A UDP reply whose return path names another shard goes there over
        the bus (False: it is for one of ours)."""
        if path.shard == self.shard:
            return False
        if path.shard in self._dropped_shards:
            self.stats["dropped.reply_stale"] += 1  # that shard is gone, and its clients
        else:
            # Not only to peer_shards: a shard that started a moment ago may not
            # be listed there yet. A dead shard's id stops here once its
            # DROP_SHARD is in; until then the bus bounds what queues for it.
            self.stats["onion.replies_to_other_shards"] += 1
            self._bus.append((path.shard, (Link.REPLY, path.epoch, plain)))
        return True

    def tick(self, now: float) -> None:
        """Timers: forget dead epochs, end doomed links, stop waiting for a
        shard that does not answer, forget re-WANT rounds."""
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
        self._oob_broadcast_by_address.forget_refilled(now)
        rewanted = self._rewanted_at
        while rewanted and next(iter(rewanted.values())) <= now - REWANT_INTERVAL:
            del rewanted[next(iter(rewanted))]

    def check_invariants(self) -> None:
        for connection in self._waiting:
            if connection.state is not ConnectionState.CONFIRMED or connection.waiting_for is None:
                raise InvariantBroken(f"{connection!r} waits but cannot be answered")

    # ------------------------------------------------------------------
    # The adapter's side: bus, registry, replica
    # ------------------------------------------------------------------

    def take_bus(self, now: float) -> list[tuple[ShardId, tuple]]:
        """(destination shard, link message) pairs produced since the last call."""
        if self._rewant:
            self._send_rewants(now)
        bus, self._bus = self._bus, []
        return bus

    def held_round_due(self) -> float | None:
        """When the earliest round of re-WANTs held back by its pacing may go
        (the next take_bus at or after it sends it); None when none is held."""
        if not self._rewant:
            return None
        rewanted = self._rewanted_at
        return min(rewanted.get(key, 0.0) + REWANT_INTERVAL for key in self._rewant)

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
            if last is not None and now < last + REWANT_INTERVAL:  # as held_round_due says
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

    def _local(self, public_key: bytes, epoch: Epoch, packets: int = 1) -> ServerConnection | None:
        """The local connection with this key *and* epoch; None means stale
        (the message's ``packets`` are counted as dropped)."""
        connection = self.relay.by_key.get(public_key)
        if connection is None or connection.epoch != epoch:
            self.stats["dropped.stale_epoch"] += packets
            return None
        return connection

    def receive_link(self, from_shard: ShardId, message: tuple, now: float) -> None:
        """A link message from another shard (handlers are idempotent)."""
        handler = self._link_handlers.get(message[0])
        if handler is not None:
            handler(from_shard, message, now)
        self.relay.settle()

    def _on_data(self, from_shard: ShardId, message: tuple, now: float) -> None:
        """Routed data over a link (R-DATA-4): only the link's own two epochs.
        The message's last field holds the payloads, in order."""
        _, from_pk, from_epoch, to_pk, to_epoch, payloads = message
        connection = self._local(to_pk, to_epoch, len(payloads))
        if connection is None:
            return
        index = connection.slot_of_key.get(from_pk)
        slot = connection.slots[index] if index is not None else None
        remote = slot.remote if slot is not None else None
        if remote is None or remote.epoch != from_epoch or remote.shard != from_shard:
            self.stats["dropped.stale_link"] += len(payloads)
            return
        self.relay.deliver_routed(connection, index + NUM_RESERVED_PORTS, payloads)  # type: ignore[operator]

    def _on_want_or_linked(self, from_shard: ShardId, message: tuple, now: float) -> None:
        kind, from_pk, from_epoch, to_pk, to_epoch = message
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
            connection = self.relay.by_key.get(to_pk)
            if connection is not None and connection.epoch == to_epoch:
                self._answer_arrived(connection, remote, now)
            return
        self._linked_by_remote(remote, to_pk, to_epoch, answer=kind == Link.WANT, now=now)

    def _on_nolink(self, from_shard: ShardId, message: tuple, now: float) -> None:
        _, from_pk, from_epoch, to_pk, to_epoch = message
        connection = self._local(to_pk, to_epoch)
        if connection is not None:
            self._answer_arrived(connection, RemotePeer(from_shard, from_pk, from_epoch), now)

    def _on_unlink(self, from_shard: ShardId, message: tuple, now: float) -> None:
        _, from_pk, from_epoch, to_pk, to_epoch = message
        self._end_remote_links(RemotePeer(from_shard, from_pk, from_epoch), only=(to_pk, to_epoch))

    def _on_reply(self, from_shard: ShardId, message: tuple, now: float) -> None:
        _, to_epoch, plain = message
        self.relay.deliver_reply(to_epoch, plain)

    def _on_oob(self, from_shard: ShardId, message: tuple, now: float) -> None:
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
        connection = self.relay.by_key.get(to_pk)
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
        self.relay.deliver(connection, oob_receive(from_pk, data))  # R-OOB-2

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
        self.relay.notify_linked(connection, index)  # R-ROUTE-6
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
        self.relay.resume(connection, now)

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
        self.relay.notify_unlinked(connection, index)
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
