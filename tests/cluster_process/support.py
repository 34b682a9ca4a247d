"""Helpers for the real-process cluster tests: shard and coordinator lines,
clients on chosen shards, linking, bounded waits, and PID-only cleanup."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from cluster.client import ConnectionClosed, RelayClient
from relaycore.packets import (
    ConnectNotification,
    OobReceive,
    Packet,
    RoutedData,
    RoutingResponse,
)
from testbed.relay_process import RelayProcess, start_relay

T = TypeVar("T")

SHARD_RE = re.compile(
    r"^Shard (?P<shard>\d+) \(worker (?P<worker>\d+)\) pid (?P<pid>\d+) "
    r"direct address (?P<host>[^:]+):(?P<port>\d+)$"
)
COORDINATOR_RE = re.compile(r"^Coordinator pid (?P<pid>\d+)$")

LINK_TIMEOUT = 5.0  # seconds for a cross-shard link (map propagation + WANT/LINKED)
EVENT_TIMEOUT = 3.0


@dataclass(frozen=True)
class ShardLine:
    shard: int
    worker: int
    pid: int
    host: str
    port: int
    line_index: int

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    """Run one test body on a fresh event loop, bounded."""

    async def bounded() -> T:
        async with asyncio.timeout(timeout):
            return await coro

    return asyncio.run(bounded())


class Cluster:
    """A running `cluster start --shard-ports` and what its stdout said."""

    def __init__(self, relay: RelayProcess) -> None:
        self.relay = relay
        self.seen_pids: set[int] = set()
        self._note_pids()

    @property
    def lines(self) -> list[str]:
        return self.relay.stdout_lines

    def shard_lines(self) -> list[ShardLine]:
        found = []
        for index, line in enumerate(list(self.lines)):
            match = SHARD_RE.match(line)
            if match:
                found.append(
                    ShardLine(
                        int(match["shard"]),
                        int(match["worker"]),
                        int(match["pid"]),
                        match["host"],
                        int(match["port"]),
                        index,
                    )
                )
        return found

    def shards(self) -> list[ShardLine]:
        """The current shard of every worker slot (the latest line per slot)."""
        latest: dict[int, ShardLine] = {}
        for shard in self.shard_lines():
            latest[shard.worker] = shard
        self._note_pids()
        return [latest[worker] for worker in sorted(latest)]

    def coordinator_pids(self) -> list[int]:
        pids = []
        for line in list(self.lines):
            match = COORDINATOR_RE.match(line)
            if match:
                pids.append(int(match["pid"]))
        return pids

    def _note_pids(self) -> None:
        for shard in self.shard_lines():
            self.seen_pids.add(shard.pid)
        self.seen_pids.update(self.coordinator_pids())

    def child_pids(self) -> set[int]:
        self._note_pids()
        return set(self.seen_pids)

    async def wait_for_shard(self, worker: int, not_shard: int, timeout: float) -> ShardLine:
        """The new line for worker slot ``worker`` once it differs from ``not_shard``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for shard in reversed(self.shard_lines()):
                if shard.worker == worker:
                    if shard.shard != not_shard:
                        self._note_pids()
                        return shard
                    break
            if loop.time() > deadline:
                raise AssertionError(
                    f"no new shard line for worker {worker} within {timeout} s: {self.lines!r}"
                )
            await asyncio.sleep(0.02)

    async def wait_for_line(
        self, predicate: Callable[[str], bool], timeout: float, start: int = 0
    ) -> str:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for line in list(self.lines)[start:]:
                if predicate(line):
                    self._note_pids()
                    return line
            if loop.time() > deadline:
                raise AssertionError(f"no such line within {timeout} s: {self.lines!r}")
            await asyncio.sleep(0.02)

    async def connect(
        self,
        where: ShardLine | None = None,
        *,
        secret_key: bytes | None = None,
        timeout: float = 5.0,
        confirm: bool = True,
        source_ip: str | None = None,
    ) -> RelayClient:
        """A confirmed client on ``where``'s shard (its direct address) or the shared
        port, from ``source_ip`` (a 127.x address) when given."""
        host, port = where.address if where is not None else (self.relay.host, self.relay.port)
        return await RelayClient.connect(
            host,
            port,
            self.relay.public_key,
            secret_key=secret_key,
            local_addr=(source_ip, 0) if source_ip is not None else None,
            timeout=timeout,
            confirm=confirm,
        )

    def stop(self) -> None:
        self._note_pids()
        try:
            self.relay.stop()
        finally:
            kill_leftovers(self.seen_pids)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers signal 0; it is gone for our purpose.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_leftovers(pids: set[int]) -> None:
    """SIGKILL (by PID) any child process a failed test left running."""
    for pid in pids:
        if pid_alive(pid) and _is_ours(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)


