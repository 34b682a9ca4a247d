"""The worker's side of the coordinator protocol, on an asyncio loop.

Moves the messages of ``coordinator.replica.Replica`` (the shard's replica
of the routing map, sans-IO) between the coordinator's sockets and the
shard, sends the shard's REGISTER / UNREGISTER events (paced) and a
heartbeat every second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

import zmq

from coordinator.pacing import Pacer
from coordinator.replica import Replica, ReplicaHandler, Reregister, SnapshotRequest
from runtime.ipc import pack, router_endpoint, unpack, updates_endpoint

log = logging.getLogger("coordinator.client")

HEARTBEAT_INTERVAL = 1.0
MAX_PENDING_EVENTS = 1_000_000
# Registry events messages: EVENTS_BURST in a row leave at once, then at most
# one per EVENTS_MIN_INTERVAL seconds (the rest wait and go together); see
# CoordinatorClient.send_events and coordinator.pacing.
EVENTS_MIN_INTERVAL = 0.005
EVENTS_BURST = 10
# Plain ints: `flags & zmq.POLLIN` on the enum goes through Flag.__and__ and
# EnumType.__call__ (5% of a peer worker's samples under a handshake load).
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


class CoordinatorHandler(ReplicaHandler):
    """What the client calls on the shard (implemented by the worker): the
    replica's calls, and these two."""

    def snapshot_requested(self, request: int, events_delivered: bool) -> None: ...
    def after_input(self) -> None: ...  # flush what the updates produced


class CoordinatorClient:
    def __init__(
        self,
        runtime_dir: Path,
        shard: int,
        loop: asyncio.AbstractEventLoop,
        handler: CoordinatorHandler,
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
        self.replica = Replica(handler)
        self._pending_events: list[tuple] = []
        self._events_flush: asyncio.Handle | None = None  # a flush_events to come
        self._events_pacer = Pacer(EVENTS_MIN_INTERVAL, EVENTS_BURST)
        self.events_dropped = 0
        self.message_errors = 0
        self.on_error = on_error or self._count_error
        self._timer: asyncio.TimerHandle | None = None
        for sock in (self.dealer, self.subscriber):
            loop.add_reader(sock.getsockopt(zmq.FD), self._readable)

    def start(self) -> None:
        self._send(["hello", self.shard])
        self.replica.start(self.loop.time())
        self._send_requests()
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
            self.replica.timer(self.loop.time())
            self._send_requests()
        except Exception:
            self.on_error("coordinator_heartbeat")
        finally:
            self._timer = self.loop.call_later(HEARTBEAT_INTERVAL, self._heartbeat)

    @property
    def resyncs(self) -> int:
        return self.replica.resyncs

    @property
    def syncing(self) -> bool:
        return self.replica.syncing

    def _send_requests(self) -> None:
        """What the replica asks for, in order, on the one DEALER: a snapshot
        request goes behind our registry events, so it reflects every
        REGISTER sent before (the shard is told which, by the request's
        number, so that a resync can end a connection that the map replaced
        in an update it skipped: R-CONF-3)."""
        for request in self.replica.take_requests():
            if isinstance(request, Reregister):
                self._pending_events = list(request.events)  # (they cover the rest)
                self.flush_events()
            elif isinstance(request, SnapshotRequest):
                self.flush_events()  # what is still pending goes first, if it can
                delivered = not self._pending_events and not self.events_dropped
                self.handler.snapshot_requested(request.number, delivered)
                self._send(["snapshot", request.number])

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
                # Asked, not tried: a recv that finds nothing raises zmq.Again,
                # ~2.8 us to build, against ~1.1 us for EVENTS (both sockets,
                # every wake-up: a publication is one).
                try:
                    if not sock.get(_EVENTS) & _POLLIN:
                        break
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

    def _on_publication(self, message: list) -> None:
        self.replica.publication(message, self.loop.time())
        self._send_requests()

    def _on_reply(self, message: list) -> None:
        if message[0] == "snapshot":
            self.replica.snapshot(message, self.loop.time())
            self._send_requests()

    def close(self, linger_ms: int = 0) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.flush_events()
        for sock in (self.dealer, self.subscriber):
            with contextlib.suppress(zmq.ZMQError, ValueError):
                self.loop.remove_reader(sock.getsockopt(zmq.FD))
        self.subscriber.close()
        self.dealer.close(linger=linger_ms)
