"""Cluster-wide statistics: the workers' and the coordinator's reports summed
by the supervisor, exposed as Prometheus metrics and as `cluster status` data.

Counters never go backwards across a worker restart: when a worker process
ends, its last reported counters are folded into a retired total that stays
in every sum (``rate()`` then sees no reset at all).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "toxrelay"

# Counter key prefixes in the workers' reports -> (metric, label name, help).
LABELLED_COUNTERS = {
    "closed.": ("closed_connections", "reason", "Connections closed, by rule or limit."),
    "dropped.": ("dropped_packets", "reason", "Packets dropped, by reason."),
    "refused.": ("refused_connections", "reason", "Connections refused at accept, by limit."),
    "packets_in.": ("packets_received", "type", "Control packets received from clients, by type."),
    "onion.": ("onion_packets", "event", "Onion requests sent, replies delivered or crossed."),
    "forward.": ("forward_packets", "event", "Forward requests sent, replies delivered."),
    "udp.": ("udp_datagrams", "event", "UDP datagrams sent, errors, ignored packets."),
    "internal_errors.": (
        "internal_errors", "where", "Unexpected exceptions contained, by where they were caught."
    ),
}  # fmt: skip
PLAIN_COUNTERS = {
    "accepted": ("accepted_connections", "Sockets accepted."),
    "relayed": ("relayed_packets", "Data and OOB packets queued to a receiver."),
    "relayed_bytes": ("relayed_bytes", "Plaintext bytes of relayed packets."),
    "links": ("links", "Links formed between two clients' slots."),
    "bus.messages_dropped": ("bus_dropped_messages", "Cross-shard messages dropped: queue full."),
    "bus.batches_sent": (
        "bus_batches", "Peer bus batches sent (one ZeroMQ message each, many link messages)."
    ),
    "bus.messages_to_gone_shard": (
        "bus_messages_to_exited_workers", "Bus messages to exited workers, dropped."
    ),
    "map.resyncs": ("map_resyncs", "Routing map snapshots fetched by workers."),
    "oob_broadcast": ("oob_broadcasts", "OOB packets offered to every shard (key not yet known)."),
    "wants_after_set": (
        "wants_after_set", "WANTs re-sent to other shards after routing map SETs (coalesced)."
    ),
}  # fmt: skip


# Counters with one label over named totals:
# (name, help, label, ((label value, counter key), ...)).
PAIRED_COUNTERS = (
    (
        "handshakes",
        "Hellos answered / connections confirmed.",
        "result",
        (("replied", "handshakes"), ("confirmed", "confirmed")),
    ),
    ("frames", "Frames, by direction.", "direction", (("in", "frames_in"), ("out", "frames_out"))),
    (
        "bus_messages",
        "Cross-shard link messages.",
        "direction",
        (("sent", "bus.messages_sent"), ("received", "bus.messages_received")),
    ),
)


@dataclass
class WorkerSample:
    slot: int
    shard: int
    pid: int
    report: dict
    received_at: float
    frames_in_rate: float = 0.0
    frames_out_rate: float = 0.0
    cpu_percent: float = 0.0


@dataclass
class ClusterStats:
    workers: dict[int, WorkerSample] = field(default_factory=dict)  # by shard id
    retired: Counter = field(default_factory=Counter)
    coordinator: dict = field(default_factory=dict)
    worker_restarts: int = 0
    coordinator_restarts: int = 0
    slot_of_shard: dict[int, int] = field(default_factory=dict)
    restarts_by_slot: Counter = field(default_factory=Counter)
    retired_cpu_by_slot: Counter = field(default_factory=Counter)
    retired_shards: set[int] = field(default_factory=set)

    def record(self, shard: int, pid: int, report: dict, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        if shard in self.retired_shards:
            return  # a report that was still queued when its worker ended: counted
        sample = WorkerSample(self.slot_of_shard.get(shard, -1), shard, pid, report, now)
        previous = self.workers.get(shard)
        if previous is not None and now > previous.received_at:
            elapsed = now - previous.received_at
            counters, before = report["counters"], previous.report["counters"]
            sample.frames_in_rate = (
                counters.get("frames_in", 0) - before.get("frames_in", 0)
            ) / elapsed
            sample.frames_out_rate = (
                counters.get("frames_out", 0) - before.get("frames_out", 0)
            ) / elapsed
            sample.cpu_percent = 100 * (report["cpu"] - previous.report["cpu"]) / elapsed
        self.workers[shard] = sample

    def retire(self, shard: int) -> None:
        """A worker process ended: keep its counters in the totals forever."""
        self.retired_shards.add(shard)
        sample = self.workers.pop(shard, None)
        if sample is not None:
            self.retired.update(sample.report["counters"])
            self.retired_cpu_by_slot[sample.slot] += sample.report["cpu"]

    def cpu_seconds_by_slot(self) -> dict[int, float]:
        """CPU time of every process that ran in each worker slot: one series
        per slot that never goes backwards across restarts and reloads."""
        cpu: dict[int, float] = dict(self.retired_cpu_by_slot)
        for sample in self.workers.values():
            cpu[sample.slot] = cpu.get(sample.slot, 0.0) + sample.report["cpu"]
        return cpu

    def totals(self) -> Counter:
        total = Counter(self.retired)
        for sample in self.workers.values():
            total.update(sample.report["counters"])
        return total

    def connections(self) -> Counter:
        total: Counter = Counter({"incoming": 0, "unconfirmed": 0, "confirmed": 0})
        for sample in self.workers.values():
            total.update(sample.report["connections"])
        return total

    def status(self) -> dict:
        """What `cluster status --json` prints."""
        rows = []
        for sample in sorted(self.workers.values(), key=lambda s: (s.slot, s.shard)):
            report = sample.report
            rows.append(
                {
                    "worker": sample.slot,
                    "shard": sample.shard,
                    "pid": sample.pid,
                    "connections": sum(report["connections"].values()),
                    "confirmed": report["connections"]["confirmed"],
                    "frames_in_per_s": round(sample.frames_in_rate, 1),
                    "frames_out_per_s": round(sample.frames_out_rate, 1),
                    "cpu_percent": round(sample.cpu_percent, 1),
                    "rss_bytes": report["rss"],
                    "restarts": self.restarts_by_slot[sample.slot],
                    "loop_lag_seconds": round(report["loop_lag"], 4),
                }
            )
        totals = self.totals()
        connections = self.connections()
        return {
            "workers": rows,
            "totals": {
                "connections": sum(connections.values()),
                "confirmed": connections["confirmed"],
                "frames_in_per_s": round(sum(r["frames_in_per_s"] for r in rows), 1),
                "frames_out_per_s": round(sum(r["frames_out_per_s"] for r in rows), 1),
                "rss_bytes": sum(r["rss_bytes"] for r in rows),
                "frames_in": totals.get("frames_in", 0),
                "frames_out": totals.get("frames_out", 0),
                "relayed_packets": totals.get("relayed", 0),
                "onion_requests": totals.get("onion.requests_sent", 0),
                "onion_replies": totals.get("onion.replies_delivered", 0),
                "onion_replies_crossed_shards": totals.get("onion.replies_to_other_shards", 0),
                "onion_replies_by_type": {
                    key.removeprefix("onion.replies_delivered_"): value
                    for key, value in sorted(totals.items())
                    if key.startswith("onion.replies_delivered_")
                },
                "onion_replies_dropped_bad_type": totals.get("dropped.onion_reply_bad_type", 0),
                "forward_requests": totals.get("forward.requests_sent", 0),
                "forward_replies": totals.get("forward.replies_delivered", 0),
                "worker_restarts": self.worker_restarts,
                "coordinator_restarts": self.coordinator_restarts,
                "map_entries": self.coordinator.get("map_size", 0),
            },
        }


class ClusterCollector(Collector):
    """Builds every metric family from ``ClusterStats`` at scrape time."""

    def __init__(self, stats: ClusterStats) -> None:
        self.stats = stats

    def collect(self) -> Iterator:
        stats = self.stats
        totals = stats.totals()
        families: dict[str, CounterMetricFamily] = {}
        for key_prefix, (name, label, help_text) in LABELLED_COUNTERS.items():
            families[key_prefix] = CounterMetricFamily(
                f"{PREFIX}_{name}", help_text, labels=[label]
            )
        for key, value in sorted(totals.items()):
            for key_prefix, family in families.items():
                if key.startswith(key_prefix):
                    family.add_metric([key[len(key_prefix) :]], value)
                    break
        yield from families.values()
        for key, (name, help_text) in PLAIN_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", help_text, value=totals.get(key, 0))
        for name, help_text, label, values in PAIRED_COUNTERS:
            family = CounterMetricFamily(f"{PREFIX}_{name}", help_text, labels=[label])
            for value, key in values:
                family.add_metric([value], totals.get(key, 0))
            yield family
        connections = GaugeMetricFamily(
            f"{PREFIX}_connections", "Connections now, by state.", labels=["state"]
        )
        for state, value in sorted(stats.connections().items()):
            connections.add_metric([state], value)
        yield connections
        yield GaugeMetricFamily(
            f"{PREFIX}_workers", "Worker processes running.", value=len(stats.workers)
        )
        yield GaugeMetricFamily(
            f"{PREFIX}_map_entries",
            "Keys in the routing map.",
            value=stats.coordinator.get("map_size", 0),
        )
        yield CounterMetricFamily(
            f"{PREFIX}_worker_restarts",
            "Workers restarted by the supervisor.",
            value=stats.worker_restarts,
        )
        yield CounterMetricFamily(
            f"{PREFIX}_coordinator_restarts",
            "Coordinator restarts.",
            value=stats.coordinator_restarts,
        )
        lag = GaugeMetricFamily(
            f"{PREFIX}_event_loop_lag_seconds",
            "How late the worker's 1 s timer fired.",
            labels=["worker"],
        )
        rss = GaugeMetricFamily(
            f"{PREFIX}_worker_resident_memory_bytes",
            "Resident memory of each worker.",
            labels=["worker"],
        )
        held = GaugeMetricFamily(
            f"{PREFIX}_worker_connections",
            "Connections each worker holds now, in any state (what max_connections limits: "
            "it applies per worker).",
            labels=["worker"],
        )
        cpu = CounterMetricFamily(
            f"{PREFIX}_worker_cpu_seconds",
            "CPU time of each worker slot, over all its processes.",
            labels=["worker"],
        )
        for sample in stats.workers.values():
            worker = str(sample.slot)
            lag.add_metric([worker], sample.report["loop_lag"])
            rss.add_metric([worker], sample.report["rss"])
            held.add_metric([worker], sum(sample.report["connections"].values()))
        for slot, seconds in sorted(stats.cpu_seconds_by_slot().items()):
            cpu.add_metric([str(slot)], seconds)
        yield lag
        yield rss
        yield held
        yield cpu