def _is_ours(pid: int) -> bool:
    """Only signal a PID that still runs our worker or coordinator (no reuse)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in cmdline or b"coordinator" in cmdline


def start_cluster(
    workdir: Path,
    workers: int,
    allow_private_next_hops: bool = False,
    config: str | None = None,
) -> Cluster:
    """`cluster start --shard-ports --workers N`, with ``config`` (TOML text) if given."""
    relay = start_relay(
        workdir,
        extra_args=["--shard-ports"],
        workers=workers,
        config=config,
        allow_private_next_hops=allow_private_next_hops,
    )
    cluster = Cluster(relay)
    assert len(cluster.shards()) == workers, relay.stdout_lines
    assert len(cluster.coordinator_pids()) == 1, relay.stdout_lines
    return cluster


class ClusterSet:
    """The clusters one test started: all stopped by PID at teardown, and their
    output printed when the test failed (pytest shows it with the failure)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.clusters: list[Cluster] = []

    def start(
        self, workers: int = 2, allow_private_next_hops: bool = False, config: str | None = None
    ) -> Cluster:
        workdir = self.tmp_path / f"relay-{len(self.clusters)}"
        cluster = start_cluster(workdir, workers, allow_private_next_hops, config)
        self.clusters.append(cluster)
        return cluster

    def stop_all(self, failed: bool) -> None:
        for cluster in self.clusters:
            cluster.stop()
        if failed:
            for cluster in self.clusters:
                print("---- cluster stdout ----", *cluster.lines, sep="\n")
                print("---- cluster stderr ----\n" + cluster.relay.stderr_text())


async def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01
) -> float:
    """Poll ``condition`` until true; the seconds it took (AssertionError after timeout)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while not condition():
        if loop.time() - started > timeout:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(interval)
    return loop.time() - started


async def expect_event(client: RelayClient, kind: type[T], timeout: float = EVENT_TIMEOUT) -> T:
    return await client.expect(kind, timeout)  # type: ignore[arg-type]


async def request(client: RelayClient, public_key: bytes) -> int:
    """ROUTING_REQUEST; the connection id the relay gave."""
    client.route_request(public_key)
    response = await expect_event(client, RoutingResponse)
    assert response.public_key == public_key
    assert response.connection_id >= 16, response
    return response.connection_id


async def link(a: RelayClient, b: RelayClient, timeout: float = LINK_TIMEOUT) -> tuple[int, int]:
    """a and b request each other (a first); both get CONNECT_NOTIFICATION.

    a's PING after its request returns once a's shard has its answer from b's
    shard, so the two requests do not cross on the bus (crossed requests are
    the subject of their own test). Across shards b's request may still reach
    its shard before the map says where a is; the relay converges when the
    map catches up, so the notifications are awaited (bounded), not assumed."""
    id_a = await request(a, b.public_key)
    await a.ping(timeout)
    id_b = await request(b, a.public_key)
    note_a = await expect_event(a, ConnectNotification, timeout)
    note_b = await expect_event(b, ConnectNotification, timeout)
    assert note_a.connection_id == id_a
    assert note_b.connection_id == id_b
    return id_a, id_b


async def check_data(
    sender: RelayClient, send_id: int, receiver: RelayClient, receive_id: int, payload: bytes
) -> None:
    sender.send_data(send_id, payload)
    event = await expect_event(receiver, RoutedData)
    assert event == RoutedData(receive_id, payload), event


async def check_oob(sender: RelayClient, receiver: RelayClient, data: bytes) -> None:
    sender.send_oob(receiver.public_key, data)
    event = await expect_event(receiver, OobReceive)
    assert event == OobReceive(sender.public_key, data), event


async def quiet(client: RelayClient, seconds: float) -> list[Packet]:
    """Events that arrive within ``seconds`` (expected: none)."""
    await asyncio.sleep(seconds)
    return client.pending_events()


async def closed_within(client: RelayClient, timeout: float) -> str:
    async with asyncio.timeout(timeout):
        return await asyncio.shield(client.closed)


class Recorder:
    """Consumes a client's events in the background, each with its arrival time."""

    def __init__(self, client: RelayClient) -> None:
        self.client = client
        self.events: list[tuple[float, Packet]] = []
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self.task = self._loop.create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                event = await self.client.next_event(None)
            except ConnectionClosed:
                self._changed.set()
                return
            self.events.append((self._loop.time(), event))
            self._changed.set()

    def of(self, kind: type[T]) -> list[T]:
        return [event for _, event in self.events if isinstance(event, kind)]

    def kinds(self) -> list[Packet]:
        return [event for _, event in self.events]

    async def wait_for(
        self, predicate: Callable[[Packet], bool], timeout: float, what: str = "an event"
    ) -> tuple[float, Packet]:
        """The first recorded event (time, event) matching ``predicate``."""
        deadline = self._loop.time() + timeout
        while True:
            for stamp, event in self.events:
                if predicate(event):
                    return stamp, event
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise AssertionError(
                    f"no {what} within {timeout} s; events: {self.kinds()!r}, "
                    f"closed: {self.client.closed.done()}"
                )
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.1)):
                    await self._changed.wait()

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


class Pump:
    """Sends numbered payloads ``tag + seq`` on one connection id at a steady pace."""

    def __init__(self, client: RelayClient, connection_id: int, tag: bytes, interval: float):
        self.client = client
        self.connection_id = connection_id
        self.tag = tag
        self.interval = interval
        self.sent = 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self.client.closed.done():
            self.client.send_data(self.connection_id, self.tag + self.sent.to_bytes(4, "big"))
            self.sent += 1
            await asyncio.sleep(self.interval)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def sequence_numbers(recorder: Recorder, connection_id: int, tag: bytes) -> list[int]:
    """The numbers of ``tag`` payloads a recorder got on ``connection_id``, in order."""
    numbers = []
    for event in recorder.of(RoutedData):
        if event.connection_id == connection_id and event.payload.startswith(tag):
            numbers.append(int.from_bytes(event.payload[len(tag) :], "big"))
    return numbers
