"""Chaos run: faults injected into a real cluster while many client pairs relay traffic.

Run from the repository root::

    python3 -m ops.bench.chaos [--workers 2] [--pairs 48] [--json]

A `cluster start --shard-ports --workers N` is started on loopback. ``--pairs`` client
pairs are placed on chosen shards through the workers' direct ports, in turn on one
shard (both ends on worker slot i) and across shards (slots i and j), from ``--sources``
different 127.x source addresses. Each end sends numbered frames (pair, side and a
sequence number in the payload) to the other at ``--rate`` frames/s while linked. Then,
one after the other, while the traffic flows:

* ``kill-worker``       SIGKILL of worker slot ``--kill-slot`` (its PID from the start output)
* ``kill-coordinator``  SIGKILL of the coordinator
* ``stop-worker``       SIGSTOP of worker slot ``--stop-slot`` for ``--stop-seconds``, SIGCONT
* ``reload``            SIGHUP to the supervisor (rolling reload of every worker)
* ``kill-both``         (only when named) SIGKILL of the coordinator and at once of the
                        worker slot ``--kill-slot``: both crash together
* ``stop-coordinator``  (only when named) SIGSTOP of the coordinator for ``--stop-seconds``

A client whose connection closes does what toxcore does: it reconnects (same key, same
source address; to its slot's new shard once the relay has printed it) and requests
its friend again. After each event the run waits until every pair passes traffic in both
directions again, then ``--settle`` seconds, then the next event begins.

Per event (its window runs from the signal to the next event) it reports:

* **own pairs**: pairs with an end on the worker(s) the event hits (none for the
  coordinator, all for a reload);
* **disrupted**: pairs whose client lost its connection, got a DISCONNECT_NOTIFICATION,
  or whose frames stopped arriving for ``--stall`` seconds or more; split into own
  pairs and pairs *beyond* them (goal: none beyond);
* **relink**: for each disrupted pair, seconds from the signal until both directions
  pass frames again after its last disconnect or stall (median and max);
* **frames lost**: numbered frames never delivered, by the window in which the loss
  showed (a later frame of that direction arrived), for own pairs and outside them
  (goal: none outside);
* **max gap outside**: the longest pause between two frames of a pair outside the own
  pairs, and **probes**: fresh handshakes on the shared port every ``--probe-interval``
  s (failed, and refused: the port was closed).

A "steady" row covers the time before the first event (the control: nothing disrupted,
nothing lost). Misrouted (another pair's) and duplicated frames are counted over the run.
``--json`` prints the whole result as one JSON object; ``--doc docs/benchmarks.md``
also writes its "Chaos run" section.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shlex
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import uvloop

from cluster.client import ConnectionClosed, RelayClient
from ops.bench.chaos_report import (
    CLOSED,
    CONNECTED,
    DISCONNECTED,
    analyse,
    format_table,
    render_markdown,
    splice_section,
)
from ops.bench.relay_cluster import RelayCluster, Shard, runs_worker_or_coordinator
from relaycore.crypto import public_key_of
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    Packet,
    RoutedData,
    RoutingResponse,
)

EVENTS = ("kill-worker", "kill-coordinator", "stop-worker", "reload")
EXTRA_EVENTS = ("kill-both", "stop-coordinator")  # not in the default sequence
TICK = 0.05  # seconds between two rounds of sends
HEADER = struct.Struct(">IBI")  # pair index, side (0 = a, 1 = b), sequence number
WRITE_BUFFER_LIMIT = 256 * 1024  # a client does not queue more for a stalled relay
CONNECT_TIMEOUT = 3.0
PROBE_SOURCE = "127.0.0.9"
FIRST_SOURCE = 10  # client source addresses are 127.0.0.10, 127.0.0.11, ...


@dataclass
class Options:
    workers: int = 2
    pairs: int = 48
    sources: int = 8
    rate: float = 20.0
    frame_size: int = 64
    events: tuple[str, ...] = EVENTS
    kill_slot: int = 0
    stop_slot: int = -1  # -1: the last slot
    stop_seconds: float = 5.0
    warmup: float = 2.0
    settle: float = 2.0
    stall: float = 1.0
    relink_timeout: float = 20.0
    probe_interval: float = 0.2
    workdir: str | None = None

    def check(self) -> None:
        if self.workers < 1:
            raise ValueError("--workers must be at least 1")
        if self.pairs < 1:
            raise ValueError("--pairs must be at least 1")
        if not 1 <= self.sources <= 200:
            raise ValueError("--sources must be 1..200")
        if not 0 < self.rate <= 1000:
            raise ValueError("--rate must be in (0, 1000] frames/s")
        if not HEADER.size <= self.frame_size <= 1024:
            raise ValueError(f"--frame-size must be {HEADER.size}..1024")
        for name in self.events:
            if name not in EVENTS + EXTRA_EVENTS:
                known = ", ".join(EVENTS + EXTRA_EVENTS)
                raise ValueError(f"unknown event {name!r}; one of {known}")
        for slot in (self.kill_slot, self.stop_slot):
            if not -self.workers <= slot < self.workers:
                raise ValueError(f"worker slot {slot} does not exist with {self.workers}")
        for name in ("stop_seconds", "warmup", "settle", "stall", "relink_timeout"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0")
        if not self.probe_interval > 0:
            raise ValueError("--probe-interval must be > 0")


# -- the clients ---------------------------------------------------------------------


@dataclass
class Direction:
    """The numbered frames one end sends to the other."""

    send_times: list[float] = field(default_factory=list)  # index: sequence number
    arrivals: list[tuple[int, float]] = field(default_factory=list)  # (seq, time)


class Endpoint:
    """One client of a pair: its worker slot, source address, key, and what happened."""

    def __init__(self, pair: Pair, side: int, slot: int, source: str) -> None:
        self.pair = pair
        self.side = side
        self.slot = slot
        self.source = source
        self.secret_key = os.urandom(32)
        self.public_key = public_key_of(self.secret_key)
        self.peer: Endpoint = self
        self.client: RelayClient | None = None
        self.shard: Shard | None = None
        self.connection_id: int | None = None
        self.linked = False
        self.marks: list[tuple[float, str]] = []  # (time, CLOSED | DISCONNECTED | CONNECTED)
        self.outgoing = Direction()  # frames this end sends to its peer

    @property
    def name(self) -> str:
        return f"pair {self.pair.index}{'ab'[self.side]} (slot {self.slot})"


class Pair:
    def __init__(self, index: int, slots: tuple[int, int], sources: tuple[str, str]) -> None:
        self.index = index
        self.slots = slots
        self.a = Endpoint(self, 0, slots[0], sources[0])
        self.b = Endpoint(self, 1, slots[1], sources[1])
        self.a.peer, self.b.peer = self.b, self.a

    @property
    def ends(self) -> tuple[Endpoint, Endpoint]:
        return self.a, self.b

    @property
    def placement(self) -> str:
        return "same-shard" if self.slots[0] == self.slots[1] else "cross-shard"


def placements(workers: int) -> list[tuple[int, int]]:
    """Every one-shard placement, then every cross-shard one."""
    same = [(slot, slot) for slot in range(workers)]
    cross = [(i, j) for i in range(workers) for j in range(i + 1, workers)]
    return same + cross


def make_pairs(options: Options) -> list[Pair]:
    places = placements(options.workers)
    sources = [f"127.0.0.{FIRST_SOURCE + i}" for i in range(options.sources)]
    pairs = []
    for index in range(options.pairs):
        ends = (sources[(2 * index) % len(sources)], sources[(2 * index + 1) % len(sources)])
        pairs.append(Pair(index, places[index % len(places)], ends))
    return pairs


@dataclass
class Probe:
    at: float  # started
    ended: float  # connected and confirmed, or failed
    ok: bool
    refused: bool
    error: str = ""


@dataclass
class Event:
    name: str
    started: float
    target: str = ""
    own_slots: tuple[int, ...] = ()
    action_done: float = 0.0
    recovered: float | None = None
    notes: dict[str, float | int | str] = field(default_factory=dict)


class Chaos:
    """The pairs, their traffic and the events, on one running cluster."""

    def __init__(self, cluster: RelayCluster, options: Options) -> None:
        self.cluster = cluster
        self.options = options
        self.pairs = make_pairs(options)
        self.loop = asyncio.get_running_loop()
        self.sending = False
        self.stopping = False
        self.misrouted = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.probes: list[Probe] = []
        self.events: list[Event] = []
        self.traffic_started = 0.0
        self.traffic_stopped = 0.0
        self.frames_per_tick = max(1, round(options.rate * TICK))
        self.tick = self.frames_per_tick / options.rate
        self.padding = bytes(options.frame_size - HEADER.size)

    @property
    def endpoints(self) -> Iterable[Endpoint]:
        for pair in self.pairs:
            yield from pair.ends

    def _spawn(self, coro) -> None:  # type: ignore[no-untyped-def]
        task = self.loop.create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- connecting ------------------------------------------------------------------

    async def _connect(self, endpoint: Endpoint, shard: Shard) -> RelayClient:
        return await RelayClient.connect(
            shard.host,
            shard.port,
            self.cluster.public_key,
            secret_key=endpoint.secret_key,
            local_addr=(endpoint.source, 0),
            timeout=CONNECT_TIMEOUT,
        )

    def _attach(self, endpoint: Endpoint, client: RelayClient, shard: Shard) -> None:
        endpoint.client = client
        endpoint.shard = shard
        endpoint.connection_id = None
        endpoint.linked = False
        client.on_packets = lambda packets: self._on_packets(endpoint, client, packets)
        self._on_packets(endpoint, client, client.pending_events())
        client.closed.add_done_callback(lambda _: self._on_closed(endpoint, client))
        client.route_request(endpoint.peer.public_key)

    async def connect_all(self) -> None:
        """Every client connected to its slot's shard and requesting its friend; all linked."""
        shards = self.cluster.shards()
        limit = asyncio.Semaphore(16)

        async def connect(endpoint: Endpoint) -> None:
            async with limit:
                shard = shards[endpoint.slot]
                self._attach(endpoint, await self._connect(endpoint, shard), shard)

        await asyncio.gather(*(connect(endpoint) for endpoint in self.endpoints))
        deadline = self.loop.time() + self.options.relink_timeout
        while not all(endpoint.linked for endpoint in self.endpoints):
            if self.loop.time() > deadline:
                unlinked = [e.name for e in self.endpoints if not e.linked]
                raise RuntimeError(f"not linked after {self.options.relink_timeout} s: {unlinked}")
            await asyncio.sleep(0.02)

    def _on_packets(self, endpoint: Endpoint, client: RelayClient, packets: list[Packet]) -> None:
        if endpoint.client is not client:
            return  # a connection this end has already replaced
        now = self.loop.time()
        for packet in packets:
            if isinstance(packet, RoutedData):
                self._on_data(endpoint, packet, now)
            elif isinstance(packet, RoutingResponse):
                if packet.public_key == endpoint.peer.public_key:
                    endpoint.connection_id = packet.connection_id
            elif isinstance(packet, ConnectNotification):
                if packet.connection_id == endpoint.connection_id:
                    endpoint.linked = True
                    endpoint.marks.append((now, CONNECTED))
            elif (
                isinstance(packet, DisconnectNotification)
                and packet.connection_id == endpoint.connection_id
            ):
                endpoint.linked = False
                endpoint.marks.append((now, DISCONNECTED))

    def _on_data(self, endpoint: Endpoint, packet: RoutedData, now: float) -> None:
        payload = packet.payload
        if packet.connection_id != endpoint.connection_id or len(payload) < HEADER.size:
            self.misrouted += 1
            return
        pair_index, side, seq = HEADER.unpack_from(payload)
        if pair_index != endpoint.pair.index or side != endpoint.peer.side:
            self.misrouted += 1
            return
        endpoint.peer.outgoing.arrivals.append((seq, now))

    def _on_closed(self, endpoint: Endpoint, client: RelayClient) -> None:
        if endpoint.client is not client or self.stopping:
            return
        endpoint.marks.append((self.loop.time(), CLOSED))
        endpoint.linked = False
        endpoint.client = None
        self._spawn(self._reconnect(endpoint))

    async def _reconnect(self, endpoint: Endpoint) -> None:
        """As toxcore does: connect again (same key and source), request the friend again.

        To the slot's new shard once the relay has printed it; to the same shard if its
        worker still runs (the worker closed this connection itself)."""
        old = endpoint.shard
        assert old is not None
        while not self.stopping:
            shard = self.cluster.shards()[endpoint.slot]
            if shard.shard == old.shard and not runs_worker_or_coordinator(old.pid):
                await asyncio.sleep(0.01)  # the worker died; its replacement is not up yet
                continue
            try:
                client = await self._connect(endpoint, shard)
            except (OSError, TimeoutError, ConnectionClosed):
                await asyncio.sleep(0.05)
                continue
            if self.stopping:
                client.abort()
                return
            self._attach(endpoint, client, shard)
            return

    # -- traffic -----------------------------------------------------------------------

    def start_traffic(self) -> None:
        self.sending = True
        self.traffic_started = self.loop.time()
        self._spawn(self._send_loop())
        self._spawn(self._probe_loop())

    async def _send_loop(self) -> None:
        next_at = self.loop.time()
        while self.sending:
            now = self.loop.time()
            for endpoint in self.endpoints:
                self._send_frames(endpoint, now)
            next_at = max(next_at + self.tick, now)
            await asyncio.sleep(next_at - now)

    def _send_frames(self, endpoint: Endpoint, now: float) -> None:
        client, connection_id = endpoint.client, endpoint.connection_id
        if not endpoint.linked or client is None or connection_id is None:
            return
        transport = client.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > WRITE_BUFFER_LIMIT:
            return  # the relay is not reading (a stopped worker): send later
        sent = endpoint.outgoing.send_times
        for _ in range(self.frames_per_tick):
            header = HEADER.pack(endpoint.pair.index, endpoint.side, len(sent))
            client.queue(RoutedData(connection_id, header + self.padding))
            sent.append(now)
        client.flush()

    async def _probe_loop(self) -> None:
        """A fresh handshake on the shared port every ``probe_interval`` s."""
        while self.sending:
            at = self.loop.time()
            try:
                client = await RelayClient.connect(
                    self.cluster.host,
                    self.cluster.port,
                    self.cluster.public_key,
                    local_addr=(PROBE_SOURCE, 0),
                    timeout=CONNECT_TIMEOUT,
                )
            except ConnectionRefusedError as error:
                self.probes.append(Probe(at, self.loop.time(), False, True, str(error)))
            except (OSError, TimeoutError, ConnectionClosed) as error:
                self.probes.append(Probe(at, self.loop.time(), False, False, repr(error)))
            else:
                client.abort()
                self.probes.append(Probe(at, self.loop.time(), ok=True, refused=False))
            await asyncio.sleep(self.options.probe_interval)

    def _pair_flows_since(self, pair: Pair, event: Event) -> bool:
        """Both ends linked and both directions delivered a frame after the event's
        action and after the pair's last disconnect or close."""
        breaks = [
            at
            for endpoint in pair.ends
            for at, kind in endpoint.marks
            if kind != CONNECTED and at >= event.started
        ]
        since = max([event.action_done, *breaks])
        for endpoint in pair.ends:
            if not endpoint.linked:
                return False
            arrivals = endpoint.outgoing.arrivals
            if not arrivals or arrivals[-1][1] <= since:
                return False
        return True

    async def drain(self) -> None:
        """Stop sending; wait (at most 5 s, or 2 s without progress) for what is in flight."""
        self.sending = False
        self.traffic_stopped = self.loop.time()
        directions = [endpoint.outgoing for endpoint in self.endpoints]
        deadline = self.traffic_stopped + 5.0
        last_count, last_progress = -1, self.loop.time()
        while self.loop.time() < deadline:
            count = sum(len(direction.arrivals) for direction in directions)
            if all(len({seq for seq, _ in d.arrivals}) >= len(d.send_times) for d in directions):
                return
            if count != last_count:
                last_count, last_progress = count, self.loop.time()
            elif self.loop.time() - last_progress > 2.0:
                return
            await asyncio.sleep(0.05)

    async def close(self) -> None:
        self.sending = False
        self.stopping = True
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for endpoint in self.endpoints:
            if endpoint.client is not None:
                endpoint.client.abort()

    # -- events ------------------------------------------------------------------------

    async def run_event(self, name: str) -> Event:
        """Inject one fault, wait until every pair passes traffic again, then settle."""
        options = self.options
        shards = self.cluster.shards()
        event = Event(name, self.loop.time())
        self.events.append(event)
        if name == "kill-worker":
            slot = options.kill_slot % options.workers
            shard = shards[slot]
            event.own_slots = (slot,)
            event.target = f"worker slot {slot} (shard {shard.shard}, pid {shard.pid})"
            os.kill(shard.pid, signal.SIGKILL)
            new = await self.cluster.wait_for_shard(slot, shard.shard, options.relink_timeout)
            event.notes["replacement_announced_s"] = round(self.loop.time() - event.started, 3)
            event.notes["replacement"] = f"shard {new.shard}, pid {new.pid}"
        elif name == "kill-both":
            slot = options.kill_slot % options.workers
            shard, pid = shards[slot], self.cluster.coordinator_pid()
            event.own_slots = (slot,)
            event.target = (
                f"coordinator (pid {pid}), then at once worker slot {slot} "
                f"(shard {shard.shard}, pid {shard.pid})"
            )
            os.kill(pid, signal.SIGKILL)
            os.kill(shard.pid, signal.SIGKILL)
            await self.cluster.wait_for_coordinator(pid, options.relink_timeout)
            event.notes["coordinator_back_s"] = round(self.loop.time() - event.started, 3)
            await self.cluster.wait_for_shard(slot, shard.shard, options.relink_timeout)
            event.notes["replacement_announced_s"] = round(self.loop.time() - event.started, 3)
        elif name == "stop-coordinator":
            pid = self.cluster.coordinator_pid()
            event.target = f"coordinator (pid {pid})"
            os.kill(pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(options.stop_seconds)
            finally:
                os.kill(pid, signal.SIGCONT)
            event.notes["resumed_s"] = round(self.loop.time() - event.started, 3)
        elif name == "kill-coordinator":
            pid = self.cluster.coordinator_pid()
            event.target = f"coordinator (pid {pid})"
            os.kill(pid, signal.SIGKILL)
            new_pid = await self.cluster.wait_for_coordinator(pid, options.relink_timeout)
            event.notes["coordinator_back_s"] = round(self.loop.time() - event.started, 3)
            event.notes["replacement"] = f"pid {new_pid}"
        elif name == "stop-worker":
            slot = options.stop_slot % options.workers
            shard = shards[slot]
            event.own_slots = (slot,)
            event.target = f"worker slot {slot} (shard {shard.shard}, pid {shard.pid})"
            os.kill(shard.pid, signal.SIGSTOP)
            try:
                await asyncio.sleep(options.stop_seconds)
            finally:
                os.kill(shard.pid, signal.SIGCONT)
            event.notes["resumed_s"] = round(self.loop.time() - event.started, 3)
        elif name == "reload":
            event.own_slots = tuple(range(options.workers))
            event.target = f"supervisor (pid {self.cluster.pid}), {options.workers} workers"
            mark = len(self.cluster.lines)
            self.cluster.signal_supervisor(signal.SIGHUP)
            await self.cluster.wait_for_line("Reload complete", mark, 60.0)
            event.notes["reload_complete_s"] = round(self.loop.time() - event.started, 3)
        else:
            raise ValueError(f"unknown event {name!r}")
        event.action_done = self.loop.time()
        deadline = event.action_done + options.relink_timeout
        while not all(self._pair_flows_since(pair, event) for pair in self.pairs):
            if self.loop.time() > deadline:
                break
            await asyncio.sleep(0.02)
        else:
            event.recovered = self.loop.time()
        await asyncio.sleep(options.settle)
        return event


# -- running it ------------------------------------------------------------------------


async def run_chaos(options: Options) -> dict:
    """Start a cluster, run the traffic and the events, stop it; the report (a dict)."""
    options.check()
    own_workdir = options.workdir is None
    workdir = Path(options.workdir or tempfile.mkdtemp(prefix="toxrelay-chaos-"))
    started = time.monotonic()
    load_average = round(os.getloadavg()[0], 2)
    cluster = await asyncio.to_thread(RelayCluster, workdir, options.workers)
    chaos = Chaos(cluster, options)
    try:
        await chaos.connect_all()
        chaos.start_traffic()
        await asyncio.sleep(options.warmup)
        for name in options.events:
            await chaos.run_event(name)
        await chaos.drain()
        result = analyse(chaos)
    finally:
        await chaos.close()
        await asyncio.to_thread(cluster.stop)
    result["options"] = asdict(options)
    result["wall_s"] = round(time.monotonic() - started, 1)
    result["cpus"] = os.cpu_count()
    result["load_average_1m"] = load_average
    result["relay_log_tail"] = cluster.stderr_text().splitlines()[-40:]
    if own_workdir:
        with contextlib.suppress(OSError):
            for path in sorted(workdir.rglob("*"), reverse=True):
                path.rmdir() if path.is_dir() else path.unlink()
            workdir.rmdir()
    return result


def parse_args(argv: Sequence[str] | None) -> tuple[Options, bool, Path | None]:
    """The run's options, whether to print JSON, and the markdown file to update."""
    defaults = Options()
    parser = argparse.ArgumentParser(
        prog="python3 -m ops.bench.chaos",
        description="Kill, stop and reload parts of a real relay cluster while client pairs "
        "relay numbered frames; report the pairs disrupted, time to relink and frames lost.",
    )
    add = parser.add_argument
    add("--workers", type=int, default=defaults.workers, help="worker processes (default 2)")
    add("--pairs", type=int, default=defaults.pairs, help="client pairs (default 48)")
    add("--sources", type=int, default=defaults.sources, help="127.0.0.x source addresses")
    add("--rate", type=float, default=defaults.rate, help="frames/s each end sends")
    add("--frame-size", type=int, default=defaults.frame_size, help="payload bytes per frame")
    add(
        "--events",
        default=",".join(defaults.events),
        help=f"comma-separated, in order, repeats allowed (default {','.join(EVENTS)}; "
        f"also: {','.join(EXTRA_EVENTS)})",
    )
    add("--kill-slot", type=int, default=defaults.kill_slot, help="worker slot to kill -9")
    add("--stop-slot", type=int, default=defaults.stop_slot, help="slot to SIGSTOP (-1 last)")
    add("--stop-seconds", type=float, default=defaults.stop_seconds, help="SIGSTOP duration")
    add("--warmup", type=float, default=defaults.warmup, help="seconds of traffic before")
    add("--settle", type=float, default=defaults.settle, help="seconds after each recovery")
    add("--stall", type=float, default=defaults.stall, help="a pause this long disrupts a pair")
    add("--relink-timeout", type=float, default=defaults.relink_timeout, help="seconds")
    add("--probe-interval", type=float, default=defaults.probe_interval, help="seconds")
    add("--workdir", help="relay work directory (default: a temporary one, removed after)")
    add("--json", action="store_true", help="print the result as one JSON object")
    add(
        "--doc",
        type=Path,
        metavar="MARKDOWN",
        help='also write the "Chaos run" section of this file (e.g. docs/benchmarks.md)',
    )
    args = parser.parse_args(argv)
    values = {k: v for k, v in vars(args).items() if k not in ("json", "doc")}
    values["events"] = tuple(name.strip() for name in args.events.split(",") if name.strip())
    options = Options(**values)
    try:
        options.check()
    except ValueError as error:
        parser.error(str(error))
    return options, args.json, args.doc


def main(argv: Sequence[str] | None = None) -> int:
    options, as_json, doc = parse_args(argv)
    result = uvloop.run(run_chaos(options))
    if doc is not None:
        args = sys.argv[1:] if argv is None else list(argv)
        command = shlex.join(["python3", "-m", "ops.bench.chaos", *args])
        date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        section = render_markdown(result, command, date)
        doc.write_text(splice_section(doc.read_text() if doc.exists() else "", section))
    if as_json:
        print(json.dumps(result))
    else:
        print(format_table(result))
    return 0 if result["goals_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
