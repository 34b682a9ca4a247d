"""The routing map as one shard of a cluster follows it: the replica of the
other shards' keys (``directory``), the shard's own registrations, its
epochs, and what each map update means for the links (``relaycore.shardlink``
names the messages; ``coordinator.replica.Replica`` delivers them in order).

``ShardMap`` is the map side of ``relaycore.crossshard.CrossShard``, which
holds the link state these methods act on (``_remote_links``, ``_waiting``,
``_wanting``) and the link helpers they call (``_send_link``,
``_end_remote_links``, ``_stop_waiting``): a map update ends, dooms or
re-requests links, and never makes one itself.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Sequence
from operator import itemgetter
from typing import TYPE_CHECKING

from relaycore.connection import ServerConnection
from relaycore.errors import ProtocolViolation
from relaycore.shardlink import (
    EPOCH_COUNTER_MAX,
    Epoch,
    Link,
    MapUpdate,
    Registry,
    RemotePeer,
    ShardId,
)

if TYPE_CHECKING:
    from relaycore.relay import RelayServer

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
# ``forget_dead`` forgets each dead epoch at its deadline, in order, from a
# queue; the deadline kept in ``_dead`` itself is this much later, a backstop
# for ``CrossShard.tick``, which finds the oldest entries of the dict by
# iterating it: CPython keeps a hole per deleted entry until the dict is
# rebuilt, so each such lookup costs the deletions before it, and a tick that
# forgot a second of a busy cluster's DELs that way spent milliseconds (22% of
# a peer worker's CPU under `cluster loadtest handshake`). The replica calls
# ``forget_dead`` with every batch of updates and every coordinator heartbeat
# (0.5 s), so the tick's loop only meets unexpired entries.
DEAD_EPOCH_BACKSTOP = 2.0
# Snapshot requests remembered until their answer (one is usually outstanding).
MAX_SNAPSHOT_REQUESTS = 16


def _remote_peer_maker() -> Callable[[ShardId, bytes, Epoch], RemotePeer]:
    """``RemotePeer(shard, public_key, epoch)`` for the map updates, which make
    one per SET and per DEL of every connection of the cluster: a frozen
    dataclass's ``__init__`` sets each field through ``object.__setattr__``
    (0.6 us, the largest part of applying an update); this fills its slots
    directly (0.35 us). The same object; the plain constructor where
    ``RemotePeer`` has no slots to fill."""
    try:
        fields = (RemotePeer.shard.__set__, RemotePeer.public_key.__set__, RemotePeer.epoch.__set__)  # type: ignore[attr-defined]
    except AttributeError:
        return RemotePeer
    set_shard, set_public_key, set_epoch = fields
    new = object.__new__

    def remote_peer(shard: ShardId, public_key: bytes, epoch: Epoch) -> RemotePeer:
        remote = new(RemotePeer)
        set_shard(remote, shard)
        set_public_key(remote, public_key)
        set_epoch(remote, epoch)
        return remote

    return remote_peer


_remote_peer = _remote_peer_maker()


class DeadEpochs(dict[Epoch, float]):
    """The remote connections the map says were replaced or ended: epoch ->
    the backstop deadline (see DEAD_EPOCH_BACKSTOP). Keyed by the epoch
    alone, which names one connection in the whole cluster (its shard is its
    high bits, and a connection never changes its key): an int hashes in C
    where a RemotePeer's dataclass ``__hash__`` is Python, and the DEL of a
    key that nobody here wants needs no RemotePeer at all. ``remote in dead``
    asks by the RemotePeer's epoch (``CrossShard._on_want_or_linked``)."""

    __slots__ = ()

    def __contains__(self, remote: object) -> bool:
        return dict.__contains__(self, getattr(remote, "epoch", remote))


