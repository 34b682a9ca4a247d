"""A shard's replica of the routing map (Clone pattern), sans-IO.

The replica subscribes to the coordinator's sequenced updates first, then
asks for a snapshot, and applies the updates that follow it in sequence:

* a gap in the sequence (a lost update, a heartbeat naming a later sequence)
  buffers what comes and asks for a new snapshot, which replaces the replica;
* a new coordinator incarnation (a restart, whose map starts empty) makes the
  shard register every live client again, then merges the new snapshot into
  the replica without ending any link (it may still be filling up); once
  every shard has had time to register again (MERGE_CHECK_DELAY), a full
  snapshot replaces the replica: an entry that no shard registered again
  (its client left while the coordinator was away, and no DEL will ever
  say so) goes, and links to it end;
* snapshot requests are numbered, so that the shard knows which of its own
  REGISTERs a snapshot reflects (R-CONF-3 after a gap: see
  ``CrossShard.snapshot_requested``), and only the answer to the latest one
  is used: an earlier answer read after updates that followed it would roll
  the replica back and lose them, and one answering a request made before a
  coordinator restart would replace, not merge;
* a snapshot not answered within SNAPSHOT_RETRY is asked for again: a replica
  must never stay "syncing".

It holds no socket and no clock: the caller passes each message it received
and ``now``, and sends what ``take_requests`` returns, in order, on the one
channel of its registry events. ``coordinator.client.CoordinatorClient`` does
that over ZeroMQ; the cluster model test (tests/cluster_model) over FIFO queues.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

from relaycore.shardlink import Registry

log = logging.getLogger("coordinator.replica")

# Updates held while a snapshot is awaited; more fetch a new snapshot instead.
MAX_BUFFERED_UPDATES = 200_000
# A snapshot request not answered within this (it could not be sent, or the
# answer was lost) is made again.
SNAPSHOT_RETRY = 3.0  # seconds
# Seconds after a merged snapshot (coordinator restart) until the full one
# that drops what nobody registered again. Shards register again as soon as
# they read the new coordinator's first heartbeat, which all get at once.
MERGE_CHECK_DELAY = 3.0


class ReplicaHandler(Protocol):
    """What the replica calls on the shard's relay table."""

    def apply_map_update(self, update: tuple, now: float) -> None: ...
    def apply_map_updates(self, updates: list, now: float) -> None: ...
    def reset_directory(
        self, entries: list, merge: bool, request: int | None, now: float
    ) -> None: ...
    def registrations(self) -> list[tuple[bytes, int]]: ...
    def set_peer_shards(self, shards: list[int], now: float) -> None: ...


@dataclass(frozen=True, slots=True)
class SnapshotRequest:
    """Ask the coordinator for snapshot ``number``, behind every registry event
    sent before (the caller tells the shard: ``snapshot_requested``)."""

    number: int


@dataclass(frozen=True, slots=True)
class Reregister:
    """The coordinator restarted: these REGISTER events replace whatever
    events are still unsent, and go before the next request."""

    events: list[tuple]


Request = SnapshotRequest | Reregister


