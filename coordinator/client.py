"""The worker's side of the coordinator protocol, on an asyncio loop.

Keeps the shard's replica of the routing map current (Clone pattern):
subscribe to the updates first, then fetch a snapshot and apply the buffered
updates that follow it; a gap in the sequence fetches a new snapshot; a new
coordinator incarnation (restart) makes the shard re-register every live
client and merge the new snapshot without ending any link. Sends the shard's
REGISTER / UNREGISTER events and a heartbeat every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import zmq

from coordinator.pacing import Pacer
from coordinator.service import pack, router_endpoint, unpack, updates_endpoint
from relaycore.shardlink import Registry

log = logging.getLogger("coordinator.client")

HEARTBEAT_INTERVAL = 1.0
MAX_BUFFERED_UPDATES = 200_000
MAX_PENDING_EVENTS = 1_000_000
# A snapshot request not answered within this (it could not be sent, or the
# answer was lost) is made again: a worker must never stay in "syncing".
SNAPSHOT_RETRY = 3.0  # seconds
# Registry events messages: EVENTS_BURST in a row leave at once, then at most
# one per EVENTS_MIN_INTERVAL seconds (the rest wait and go together); see
# CoordinatorClient.send_events and coordinator.pacing.
EVENTS_MIN_INTERVAL = 0.005
EVENTS_BURST = 10


class ReplicaHandler:
    """What the client calls on the shard (implemented by the worker)."""

    def apply_map_update(self, update: tuple) -> None: ...
    def reset_directory(self, entries: list, merge: bool, request: int | None) -> None: ...
    def snapshot_requested(self, request: int, events_delivered: bool) -> None: ...
    def registrations(self) -> list[tuple[bytes, int]]: ...
    def set_peer_shards(self, shards: list[int]) -> None: ...
    def after_input(self) -> None: ...  # flush what the updates produced


class CoordinatorClient:
    def __init__(
        self,
        runtime_dir: Path,
        shard: int,
        loop: asyncio.AbstractEventLoop,
        handler: ReplicaHandler,
        context: zmq.Context | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """``on_error(where)`` is called from an ``except`` block for an
        exception a message raised (it is skipped; default: counted as
        ``message_errors``)."""
        self.shard = shard
        self.loop = loop
        self.handler = handler
        context = context or zmq.Context.instance()
        self.dealer = context.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.LINGER, 0)
        self.dealer.setsockopt(zmq.SNDHWM, 100_000)
        self.dealer.connect(router_endpoint(runtime_dir))
        self.subscriber = context.socket(zmq.SUB)
        self.subscriber.setsockopt(zmq.LINGER, 0)
        self.subscriber.setsockopt(zmq.RCVHWM, 100_000)
        self.subscriber.setsockopt(zmq.SUBSCRIBE, b"")
        self.subscriber.connect(updates_endpoint(runtime_dir))
        self.coordinator: int | None = None
        self.last_sequence = 0
        self.syncing = False
        self.merge_next_snapshot = False
        self._buffered: list[tuple[int, tuple]] = []
        self._pending_events: list[tuple] = []
        self._events_flush: asyncio.Handle | None = None  # a flush_events to come
        self._events_pacer = Pacer(EVENTS_MIN_INTERVAL, EVENTS_BURST)
        self.resyncs = 0
        self._snapshot_requests = 0  # the number of the last snapshot request
        self._snapshot_asked_at = 0.0
        self.events_dropped = 0
        self.message_errors = 0
        self.on_error = on_error or self._count_error
        self._timer: asyncio.TimerHandle | None = None
        for sock in (self.dealer, self.subscriber):
            loop.add_reader(sock.getsockopt(zmq.FD), self._readable)

    def start(self) -> None:
        self._send(["hello", self.shard])
        self._request_snapshot(merge=False)
        self._timer = self.loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    # -- sending ---------------------------------------------------------------

    def _send(self, message: list) -> bool:
        try:
            self.dealer.send(pack(message), zmq.NOBLOCK)
        except zmq.Again:
            return False
        finally:
            self.loop.call_soon(self._readable)  # zmq's FD is edge-triggered
        return True

    def send_events(self, events: list[tuple]) -> None:
        """Queue REGISTER / UNREGISTER events; they leave together, in order,
        in one message: at the end of this event-loop turn, or, when more than
        EVENTS_BURST messages left in the last few EVENTS_MIN_INTERVAL, when
        the pacer allows the next one.

        A connection confirmed or closed used to cost a ZeroMQ send of its own,
        and a send to an idle pipe wakes libzmq's I/O thread: ~25 us on a quiet
        machine, 60 us of CPU and over 1 ms of wall time (preempted) on a busy
        one; 20% of a worker's samples under ``cluster loadtest handshake``.
        At a low rate an event still leaves at the end of its turn. Kept
        (bounded) while the socket is full."""
        if events:
            self._pending_events.extend(events)
        if self._pending_events and self._events_flush is None:
            wait = self._events_pacer.wait(self.loop.time())
            if wait > 0:
                self._events_flush = self.loop.call_later(wait, self.flush_events)
            else:
                self._events_flush = self.loop.call_soon(self.flush_events)

    def flush_events(self) -> None:
        """Send the queued events now, in order, as one message."""
        if self._events_flush is not None:
            self._events_flush.cancel()
            self._events_flush = None
        if not self._pending_events:
            return
        if self._send(["events", self.shard, self._pending_events]):
            self._events_pacer.sent(self.loop.time())
            self._pending_events = []
        elif len(self._pending_events) > MAX_PENDING_EVENTS:
            self.events_dropped += len(self._pending_events)
            self._pending_events = []
            log.error("coordinator unreachable: registry events dropped; will resync")

    def _heartbeat(self) -> None:
        try:
            self._send(["heartbeat", self.shard])
            self.flush_events()  # retries what a full socket held back
            if self.syncing and self.loop.time() - self._snapshot_asked_at > SNAPSHOT_RETRY:
                log.warning("no snapshot %d yet: asking again", self._snapshot_requests)
                self._request_snapshot(merge=False)
        except Exception:
            self.on_error("coordinator_heartbeat")
        finally:
            self._timer = self.loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    def _request_snapshot(self, merge: bool) -> None:
        """Ask for a snapshot, behind our registry events on the one DEALER:
        it reflects every REGISTER sent before (the shard is told which, by
        the request's number, so that a resync can end a connection that the
        map replaced in an update it skipped: R-CONF-3)."""
        self.syncing = True
        self.merge_next_snapshot = self.merge_next_snapshot or merge
        self.resyncs += 1
        self.flush_events()  # what is still pending goes first, if it can
        self._snapshot_requests += 1
        delivered = not self._pending_events and not self.events_dropped
        self.handler.snapshot_requested(self._snapshot_requests, delivered)
        self._snapshot_asked_at = self.loop.time()
        self._send(["snapshot", self._snapshot_requests])

    # -- receiving -------------------------------------------------------------

    def _count_error(self, where: str) -> None:
        self.message_errors += 1

    def _readable(self) -> None:
        """Drain both sockets (ZeroMQ's descriptor only signals a change: a
        reader that stopped early would not be woken again). A message that
        does not decode or whose handling raises is counted and skipped; a
        skipped map update shows as a gap, which fetches a snapshot."""
        for sock, handle in (
            (self.subscriber, self._on_publication),
            (self.dealer, self._on_reply),
        ):
            for _ in range(1000):
                try:
                    payload = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                except zmq.ZMQError:
                    return  # closed
                try:
                    handle(unpack(payload))
                except Exception:
                    self.on_error("coordinator_message")
            else:
                self.loop.call_soon(self._readable)  # more queued: come back
        try:
            self.handler.after_input()
        except Exception:
            self.on_error("coordinator_message")

    def _coordinator_seen(self, incarnation: int) -> bool:
        """True when this is a new coordinator (restart): re-register, merge."""
        if self.coordinator == incarnation:
            return False
        restarted = self.coordinator is not None
        self.coordinator = incarnation
        if restarted:
            log.warning("coordinator restarted: re-registering and resyncing")
            self.last_sequence = 0
            self._buffered = []
            self._pending_events = []
            self.send_events(
                [(Registry.REGISTER, key, epoch) for key, epoch in self.handler.registrations()]
            )
            self.flush_events()  # the re-registrations go before the snapshot request
            self._request_snapshot(merge=True)
        return restarted

    def _on_publication(self, message: list) -> None:
        kind = message[0]
        if kind == "hb":
            _, incarnation, sequence, shards = message
            self._coordinator_seen(incarnation)
            self.handler.set_peer_shards(shards)
            if not self.syncing and sequence > self.last_sequence:
                log.info("missed map updates (%d > %d): resync", sequence, self.last_sequence)
                self._request_snapshot(merge=False)
        elif kind == "u":
            _, incarnation, updates = message
            self._coordinator_seen(incarnation)
            if self.syncing:
                self._buffered.extend((seq, tuple(update)) for seq, update in updates)
                if len(self._buffered) > MAX_BUFFERED_UPDATES:
                    self._buffered = []
                    self._request_snapshot(merge=False)
                return
            self._apply([(seq, tuple(update)) for seq, update in updates])

    def _apply(self, updates: list[tuple[int, tuple]]) -> None:
        for index, (sequence, update) in enumerate(updates):
            if sequence <= self.last_sequence:
                continue
            if sequence != self.last_sequence + 1:
                self._buffered = list(updates[index:])
                self._request_snapshot(merge=False)
                return
            self.handler.apply_map_update(update)
            self.last_sequence = sequence

    def _on_reply(self, message: list) -> None:
        if message[0] != "snapshot":
            return
        _, incarnation, sequence, entries, request = message
        if self._coordinator_seen(incarnation):
            return  # a fresher snapshot is on its way
        self.handler.reset_directory(
            [tuple(entry) for entry in entries], self.merge_next_snapshot, request
        )
        self.merge_next_snapshot = False
        self.syncing = False
        self.last_sequence = sequence
        buffered, self._buffered = self._buffered, []
        self._apply(buffered)

    def close(self, linger_ms: int = 0) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush_events()
        for sock in (self.dealer, self.subscriber):
            with contextlib.suppress(zmq.ZMQError, ValueError):
                self.loop.remove_reader(sock.getsockopt(zmq.FD))
        self.subscriber.close()
        self.dealer.close(linger=linger_ms)