class ShardMap:
    """The map side of a shard's cross-shard part (see the module docstring)."""

    relay: RelayServer
    shard: ShardId
    stats: Counter[str]
    _remote_links: dict[RemotePeer, set[ServerConnection]]
    _waiting: set[ServerConnection]
    _wanting: dict[bytes, set[ServerConnection]]
    _rewant: dict[bytes, None]
    _send_link: Callable[[Link, bytes, Epoch, RemotePeer], None]
    _end_remote_links: Callable[..., None]
    _stop_waiting: Callable[[ServerConnection, float], None]

    def __init__(self, epoch_base: Epoch) -> None:
        self._epoch_base = epoch_base
        self._epoch_serial = 0  # a connection gets a new epoch when our keys were dropped
        self.directory: dict[bytes, RemotePeer] = {}  # replica of the routing map, other shards
        self.peer_shards: set[ShardId] = set()  # the other live shards (coordinator's view)
        self._doomed: dict[RemotePeer, float] = {}
        self._dropped_shards: set[ShardId] = set()  # DROP_SHARD seen, no SET since
        self._dead = DeadEpochs()  # replaced / ended -> backstop deadline
        # (deadline, epoch) in the order noted; an entry whose epoch was
        # noted again or revived (SET) since is stale and skipped.
        self._dead_order: deque[tuple[float, Epoch]] = deque()
        self._dead_slots = 0  # entries put in _dead since it was last rebuilt
        self._mapped: set[Epoch] = set()  # our connections whose SET we have seen
        # Our epochs only grow and each REGISTER is queued as its epoch is
        # given: every epoch up to this one has had its REGISTER taken.
        self._registered_upto: Epoch = 0
        self._snapshot_marks: dict[int, Epoch] = {}  # request -> _registered_upto then
        self._registry: list[tuple] = []
        self._map_handlers: dict[int, Callable[[tuple, float], None]] = {
            MapUpdate.SET: self._on_set,
            MapUpdate.DEL: self._on_del,
            MapUpdate.DROP_SHARD: self._on_drop_shard,
        }

    def next_epoch(self) -> Epoch:
        """The epoch of a connection being confirmed; refused (the relay kills
        it before anything changes) when one more would carry into the shard
        bits, another shard's epochs: the worker is replaced before that."""
        if self._epoch_serial >= EPOCH_COUNTER_MAX:
            raise ProtocolViolation("epochs_exhausted")
        self._epoch_serial += 1
        return self._epoch_base | self._epoch_serial

    def _renewed_epoch(self) -> Epoch:
        self._epoch_serial += 1
        return self._epoch_base | self._epoch_serial

    @property
    def epochs_left(self) -> int:
        """Confirmations this shard can still give a cluster-unique epoch."""
        return EPOCH_COUNTER_MAX - self._epoch_serial

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
        return [(key, connection.epoch) for key, connection in self.relay.by_key.items()]

    def set_peer_shards(self, shards: list[ShardId], now: float) -> None:
        """The live shards of the cluster, as the coordinator last listed them
        in its heartbeat (every 0.5 s: also when dead epochs are forgotten
        while no updates come)."""
        self.peer_shards = {shard for shard in shards if shard != self.shard}
        self.forget_dead(now)

    def apply_map_update(self, update: Sequence, now: float) -> None:
        """One sequenced update of the routing map from the coordinator."""
        self.apply_map_updates((update,), now)

    def apply_map_updates(self, updates: Sequence[Sequence], now: float) -> None:
        """Consecutive sequenced updates of the routing map, in order, as one
        call (the replica passes a publication's batch): the per-call work --
        dispatch, ``settle``, forgetting dead epochs -- is paid once per batch.

        A plain SET or DEL (no R-CONF-3 kill) only changes the replica and
        the link bookkeeping (dooms, re-WANTs, dead epochs): it writes nothing
        to a connection and kills none, so nothing can pass output_hard_limit
        in it and ``settle`` after it would do nothing. An update that can
        (a SET that replaces one of ours, DROP_SHARD) is settled at once, as
        every entry point is, before the next update of the batch."""
        self.forget_dead(now)
        on_set, on_del, handlers = self._on_set, self._on_del, self._map_handlers
        settle = self.relay.settle
        set_, del_ = MapUpdate.SET, MapUpdate.DEL
        for update in updates:
            kind = update[0]
            if kind == del_:
                on_del(update, now)
            elif kind == set_:
                on_set(update, now)
                if update[5] is not None:  # a replacement: may have killed one of ours
                    settle()
            else:
                handler = handlers.get(kind)
                if handler is not None:
                    handler(update, now)
                settle()
        settle()

    def _on_set(self, update: Sequence, now: float) -> None:
        """A key's connection registered (replacing another: R-CONF-3)."""
        _, public_key, shard, epoch, replaced_shard, replaced_epoch = update
        if replaced_epoch is not None:
            if replaced_shard == self.shard:  # R-CONF-3 across shards: newest wins
                old = self.relay.by_key.get(public_key)
                if old is not None and old.epoch == replaced_epoch:
                    self.relay.kill(old, "R-CONF-3")
            else:
                self._note_dead(replaced_epoch, now)
                if public_key in self._wanting:  # (a link to it needs a slot for its key)
                    self._doom(_remote_peer(replaced_shard, public_key, replaced_epoch), now)
        if shard == self.shard:
            # (Our own shard is never in _dropped_shards, our epochs never in _dead.)
            self.directory.pop(public_key, None)
            self._mapped.add(epoch)
            return
        if self._dropped_shards:
            self._dropped_shards.discard(shard)  # (dropped while alive, registers again)
        if self._dead:
            self._dead.pop(epoch, None)  # (the same: alive; its queue entry is stale)
        self.directory[public_key] = _remote_peer(shard, public_key, epoch)
        if public_key in self._wanting:
            self._rewant[public_key] = None  # WANTed at take_bus (_send_rewants)

    def _on_del(self, update: Sequence, now: float) -> None:
        """A key's connection ended. Its epoch is remembered as dead for any
        key (a client here may ask for the key after this, and a WANT its
        connection sent before it ended may come after that); links to it
        can only be held by our clients with a slot for its key (``_wanting``),
        so for any other key (most of them) that is all."""
        _, public_key, shard, epoch = update
        current = self.directory.get(public_key)
        if current is not None and current.epoch == epoch:
            del self.directory[public_key]
        if shard != self.shard:
            self._note_dead(epoch, now)
            if public_key in self._wanting:
                if current is None or current.epoch != epoch:
                    current = _remote_peer(shard, public_key, epoch)
                self._doom(current, now)

    def _on_drop_shard(self, update: tuple, now: float) -> None:
        """Every key of a shard that died or fell silent is gone."""
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
                self._note_dead(remote.epoch, now)
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
        for key, epoch in self.relay.renew_epochs(self._renewed_epoch):
            self._registry.append((Registry.REGISTER, key, epoch))
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
            for key, connection in list(self.relay.by_key.items()):
                entry = listed.get(key)
                if (
                    reflected(connection)
                    and entry is not None
                    and entry != (self.shard, connection.epoch)
                ):
                    self.relay.kill(connection, "R-CONF-3")
            # A reflected connection of ours that the snapshot lacks can only
            # have gone with our DROP_SHARD (a DEL follows our own UNREGISTER):
            # that is the update we missed; do what it would have made us do.
            dropped = any(
                reflected(connection) and key not in listed
                for key, connection in self.relay.by_key.items()
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
                    for key, connection in self.relay.by_key.items()
                    if key not in listed
                )
        for public_key, remote in snapshot.items():
            if self.directory.get(public_key) != remote:
                self._on_set(
                    (MapUpdate.SET, public_key, remote.shard, remote.epoch, None, None), now
                )
        self.relay.settle()

    def _note_dead(self, epoch: Epoch, now: float) -> None:
        """The map says the remote connection ``epoch`` was replaced or has
        ended: refuse its link messages for DEAD_EPOCH_MEMORY seconds (see
        there)."""
        dead = self._dead
        until = now + DEAD_EPOCH_MEMORY + DEAD_EPOCH_BACKSTOP
        dead[epoch] = until  # (noted again: its earlier queue entry is stale)
        self._dead_slots += 1
        order = self._dead_order
        order.append((until, epoch))
        if len(dead) > MAX_DEAD_EPOCHS:
            self._forget_oldest_dead()
        elif len(order) > 2 * MAX_DEAD_EPOCHS:
            self._rebuild_dead()  # many stale entries (epochs noted again)

    def forget_dead(self, now: float) -> None:
        """Forget the dead epochs whose DEAD_EPOCH_MEMORY has passed: O(1)
        per entry, and the dict is rebuilt once half of it is holes."""
        dead, order = self._dead, self._dead_order
        due = now + DEAD_EPOCH_BACKSTOP
        while order and order[0][0] <= due:
            until, epoch = order.popleft()
            if dead.get(epoch) == until:  # (else noted again, or alive)
                del dead[epoch]
        if self._dead_slots > 2 * len(dead) + 64:
            self._rebuild_dead()

    def _forget_oldest_dead(self) -> None:
        dead, order = self._dead, self._dead_order
        while order:
            until, epoch = order.popleft()
            if dead.get(epoch) == until:
                del dead[epoch]
                return

    def _rebuild_dead(self) -> None:
        """A new dict without the holes of deleted entries, oldest first, and
        the queue without stale entries (an epoch noted again keeps its place
        in the dict, with the later deadline)."""
        self._dead = DeadEpochs(sorted(self._dead.items(), key=itemgetter(1)))
        self._dead_slots = len(self._dead)
        self._dead_order = deque((until, epoch) for epoch, until in self._dead.items())

    def _doom(self, remote: RemotePeer, now: float) -> None:
        """The map says ``remote`` is gone. Its own shard sends UNLINK over the
        bus, ordered after the data it relayed just before; the map update may
        overtake both, so links to it end only if still there after a grace
        period (a backup for an UNLINK the bus dropped)."""
        if remote in self._remote_links:
            self._doomed[remote] = now + UNLINK_GRACE
