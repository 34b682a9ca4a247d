"""``handshake``: C connections opened K at a time, each handshake + one PING, then closed.

Latency runs from the start of ``connect()`` to the PONG of the confirming
PING (what a toxcore client waits for before using a relay); the close is
not timed but is part of the rate. Failures are counted by cause.
"""

from __future__ import annotations

import asyncio
import time

from cluster.loadtest.clients import failure_cause
from cluster.loadtest.identity import Identity
from cluster.loadtest.modes.base import ModeRunner, in_lanes, sleep_until


class HandshakeRunner(ModeRunner):
    """This process's share of the C handshakes, with its share of the K lanes."""

    async def setup(self) -> None:
        """Nothing to open in advance; identities are made as lanes need them."""
        self.idle_identities: list[Identity] = []

    def events(self) -> int:
        return self.result.counts["handshakes"]

    async def _one(self, n: int) -> None:
        counts = self.result.counts
        counts["attempted"] += 1
        # One identity per lane, reused by its next connections (cluster.loadtest.identity).
        identities = self.idle_identities
        identity = identities.pop() if identities else self.identity()
        started = time.perf_counter()
        try:
            client = await self.connect(identity, n)
        except Exception as error:  # refused, reset, timed out, bad reply: counted
            self.result.errors[failure_cause(error)] += 1
            identities.append(identity)
            return
        finished = time.perf_counter()
        self.result.latency.add(finished - started)
        counts["handshakes"] += 1
        assert self.t0 is not None
        self.result.timeline.add(finished - self.t0)
        await client.close()
        identities.append(identity)

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        self.t0 = t0
        self.result.window_start = t0
        self.result.window_end = t0
        if await sleep_until(t0, stop):
            return
        work = asyncio.ensure_future(in_lanes(self.spec.units, self.spec.concurrency, self._one))
        stopped = asyncio.ensure_future(stop.wait())
        await asyncio.wait([work, stopped], return_when=asyncio.FIRST_COMPLETED)
        if not work.done():  # stopped: abandon the handshakes in progress
            work.cancel()
        self.result.window_end = time.perf_counter()
        self.result.timeline.add(self.result.window_end - t0, 0)  # spans the run
        stopped.cancel()
        await asyncio.gather(work, stopped, return_exceptions=True)
