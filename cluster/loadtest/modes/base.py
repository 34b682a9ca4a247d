"""What every mode's runner shares: the phases, connecting, lanes, closing.

A worker process calls ``setup()`` (open and link connections; each one has
its own timeout), reports ready, then ``run(t0, stop)`` from the common start
time t0 until done or ``stop`` is set, reports ``result`` and finally
``close()``. ``progress()`` is polled a few times a second for the live line.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable

from cluster.loadtest.clients import LoadClient, close_all, open_client
from cluster.loadtest.identity import Identity, make_identity
from cluster.loadtest.payload import Randomness
from cluster.loadtest.results import WorkerResult
from cluster.loadtest.spec import WorkerSpec

CLOSED = "closed by the relay"


async def sleep_until(deadline: float, stop: asyncio.Event) -> bool:
    """Sleep until ``perf_counter() >= deadline``; True if ``stop`` was set first."""
    remaining = deadline - time.perf_counter()
    if stop.is_set():
        return True
    if remaining <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), remaining)
    return stop.is_set()


async def in_lanes(count: int, lanes: int, job: Callable[[int], Awaitable[None]]) -> None:
    """Run ``job(0) .. job(count - 1)``, at most ``lanes`` at a time, in index order."""
    next_index = 0

    async def lane() -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            await job(index)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(lanes, count)):
            group.create_task(lane())


class ModeRunner(ABC):
    """One process's share of a load test."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.options = spec.options
        self.result = WorkerResult()
        self.random = Randomness(spec.seed)
        self.clients: list[LoadClient] = []
        self.ready_units = 0  # pairs linked / connections open
        self.t0: float | None = None
        self.closing = False

    # -- phases ------------------------------------------------------------

    @abstractmethod
    async def setup(self) -> None:
        """Open (and link) this process's connections; failures are counted, not raised."""

    @abstractmethod
    async def run(self, t0: float, stop: asyncio.Event) -> None:
        """Generate load from t0 until done or ``stop``; fill ``self.result``."""

    def events(self) -> int:
        """The cumulative count the live line shows as a rate (frames, handshakes ...)."""
        return 0

    def progress(self) -> dict[str, int]:
        """A small snapshot for the parent's live line."""
        return {
            "ready": self.ready_units,
            "events": self.events(),
            "errors": sum(self.result.errors.values()),
            "alive": sum(1 for c in self.clients if not c.closed.done()),
        }

    async def close(self) -> None:
        """Close every connection still open."""
        self.closing = True
        await close_all(self.clients)

    # -- helpers -----------------------------------------------------------

    def source_address(self, n: int) -> str | None:
        """The source address of this process's ``n``-th connection (round robin)."""
        addresses = self.options.source_addresses
        if not addresses:
            return None
        return addresses[(self.spec.index + n) % len(addresses)]

    def identity(self) -> Identity:
        """A new client key with its X25519 work for the target done (``identity``)."""
        return make_identity(self.random.secret_key(), self.options.target.public_key)

    async def connect(self, identity: Identity, n: int, port: int | None = None) -> LoadClient:
        """Open this process's ``n``-th connection (handshake + PING); raises on failure.
        ``port`` replaces the target's port (``--partner-port``)."""
        target = self.options.target
        return await open_client(
            target.address,
            target.port if port is None else port,
            target.public_key,
            identity,
            self.source_address(n),
            self.options.connect_timeout,
        )

    def keep(self, client: LoadClient) -> None:
        """Hold ``client`` until ``close()``; count it if the relay closes it before."""
        self.clients.append(client)

        def closed(_: asyncio.Future[str]) -> None:
            if not self.closing:
                self.result.errors[CLOSED] += 1
                self.on_lost(client)

        client.closed.add_done_callback(closed)

    def on_lost(self, client: LoadClient) -> None:  # noqa: B027 - optional hook
        """Called when a kept connection ends before ``close()``; nothing by default."""
