"""Joins a shard to the cluster: its peer bus and its coordinator client.

The adapter between ``RelayServer``'s cluster interface (take_bus,
take_registry, receive_link, apply_map_update, reset_directory) and the
ZeroMQ sockets. No relay logic here.
"""

from __future__ import annotations

from pathlib import Path

from coordinator.client import CoordinatorClient, CoordinatorHandler
from relaycore.crossshard import CrossShard
from relaycore.shardlink import MapUpdate
from worker.bus import PeerBus
from worker.reporting import StatsReporter, shard_report
from worker.shard import Shard

CLOSE_LINGER_MS = 1000  # bounded wait for the last messages at shutdown


class ClusterMember(CoordinatorHandler):
    def __init__(self, shard: Shard, runtime_dir: Path) -> None:
        server = shard.server
        links = server.cluster
        assert isinstance(links, CrossShard), "a cluster member needs RelayServer(shard=...)"
        self.shard = shard
        self.server = server
        self.links = links
        faults = shard.faults
        self.bus = PeerBus(
            runtime_dir, links.shard, shard.loop, self._deliver, on_error=faults.contained
        )
        self.coordinator = CoordinatorClient(
            runtime_dir, links.shard, shard.loop, self, on_error=faults.contained
        )
        self.reporter = StatsReporter(shard, runtime_dir, self._cluster_counters)
        shard.after_flush = self._after_flush

    def start(self) -> None:
        self.coordinator.start()
        self.reporter.start()

    def _cluster_counters(self) -> dict[str, int]:
        counters = {f"bus.{name}": value for name, value in self.bus.stats.items()}
        counters["map.resyncs"] = self.coordinator.resyncs
        return counters

    def _after_flush(self) -> None:
        bus = self.links.take_bus(self.shard.loop.time())
        if bus:
            self.bus.send(bus)
        registry = self.links.take_registry()
        if registry:
            self.coordinator.send_events(registry)

    def _deliver(self, from_shard: int, batch: list) -> None:
        """Each message on its own: one that raises is counted and skipped."""
        receive_link = self.links.receive_link
        now = self.shard.loop.time()
        for message in batch:
            try:
                receive_link(from_shard, message, now)
            except Exception:
                self.shard.faults.contained("bus_message")
                self.shard.check_core()
        self.shard.flush()

    # CoordinatorHandler
    def apply_map_update(self, update: tuple, now: float) -> None:
        self.apply_map_updates([update], now)

    def apply_map_updates(self, updates: list, now: float) -> None:
        """A publication's updates, in one call to the relay table."""
        self.links.apply_map_updates(updates, now)
        drop_shard = MapUpdate.DROP_SHARD
        for update in updates:
            if update[0] == drop_shard:
                _, shard, exited = update
                # Only a shard whose process is gone is forgotten: one dropped for
                # silence may be alive (SIGSTOP) and speak again with the same id.
                if exited and shard != self.links.shard:
                    self.bus.forget(shard)

    def reset_directory(self, entries: list, merge: bool, request: int | None, now: float) -> None:
        self.links.reset_directory(entries, now, merge=merge, request=request)

    def snapshot_requested(self, request: int, events_delivered: bool) -> None:
        self.links.snapshot_requested(request, events_delivered)

    def registrations(self) -> list[tuple[bytes, int]]:
        return self.links.registrations()

    def set_peer_shards(self, shards: list[int], now: float) -> None:
        self.links.set_peer_shards(shards, now)

    def after_input(self) -> None:
        self.shard.flush()

    def final_report(self) -> dict:
        """The counters after the stop (``python -m worker`` prints it as its
        ``FINAL`` line, which the supervisor reads once the process has exited)."""
        return shard_report(self.shard, self._cluster_counters())

    def close(self) -> None:
        """Send what is still queued (within a bound), then close the sockets."""
        self._after_flush()
        self.reporter.close()
        self.bus.close(linger_ms=CLOSE_LINGER_MS)
        self.coordinator.close(linger_ms=CLOSE_LINGER_MS)