class Replica:
    """The replica's state machine; see the module docstring."""

    def __init__(self, handler: ReplicaHandler) -> None:
        self.handler = handler
        self.coordinator: int | None = None  # the incarnation last heard from
        self.last_sequence = 0
        self.syncing = False
        self.merge_next_snapshot = False
        self.resyncs = 0
        self.stale_snapshots = 0  # answers to a request that a later one replaced
        self.snapshot_requests = 0  # the number of the last snapshot request
        self._snapshot_asked_at = 0.0
        self._check_merge_at: float | None = None  # when the full snapshot is due
        self._buffered: list[tuple[int, tuple]] = []
        self._requests: list[Request] = []

    def start(self, now: float) -> None:
        """The first snapshot (the caller has subscribed to the updates)."""
        self._request_snapshot(False, now)

    def take_requests(self) -> list[Request]:
        """What to send to the coordinator, in order, since the last call."""
        requests, self._requests = self._requests, []
        return requests

    def timer(self, now: float) -> None:
        """About once a second: ask again for a snapshot not answered in time;
        the full snapshot due after a merge."""
        if self.syncing:
            if now - self._snapshot_asked_at > SNAPSHOT_RETRY:
                log.warning("no snapshot %d yet: asking again", self.snapshot_requests)
                self._request_snapshot(False, now)
        elif self._check_merge_at is not None and now >= self._check_merge_at:
            log.info("coordinator restarted %.0f s ago: full snapshot", MERGE_CHECK_DELAY)
            self._request_snapshot(False, now)

    def publication(self, message: list, now: float) -> None:
        """A message of the coordinator's PUB socket: a heartbeat
        ``["hb", incarnation, sequence, live shards]`` or a batch of updates
        ``["u", incarnation, [[sequence, update], ...]]``."""
        kind = message[0]
        if kind == "hb":
            _, incarnation, sequence, shards = message
            self._coordinator_seen(incarnation, now)
            self.handler.set_peer_shards(shards, now)
            if not self.syncing and sequence > self.last_sequence:
                log.info("missed map updates (%d > %d): resync", sequence, self.last_sequence)
                self._request_snapshot(False, now)
        elif kind == "u":
            _, incarnation, updates = message
            self._coordinator_seen(incarnation, now)
            if not self.syncing and self._apply_in_one_call(updates, now):
                return
            batch = [(sequence, tuple(update)) for sequence, update in updates]
            if self.syncing:
                self._buffered.extend(batch)
                if len(self._buffered) > MAX_BUFFERED_UPDATES:
                    self._buffered = []
                    self._request_snapshot(False, now)
                return
            self._apply(batch, now)

    def snapshot(self, message: list, now: float) -> None:
        """The answer ``["snapshot", incarnation, sequence, entries, request]``."""
        _, incarnation, sequence, entries, request = message
        if self._coordinator_seen(incarnation, now):
            return  # a fresher snapshot is on its way
        if not self.syncing or request != self.snapshot_requests:
            self.stale_snapshots += 1  # the latest request's answer follows
            return
        merge = self.merge_next_snapshot
        self.handler.reset_directory([tuple(entry) for entry in entries], merge, request, now)
        self._check_merge_at = now + MERGE_CHECK_DELAY if merge else None
        self.merge_next_snapshot = False
        self.syncing = False
        self.last_sequence = sequence
        buffered, self._buffered = self._buffered, []
        self._apply(buffered, now)

    def _coordinator_seen(self, incarnation: int, now: float) -> bool:
        """True when this is a new coordinator (restart): re-register, merge."""
        if self.coordinator == incarnation:
            return False
        restarted = self.coordinator is not None
        self.coordinator = incarnation
        if restarted:
            log.warning("coordinator restarted: re-registering and resyncing")
            self.last_sequence = 0
            self._buffered = []
            events = [
                (Registry.REGISTER, key, epoch) for key, epoch in self.handler.registrations()
            ]
            self._requests.append(Reregister(events))
            self._request_snapshot(True, now)
        return restarted

    def _apply_in_one_call(self, updates: list, now: float) -> bool:
        """The common case: a publication whose updates are exactly the next
        ones in sequence goes to the handler in one call (its per-call work
        paid once per batch, not once per update: with N workers every
        connection's SET and DEL reach N - 1 replicas). False, having done
        nothing, for anything else (a gap, an update seen before, a message
        that is not a list of [sequence, update] pairs): ``_apply`` sorts it
        out update by update. Should the handler raise in the middle, the
        replica takes none of the batch as applied: the next update is a gap,
        and a snapshot replaces whatever part was."""
        first = self.last_sequence + 1
        try:
            sequences, batch = zip(*updates, strict=True)
        except (TypeError, ValueError):
            return False  # (not pairs, or no updates)
        if sequences != tuple(range(first, first + len(sequences))):
            return False
        self.handler.apply_map_updates(list(batch), now)
        self.last_sequence = sequences[-1]
        return True

    def _apply(self, updates: list[tuple[int, tuple]], now: float) -> None:
        for index, (sequence, update) in enumerate(updates):
            if sequence <= self.last_sequence:
                continue
            if sequence != self.last_sequence + 1:
                self._buffered = list(updates[index:])
                self._request_snapshot(False, now)
                return
            self.handler.apply_map_update(update, now)
            self.last_sequence = sequence

    def _request_snapshot(self, merge: bool, now: float) -> None:
        self.syncing = True
        self.merge_next_snapshot = self.merge_next_snapshot or merge
        self.resyncs += 1
        self.snapshot_requests += 1
        self._snapshot_asked_at = now
        self._requests.append(SnapshotRequest(self.snapshot_requests))
