"""``idle``: N connections held for D seconds, answering the relay's pings.

The protocol core answers every server PING by itself; the runner counts
them. After the hold each connection still open sends one PING of its own:
a PONG within ``--ping-timeout`` proves it survived (the latency samples are
these round trips). Connections the relay closed during the hold are counted
and drawn over time.
"""

from __future__ import annotations

import asyncio
import time

from cluster.loadtest.clients import LoadClient, failure_cause
from cluster.loadtest.modes.base import ModeRunner, in_lanes, sleep_until
from relaycore.packets import Packet, Ping

INTERRUPTED_PING_TIMEOUT_S = 2.0


class IdleRunner(ModeRunner):
    """This process's share of the N held connections."""

    async def setup(self) -> None:
        keys = [self.identity() for _ in range(self.spec.units)]

        async def open_one(n: int) -> None:
            try:
                client = await self.connect(keys[n], n)
            except Exception as error:
                self.result.errors[f"connect: {failure_cause(error)}"] += 1
                return
            client.on_packets = self._count_pings
            self.keep(client)
            self.ready_units += 1

        await in_lanes(len(keys), self.spec.concurrency, open_one)
        self.result.counts["connected"] = self.ready_units

    def _count_pings(self, packets: list[Packet]) -> None:
        for packet in packets:
            if type(packet) is Ping:
                self.result.counts["server pings"] += 1
            else:
                self.result.errors["unexpected packet"] += 1

    def events(self) -> int:
        return self.result.counts["server pings"]

    def on_lost(self, client: LoadClient) -> None:
        if self.t0 is not None:
            self.result.timeline.add(time.perf_counter() - self.t0)

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        self.t0 = t0
        self.result.window_start = t0
        await sleep_until(t0 + self.options.duration, stop)
        self.result.window_end = time.perf_counter()
        self.result.timeline.add(self.result.window_end - t0, 0)  # the timeline spans the hold
        alive = [c for c in self.clients if not c.closed.done()]
        timeout = self.options.ping_timeout
        if stop.is_set():
            timeout = min(timeout, INTERRUPTED_PING_TIMEOUT_S)

        async def final_ping(n: int) -> None:
            started = time.perf_counter()
            try:
                await alive[n].ping(timeout)
            except Exception as error:
                self.result.errors[f"final ping: {failure_cause(error)}"] += 1
                return
            self.result.latency.add(time.perf_counter() - started)
            self.result.counts["survived"] += 1

        await in_lanes(len(alive), max(self.spec.concurrency, 1), final_ping)
