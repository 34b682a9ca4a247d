"""The coordinator process: the routing map on ZeroMQ (the Clone pattern).

* ROUTER (``coordinator.sock``): workers send HELLO, EVENTS (REGISTER /
  UNREGISTER batches), HEARTBEAT and SNAPSHOT requests; the supervisor sends
  DROP when a worker process died.
* PUB (``updates.sock``): sequenced map updates in batches, and a heartbeat
  naming this coordinator's incarnation and last sequence number, so workers
  detect gaps (and fetch a snapshot) and restarts (and re-register).

The map is soft state: after a restart it is rebuilt from the workers'
re-registrations. Logic lives in ``coordinator.directory``; this module only
moves messages.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import time
from pathlib import Path

import msgpack
import zmq

from coordinator.directory import Directory
from coordinator.pacing import Pacer
from runtime.ipc import (
    bind_ipc,
    pack,
    router_endpoint,
    supervisor_endpoint,
    unpack,
    updates_endpoint,
)
from runtime.logs import configure_logging

log = logging.getLogger("coordinator")

HEARTBEAT_INTERVAL = 0.5  # seconds between PUB heartbeats
WORKER_SILENCE_LIMIT = 3.0  # a worker silent this long is dropped
# Map update publications: PUBLISH_BURST in a row leave at once, then at most
# one per PUBLISH_MIN_INTERVAL seconds; see _publish_due and coordinator.pacing.
PUBLISH_MIN_INTERVAL = 0.005
PUBLISH_BURST = 10
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # (ints: no Flag.__and__ per message)


class CoordinatorService:
    def __init__(self, runtime_dir: Path) -> None:
        self.runtime_dir = runtime_dir
        self.incarnation = int.from_bytes(os.urandom(4), "big")
        self.directory = Directory()
        self.last_seen: dict[int, float] = {}  # shard -> monotonic time of last message
        self.identities: dict[int, bytes] = {}
        self.exited: set[int] = set()  # shards whose process the supervisor saw end
        self.context = zmq.Context.instance()
        self.router = self.context.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.RCVHWM, 100_000)
        self.router.setsockopt(zmq.SNDHWM, 100_000)
        self.publisher = self.context.socket(zmq.PUB)
        self.publisher.setsockopt(zmq.LINGER, 0)
        self.publisher.setsockopt(zmq.SNDHWM, 100_000)
        self.reporter = self.context.socket(zmq.PUSH)  # stats for the supervisor
        self.reporter.setsockopt(zmq.LINGER, 0)
        self.reporter.setsockopt(zmq.SNDHWM, 10)
        self.reporter.connect(supervisor_endpoint(runtime_dir))
        bind_ipc(self.router, router_endpoint(runtime_dir))
        bind_ipc(self.publisher, updates_endpoint(runtime_dir))
        self.running = True
        self.updates_published = 0
        self._unpublished: list[tuple[int, tuple]] = []  # sequenced, not yet sent
        self._publish_pacer = Pacer(PUBLISH_MIN_INTERVAL, PUBLISH_BURST)
        self.parent = os.getppid()  # a coordinator whose supervisor died stops too

    def _publish(self, updates: list[tuple[int, tuple]]) -> None:
        """Queue sequenced updates; ``_flush_updates`` sends them."""
        self._unpublished += updates

    def _flush_updates(self) -> None:
        """Publish every queued update, in sequence order, as one "u" message.

        Called after each batch of received messages and before anything that
        states a sequence number (heartbeat, snapshot), so a replica never sees
        a sequence it has not been sent yet. One message per batch instead of
        one per worker message: the coordinator's PUB send was its main cost
        at high connection rates (docs/benchmarks.md, handshakes/s)."""
        updates = self._unpublished
        if updates:
            self._unpublished = []
            self.publisher.send(pack(["u", self.incarnation, updates]))
            self.updates_published += len(updates)
            self._publish_pacer.sent(time.monotonic())

    def _publish_due(self) -> float | None:
        """Publish the queued updates unless the pacer holds them (more than
        PUBLISH_BURST publications lately); returns when to come back
        (monotonic time) while some are held, else None. Every publication
        wakes every worker, so under load they go out together, at most one
        per PUBLISH_MIN_INTERVAL."""
        if not self._unpublished:
            return None
        now = time.monotonic()
        wait = self._publish_pacer.wait(now)
        if wait <= 0:
            self._flush_updates()
            return None
        return now + wait

    def _heartbeat(self) -> None:
        self._flush_updates()
        report = {
            "map_size": len(self.directory.entries),
            "sequence": self.directory.sequence,
            "resyncs": self.directory.resyncs,
            "updates_published": self.updates_published,
        }
        with contextlib.suppress(zmq.Again):
            self.reporter.send(pack(["coordinator", report]), zmq.NOBLOCK)
        self._announce()

    def _announce(self) -> None:
        """Publish the heartbeat: incarnation, last sequence, live shards.

        Also sent at once when the set of live shards changes and after a
        snapshot reply, not only every HEARTBEAT_INTERVAL: a shard that does
        not know a key yet (its SET may be held up to PUBLISH_MIN_INTERVAL)
        offers OOB packets for it to every live shard, and just after a start
        or a worker restart that list would otherwise be empty or stale for
        up to half a second."""
        self._flush_updates()  # never state a sequence not yet published
        self.publisher.send(
            pack(["hb", self.incarnation, self.directory.sequence, sorted(self.last_seen)])
        )

    def _handle(self, identity: bytes, message: list) -> None:
        kind = message[0]
        now = time.monotonic()
        if kind in ("events", "heartbeat", "hello") and message[1] in self.exited:
            # Sent before its process ended, read after the supervisor said so:
            # its keys are gone with it (and it must not count as live again).
            return
        if kind == "events":
            _, shard, events = message
            joined = shard not in self.last_seen
            self.last_seen[shard] = now
            updates: list[tuple[int, tuple]] = []
            for event in events:
                updates += self.directory.apply_event(shard, tuple(event))
            self._publish(updates)
            if joined:
                self._announce()
        elif kind == "heartbeat" or kind == "hello":
            shard = message[1]
            joined = shard not in self.last_seen
            self.last_seen[shard] = now
            self.identities[shard] = identity
            if joined:
                self._announce()
        elif kind == "snapshot":  # ["snapshot", request number], echoed back
            self._flush_updates()
            self.directory.resyncs += 1
            sequence, entries = self.directory.snapshot()
            request = message[1] if len(message) > 1 else None
            self.router.send_multipart(
                [identity, pack(["snapshot", self.incarnation, sequence, entries, request])]
            )
            self._announce()  # the requester may have missed the last heartbeat
        elif kind == "drop":
            self._drop(message[1], "worker exited", exited=True)
        elif kind == "stats":
            self.router.send_multipart(
                [
                    identity,
                    pack(
                        [
                            "stats",
                            {
                                "incarnation": self.incarnation,
                                "map_size": len(self.directory.entries),
                                "sequence": self.directory.sequence,
                                "resyncs": self.directory.resyncs,
                                "shards": sorted(self.last_seen),
                            },
                        ]
                    ),
                ]
            )
        else:
            log.warning("unknown message %r", kind)

    def _drop(self, shard: int, why: str, *, exited: bool) -> None:
        """Drop a shard's keys. Published again when a shard dropped for
        silence exits later: only ``exited`` lets the others forget it."""
        if exited:
            if shard in self.exited:
                return
            self.exited.add(shard)
        elif self.last_seen.get(shard) is None and not any(
            s == shard for s, _ in self.directory.entries.values()
        ):
            return
        self.last_seen.pop(shard, None)
        self.identities.pop(shard, None)
        log.info("dropping shard %d (%s)", shard, why)
        self._publish(self.directory.drop_shard(shard, exited))
        self._announce()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        next_heartbeat = 0.0
        previous_turn = time.monotonic()
        while self.running:
            now = time.monotonic()
            if now - previous_turn > WORKER_SILENCE_LIMIT / 2:
                # We were not running (SIGSTOP, a stalled host): the workers'
                # heartbeats are queued unread, so their silence proves nothing.
                log.warning("coordinator paused %.1f s: not judging silence", now - previous_turn)
                for shard in self.last_seen:
                    self.last_seen[shard] = now
            previous_turn = now
            if now >= next_heartbeat:
                if os.getppid() != self.parent:
                    log.error("supervisor (pid %d) is gone: stopping", self.parent)
                    break
                self._heartbeat()
                next_heartbeat = now + HEARTBEAT_INTERVAL
                for shard, seen in list(self.last_seen.items()):
                    if now - seen > WORKER_SILENCE_LIMIT:
                        self._drop(shard, f"silent for {now - seen:.1f} s", exited=False)
                self._flush_updates()
            wake_at = next_heartbeat
            publish_at = self._publish_due()
            if publish_at is not None:
                wake_at = min(wake_at, publish_at)
            timeout_ms = max(0, math.ceil((wake_at - time.monotonic()) * 1000))
            try:
                ready = dict(poller.poll(timeout_ms))
            except zmq.ZMQError:
                if not self.running:
                    break
                raise
            if self.router in ready:
                router = self.router
                for _ in range(1000):  # bounded batch, then heartbeats get a turn
                    # Asked, not tried: a recv that finds nothing raises
                    # zmq.Again, ~2.8 us to build against ~1.1 us for EVENTS.
                    if not router.get(_EVENTS) & _POLLIN:
                        break
                    try:
                        identity, payload = router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        message = unpack(payload)
                    except (ValueError, msgpack.ExtraData, msgpack.FormatError):
                        log.warning("undecodable message dropped")
                        continue
                    self._handle(identity, message)

    def close(self) -> None:
        self.router.close()
        self.publisher.close()
        self.reporter.close()


def main(runtime_dir: str, log_level: str = "info", log_format: str = "text") -> int:
    configure_logging(log_level, log_format, "coordinator")
    service = CoordinatorService(Path(runtime_dir))

    def stop(signum: int, frame: object) -> None:
        service.running = False

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("coordinator %08x ready", service.incarnation)
    print("READY", flush=True)
    try:
        service.run()
    finally:
        service.close()
    return 0
