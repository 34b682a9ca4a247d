"""An N-shard relay cluster in one process, and the one-server reference.

``SimulatedCluster(n_shards)`` wires N ``RelayServer(shard=i)``
shards (shard ids 1..N; a restarted worker is a new shard id, as
docs/architecture.md builds it) and one ``coordinator.directory.Directory``
with FIFO channels:

* registry channel, shard -> coordinator (REGISTER / UNREGISTER events, and
  snapshot requests, behind the events as on the worker's one DEALER);
* map-update channel, coordinator -> each shard (sequenced SET / DEL /
  DROP_SHARD, and heartbeats: live shards for ``set_peer_shards`` and the
  last sequence number), as the coordinator publishes them; each shard's
  side is the real ``coordinator.replica.Replica`` (apply in sequence; a gap
  buffers and fetches a snapshot, ``reset_directory``; a coordinator restart
  re-registers and merges), as the worker's CoordinatorClient drives it;
* snapshot channel, coordinator -> a shard that asked;
* bus channel per ordered pair of shards (WANT, LINKED, NOLINK, UNLINK, DATA,
  OOB); a dead worker's messages already on the bus stay in flight, those
  towards it are lost.

Faults: ``crash`` (a worker dies; DROP_SHARD; a new worker with a new id),
``stall`` (the coordinator drops a live worker; it sees its own DROP_SHARD,
gives its clients new epochs and registers them again), ``lose_update`` (one
map update to one worker is lost: a gap, a snapshot) and
``restart_coordinator`` (a new coordinator with an empty map: every replica
registers its clients again and merges the new snapshot).

Nothing moves by itself: ``deliver_one(choice)`` delivers the head of one
non-empty channel picked by the caller, so a test chooses any interleaving
*across* channels while each channel stays in order (the peer bus and the
map PUB/SUB are ordered per pair). ``quiesce(chooser)`` delivers until every
channel is empty. After every delivery the affected shard's output is
collected: client bytes (decoded by each client at once), registry events and
bus messages.

``SingleShard`` runs the same client script against one plain
``RelayServer()`` (no shard): the reference of invariant 1 (equivalence).

Clients are sans-IO ``relaycore.client.ClientConnection`` s; bytes between a
client and its shard move immediately (the ideas of tests/relaycore/harness.py:
write a closed connection's outbox, then close it; a client that closed its
socket, or whose shard crashed, receives nothing more). Each client records
the packets it decodes, with public keys replaced by identity names, and keeps
its own view of its routing slots (ROUTING_RESPONSE -> requested, 02 ->
linked, 03 -> requested); a packet that contradicts that view is a violation
of invariant 3 (data on a slot that is not linked) or 4 (a second 03 for one
link, an 02 for a linked slot).
"""

from __future__ import annotations

import random
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from coordinator.directory import Directory
from coordinator.replica import Replica, Reregister, SnapshotRequest
from relaycore.client import ClientConnection
from relaycore.crypto import public_key_of
from relaycore.errors import ProtocolViolation
from relaycore.options import RelayOptions
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    OobReceive,
    Packet,
    Ping,
    Pong,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import ConnectionState, RelayServer, ServerConnection, SlotState
from relaycore.shardlink import Link, MapUpdate, Registry, RemotePeer
from tests.relaycore.harness import SERVER_SK, CountingRandom, secret_key_for

# The core keeps connections in sets (``_wanting``, ``_remote_links``,
# ``_waiting``) whose order decides the order of bus messages made in one call;
# with the default hash (the object's address) that order changes from one run
# of an example to the next, and hypothesis cannot replay or shrink it. Hash by
# the per-server serial instead: still consistent with identity equality.
ServerConnection.__hash__ = lambda self: self.serial  # type: ignore[method-assign,assignment]

IDENTITIES = ("alice", "bob", "carol", "dave", "erin", "frank")
SECRET_KEYS = {name: secret_key_for(name) for name in IDENTITIES}
PUBLIC_KEYS = {name: public_key_of(key) for name, key in SECRET_KEYS.items()}
NAME_OF = {key: name for name, key in PUBLIC_KEYS.items()}

#: A delivery schedule: called with the number of non-empty channels, returns
#: the index of the one to deliver next.
Chooser = Callable[[int], int]

#: Both worlds: no server PINGs (their ids are random, and no timer of the
#: model runs for 30 s); everything else as the defaults.
OPTIONS = RelayOptions(ping_interval=1e9, ping_timeout=1e8)

#: Deliveries after which ``quiesce`` calls it a livelock.
MAX_DELIVERIES = 5_000

#: With ``coalesce_updates``, a delivered publication takes up to this many - 1
#: of those queued behind it along (the choice's high part decides how many):
#: the coordinator sends the updates it held back together.
MAX_COALESCED = 4


def name_of(public_key: bytes) -> str:
    return NAME_OF.get(public_key, public_key.hex()[:12])


def describe(packet: Packet) -> tuple:
    """A packet as a comparable tuple, public keys replaced by identity names."""
    match packet:
        case RoutingResponse(connection_id, public_key):
            return ("route", connection_id, name_of(public_key))
        case ConnectNotification(connection_id):
            return ("connect", connection_id)
        case DisconnectNotification(connection_id):
            return ("disconnect", connection_id)
        case RoutedData(connection_id, payload):
            return ("data", connection_id, payload)
        case OobReceive(sender, data):
            return ("oob", name_of(sender), data)
        case Pong(ping_id):
            return ("pong", ping_id)
        case Ping(ping_id):
            return ("ping", ping_id)
    return ("other", repr(packet))


class ScheduleChooser:
    """A delivery order drawn from one integer: 0 always picks the first
    non-empty channel (registry, then map updates, then the bus pairs in
    order); any other value seeds a pseudo-random pick per delivery. One
    integer per step keeps a printed failing example short and replayable."""

    def __init__(self, seed: int = 0) -> None:
        self._random = random.Random(seed) if seed else None

    def __call__(self, options: int) -> int:
        return self._random.randrange(options) if self._random else 0


@dataclass(eq=False)
class SlotView:
    """What a client believes about one of its slot ids."""

    peer: str  # identity name the slot is for
    linked: bool = False


@dataclass(eq=False)
class ClientRecord:
    """One client connection and everything it observed."""

    index: int
    identity: str
    shard: int  # where it connected (nominal for the reference)
    client: ClientConnection
    connection: ServerConnection
    server: RelayServer
    events: list[tuple[int, tuple]] = field(default_factory=list)  # (step, packet)
    slots: dict[int, SlotView] = field(default_factory=dict)
    # Ids the client gave up (03 sent) that a server holding its frames (a
    # requester waiting for another shard's answer) may not have read yet:
    # packets for them are not checked until a ROUTING_RESPONSE to a request
    # sent after that 03 reuses the id. Value: routing requests sent before it.
    freed: dict[int, int] = field(default_factory=dict)
    frames_sent: int = 0
    requests_sent: int = 0
    responses_seen: int = 0
    closed: bool = False  # the server closed the connection
    close_reason: str | None = None
    closed_at: int | None = None  # the step
    eof: bool = False  # the client closed its socket
    crashed: bool = False  # its shard died
    violations: list[str] = field(default_factory=list)

    @property
    def live(self) -> bool:
        return not (self.closed or self.eof or self.crashed)

    @property
    def gone(self) -> bool:
        """Nothing more reaches this client (socket closed by either side)."""
        return self.eof or self.crashed

    def __repr__(self) -> str:
        return f"<client {self.index} {self.identity}@{self.shard}>"

    def sent(self, packet: Packet) -> None:
        self.frames_sent += 1
        if isinstance(packet, RoutingRequest):
            self.requests_sent += 1
        elif (
            isinstance(packet, DisconnectNotification)
            and self.slots.pop(packet.connection_id, None) is not None
        ):
            self.freed[packet.connection_id] = self.requests_sent

    def observe(self, step: int, packet: Packet) -> None:
        """Record ``packet`` and check it against the client's slot view."""
        description = describe(packet)
        self.events.append((step, description))
        connection_id = getattr(packet, "connection_id", None)
        if isinstance(packet, RoutingResponse):
            self.responses_seen += 1
            if self.responses_seen > self.freed.get(connection_id, self.responses_seen):
                del self.freed[connection_id]  # answers a request sent after the 03
        if connection_id in self.freed:
            return  # about an id given up in a frame the server has not read yet
        match packet:
            case RoutingResponse(connection_id, public_key) if connection_id >= 16:
                peer = name_of(public_key)
                view = self.slots.get(connection_id)
                if view is None:
                    self.slots[connection_id] = SlotView(peer)
                elif view.peer != peer:  # R-ROUTE-3: same key, same slot
                    self._violate(step, f"slot {connection_id} of {view.peer} answered for {peer}")
            case ConnectNotification(connection_id):
                view = self.slots.get(connection_id)
                if view is None or view.linked:  # invariant 4 / R-ROUTE-6: one 02 per link
                    self._violate(step, f"02 {connection_id} for slot view {view}")
                else:
                    view.linked = True
            case DisconnectNotification(connection_id):
                view = self.slots.get(connection_id)
                if view is None or not view.linked:  # invariant 4: one 03 per link end
                    self._violate(step, f"03 {connection_id} for slot view {view}")
                else:
                    view.linked = False
            case RoutedData(connection_id, payload):
                view = self.slots.get(connection_id)
                if view is None or not view.linked:  # invariant 3
                    self._violate(step, f"data {payload!r} on unlinked id {connection_id}")
                elif not payload.startswith(view.peer.encode() + b"#"):  # invariant 3
                    self._violate(step, f"data {payload!r} on id {connection_id} of {view.peer}")

    def _violate(self, step: int, message: str) -> None:
        self.violations.append(f"step {step}: {self!r}: {message}")

    def observations(self, step: int) -> list[tuple]:
        return [description for at, description in self.events if at == step]


class _Driver:
    """Clients, byte pumping and the per-step record shared by both worlds."""

    def __init__(self) -> None:
        self.clients: list[ClientRecord] = []
        self._by_connection: dict[ServerConnection, ClientRecord] = {}
        self.step = 0
        self.now = 0.0

    # -- client actions (the same script runs on both worlds) ------------

    def begin_step(self) -> int:
        self.step += 1
        return self.step

    def _server_of_shard(self, shard: int) -> RelayServer:
        raise NotImplementedError

    def connect(self, identity: str, shard: int, *, confirm: bool = True) -> ClientRecord:
        """Handshake; ``confirm`` sends a PING as first frame (R-CONF-2, as toxcore)."""
        server = self._server_of_shard(shard)
        client = ClientConnection(SECRET_KEYS[identity], server.public_key)
        connection = server.open_connection("10.0.0.1", self.now)
        record = ClientRecord(len(self.clients), identity, shard, client, connection, server)
        self.clients.append(record)
        self._by_connection[connection] = record
        self._pump(server)
        if confirm:
            self.send(record.index, Ping(b"ping%04d" % record.index))
        return record

    def send(self, index: int, packet: Packet) -> None:
        record = self.clients[index]
        assert record.live, record
        record.client.send(packet)
        record.sent(packet)
        self._pump(record.server)

    def tick(self, now: float) -> None:
        """Time passes: the timers of every server (§10)."""
        self.now = now
        for server in self._live_servers():
            server.tick(now)
            self._pump(server)

    def _live_servers(self) -> list[RelayServer]:
        raise NotImplementedError

    def close(self, index: int) -> None:
        """The client closes its socket (R-KILL-4: killed on EOF)."""
        record = self.clients[index]
        record.eof = True
        record.server.peer_closed(record.connection, self.now)
        self._after_call(record.server)
        self._pump(record.server)

    # -- pumping -----------------------------------------------------------

    def _after_call(self, server: RelayServer) -> None:
        """Hook: collect what else a core call produced (cluster: registry, bus)."""

    def _pump(self, server: RelayServer) -> None:
        """Collect the server's output and feed client bytes (PONGs) back."""
        moved = True
        while moved:
            moved = False
            self._collect(server)
            for record in self.clients:
                if record.server is not server:
                    continue
                data = record.client.take_outbox()
                if record.closed or record.gone:
                    continue
                if data:
                    server.receive(record.connection, data, self.now)
                elif record.connection.more_input:  # the adapter's later turn
                    server.receive(record.connection, b"", self.now)
                else:
                    continue
                moved = True

    def _collect(self, server: RelayServer) -> None:
        for connection in server.take_dirty():
            self._deliver(self._by_connection[connection])
        for connection in server.take_closed():
            record = self._by_connection[connection]
            self._deliver(record)  # R-ORDER-2: what the call produced, then the close
            record.closed = True
            record.close_reason = connection.close_reason
            record.closed_at = self.step
        self._after_call(server)

    def _deliver(self, record: ClientRecord) -> None:
        data = record.connection.data_to_send()
        if not data:
            return
        if record.closed:  # R-KILL-1: a killed connection receives nothing
            record.violations.append(f"{record!r}: {len(data)} bytes after its close")
            return
        if record.gone:
            return
        try:
            packets = record.client.receive(data)
        except ProtocolViolation as error:  # a packet no relay may send
            record.violations.append(f"{record!r}: client refused server bytes: {error}")
            return
        for packet in packets:
            record.observe(self.step, packet)

    # -- views for the invariants -----------------------------------------

    def slot_table(self, index: int) -> list[tuple[int, str, str]]:
        """The server-side slots of one client: (id, peer identity, state)."""
        connection = self.clients[index].connection
        return [
            (i + 16, name_of(slot.public_key), slot.state.value)
            for i, slot in enumerate(connection.slots)
            if slot is not None
        ]


class SingleShard(_Driver):
    """The reference: one ``RelayServer()`` without a shard."""

    def __init__(self) -> None:
        super().__init__()
        self.server = RelayServer(SERVER_SK, OPTIONS, random_bytes=CountingRandom())

    def _server_of_shard(self, shard: int) -> RelayServer:
        return self.server

    def _live_servers(self) -> list[RelayServer]:
        return [self.server]

    def crash(self, shard: int) -> None:
        """What a worker crash means to one server: every connection of that
        shard is killed (R-KILL-1), its clients receive nothing more."""
        for record in self.clients:
            if record.shard == shard and not record.closed:
                record.crashed = True
                self.server.kill(record.connection, "worker_crash")
        self._pump(self.server)


class SimulatedCluster(_Driver):
    """N worker positions, one coordinator directory, FIFO channels.

    As in docs/architecture.md (as built), every worker *process* has its own
    shard id, also the incarnation part of its epochs; a crashed worker's
    successor is a new shard. ``positions[p]`` is the shard id now serving
    worker position ``p`` (clients connect to a position)."""

    def __init__(self, n_shards: int) -> None:
        super().__init__()
        assert n_shards >= 1
        self.n_shards = n_shards
        self.directory = Directory()
        self.servers: dict[int, RelayServer] = {}  # live shards by id
        self.positions: list[int] = []
        # REGISTER / UNREGISTER events, and ("SNAPSHOT", request) requests, in order
        self.registry: dict[int, deque[tuple]] = {}
        # The coordinator's publications: ["u", incarnation, [[sequence, update]]]
        # (one update each) and heartbeats ["hb", incarnation, sequence, live shards]
        self.updates: dict[int, deque[list]] = {}
        # ["snapshot", incarnation, sequence, entries, request]
        self.snapshots: dict[int, deque[list]] = {}
        self.replicas: dict[int, Replica] = {}  # each shard's side, the real one
        self.coordinator = 1  # its incarnation (a restart makes a new one)
        self.announced: set[int] = set()  # live shards, as the heartbeat lists them
        self.lost_updates = 0
        # Publications delivered several at once (``_coalesce``); off where a
        # scenario's schedules were written for one update per delivery.
        self.coalesce_updates = False
        self.coordinator_restarts = 0
        self.bus: dict[tuple[int, int], deque[tuple]] = {}
        self.deliveries = 0
        self.delivered: Counter[str] = Counter()  # per message kind (coverage)
        self.crashes = 0
        for _ in range(n_shards):
            self.positions.append(self._start_shard(len(self.positions) + 1))
        self._announce_shards()

    def _start_shard(self, shard: int) -> int:
        """A new worker process with shard id ``shard``: replica from a snapshot."""
        self._next_shard = shard + 1
        server = RelayServer(
            SERVER_SK,
            OPTIONS,
            random_bytes=CountingRandom(),
            shard=shard,
        )
        self.servers[shard] = server
        self.registry[shard] = deque()
        self.updates[shard] = deque()
        self.snapshots[shard] = deque()
        self.announced.add(shard)
        replica = self.replicas[shard] = Replica(_ReplicaSide(self, server))
        # The worker reads its first snapshot before it serves clients.
        replica.start(self.now)
        [request] = replica.take_requests()
        assert isinstance(request, SnapshotRequest)
        server.cluster.snapshot_requested(request.number)
        replica.snapshot(self._snapshot_reply(request.number), self.now)
        return shard

    def _snapshot_reply(self, request: int) -> list:
        sequence, entries = self.directory.snapshot()
        return ["snapshot", self.coordinator, sequence, entries, request]

    @property
    def resyncs(self) -> int:
        """Snapshots fetched after the first one, over every live shard."""
        return sum(replica.resyncs - 1 for replica in self.replicas.values())

    def _send_requests(self, shard: int) -> None:
        """What the shard's replica asks for goes on its registry channel, in
        order, as CoordinatorClient sends it on its DEALER."""
        for request in self.replicas[shard].take_requests():
            if isinstance(request, Reregister):
                self.registry[shard].extend(request.events)
            elif isinstance(request, SnapshotRequest):
                self.servers[shard].cluster.snapshot_requested(request.number)
                self.registry[shard].append(("SNAPSHOT", request.number))

    def _announce_shards(self) -> None:
        """The coordinator's heartbeat: the live shards (peer_shards) and the
        last sequence number (a replica that missed the last update resyncs)."""
        heartbeat = ["hb", self.coordinator, self.directory.sequence, sorted(self.announced)]
        for queue in self.updates.values():
            queue.append(heartbeat)

    def _server_of_shard(self, shard: int) -> RelayServer:
        return self.servers[self.positions[shard]]

    # -- channels ------------------------------------------------------------

    def channels(self) -> list[tuple[str, object, deque]]:
        """Every channel in a fixed order: (kind, address, queue)."""
        found: list[tuple[str, object, deque]] = []
        found += [("registry", s, q) for s, q in sorted(self.registry.items())]
        found += [("update", s, q) for s, q in sorted(self.updates.items())]
        found += [("snapshot", s, q) for s, q in sorted(self.snapshots.items())]
        found += [("bus", pair, q) for pair, q in sorted(self.bus.items())]
        return found

    def pending(self) -> list[tuple[str, object, deque]]:
        return [channel for channel in self.channels() if channel[2]]

    def deliver_one(self, choice: int) -> bool:
        """Deliver the head of the ``choice``-th non-empty channel (modulo their
        number); False when every channel is empty."""
        pending = self.pending()
        if not pending:
            return False
        kind, address, queue = pending[choice % len(pending)]
        message = queue.popleft()
        self.deliveries += 1
        self.delivered[_kind_name(kind, message)] += 1
        if kind == "update" and message[0] == "u" and self.coalesce_updates:
            message = self._coalesce(message, queue, choice // len(pending) % MAX_COALESCED)
        if kind == "registry":
            assert isinstance(address, int)
            if message[0] == "SNAPSHOT":
                self.snapshots[address].append(self._snapshot_reply(message[1]))
                return True
            if address not in self.announced:  # a dropped shard speaks again
                self.announced.add(address)
                self._announce_shards()
            self._publish(self.directory.apply_event(address, message))
        elif kind == "update" or kind == "snapshot":
            assert isinstance(address, int)
            replica = self.replicas[address]
            if kind == "update":
                replica.publication(message, self.now)
            else:
                replica.snapshot(message, self.now)
            self._send_requests(address)
            self._pump(self.servers[address])
        else:
            source, destination = address  # type: ignore[misc]
            server = self.servers[destination]
            server.cluster.receive_link(source, message, self.now)
            self._pump(server)
        return True

    def quiesce(self, chooser: Chooser = lambda options: 0) -> int:
        """Deliver, in the order ``chooser`` picks, until nothing is in flight;
        returns the number of deliveries. A livelock fails."""
        count = 0
        while True:
            pending = len(self.pending())
            if not pending:
                return count
            self.deliver_one(chooser(pending))
            count += 1
            assert count < MAX_DELIVERIES, "the cluster does not quiesce (livelock)"

    @staticmethod
    def _coalesce(message: list, queue: deque[list], more: int) -> list:
        """``message`` and up to ``more`` publications that follow it in the
        queue, as the one message the coordinator sends when it publishes
        several workers' events together (its pacing holds them), so that a
        replica applies them as one batch (``apply_map_updates``)."""
        updates = list(message[2])
        while more and queue and queue[0][0] == "u" and queue[0][1] == message[1]:
            updates += queue.popleft()[2]
            more -= 1
        return ["u", message[1], updates]

    def _publish(self, updates: list[tuple[int, tuple]]) -> None:
        for queue in self.updates.values():
            queue.extend(
                ["u", self.coordinator, [[sequence, update]]] for sequence, update in updates
            )

    def _after_call(self, server: RelayServer) -> None:
        shard = server.shard
        assert shard is not None
        if self.servers.get(shard) is not server:
            server.cluster.take_registry()  # a dead worker: its output is lost
            server.cluster.take_bus(self.now)
            return
        self.registry[shard].extend(server.cluster.take_registry())
        for destination, message in server.cluster.take_bus(self.now):
            # Same-shard links never touch the bus (docs/architecture.md).
            assert destination != shard, (shard, message)
            if destination in self.servers:  # a PUSH to a dead worker goes nowhere
                self.bus.setdefault((shard, destination), deque()).append(message)

    def _live_servers(self) -> list[RelayServer]:
        return [server for _, server in sorted(self.servers.items())]

    def held_round_due(self) -> float | None:
        """When the first re-WANT round a live shard holds back may go."""
        due = [server.cluster.held_round_due() for server in self._live_servers()]
        return min((when for when in due if when is not None), default=None)

    def tick(self, now: float) -> None:
        """Time passes: the servers' timers, and each replica's (a snapshot not
        answered in time, the full one after a coordinator restart's merge)."""
        super().tick(now)
        for shard, replica in sorted(self.replicas.items()):
            replica.timer(now)
            self._send_requests(shard)

    # -- faults ----------------------------------------------------------------

    def stall(self, shard: int) -> None:
        """The coordinator drops the live worker at position ``shard`` (silent
        for 3 s, e.g. SIGSTOP). It reads its own DROP_SHARD later, ends its
        side of its links and registers its clients again."""
        dead = self.positions[shard]
        if dead not in self.announced and all(
            s != dead for s, _ in self.directory.entries.values()
        ):
            return  # coordinator/service.py ``_drop``: not seen since its last drop
        self.announced.discard(dead)
        self._publish(self.directory.drop_shard(dead, exited=False))
        self._announce_shards()

    def lose_update(self, shard: int) -> bool:
        """The map update at the head of position ``shard``'s channel is lost
        (PUB/SUB past its high-water mark); False if there was none."""
        queue = self.updates[self.positions[shard]]
        for index, message in enumerate(queue):
            if message[0] == "u":
                del queue[index]
                self.lost_updates += 1
                return True
        return False

    def restart_coordinator(self) -> None:
        """The coordinator process is replaced (docs/operations.md: the
        supervisor restarts it): a new incarnation with an empty map. What
        the old one had published or was answering is lost with it; what the
        shards had queued on their DEALERs reaches the new one. Its first
        heartbeat makes every replica register its clients again and merge
        the new snapshot (coordinator/replica.py), no link ending."""
        self.coordinator += 1
        self.coordinator_restarts += 1
        self.directory = Directory()
        self.announced = set(self.servers)
        for queue in (*self.updates.values(), *self.snapshots.values()):
            queue.clear()
        self._announce_shards()

    def deliver_until(self, done: Callable[[], bool], chooser: Chooser) -> int:
        """Deliver in the order ``chooser`` picks until ``done()`` or nothing is
        in flight; the number of deliveries."""
        count = 0
        while not done():
            pending = len(self.pending())
            if not pending:
                break
            self.deliver_one(chooser(pending))
            count += 1
            assert count < MAX_DELIVERIES, "the cluster does not quiesce (livelock)"
        return count

    def heartbeat(self) -> None:
        """The coordinator's periodic heartbeat (live shards, last sequence)."""
        self._announce_shards()

    def crash(self, shard: int) -> None:
        """The worker at position ``shard`` dies; the supervisor starts a new
        one (a new shard id) and tells the coordinator (DROP_SHARD).

        The dead worker's clients lose their sockets (no UNLINK leaves it);
        what was queued *towards* it is lost, what it had already put on the
        bus stays in flight; its coordinator channels go with it."""
        self.crashes += 1
        dead = self.positions[shard]
        server = self.servers.pop(dead)
        for record in self.clients:
            if record.server is server and not record.closed:
                record.crashed = True
                record.closed = True
                record.close_reason = "worker_crash"
                record.closed_at = self.step
        del self.registry[dead], self.updates[dead], self.replicas[dead], self.snapshots[dead]
        self.announced.discard(dead)
        for pair in [pair for pair in self.bus if pair[1] == dead]:
            del self.bus[pair]
        self._publish(self.directory.drop_shard(dead, exited=True))
        self.positions[shard] = self._start_shard(self._next_shard)
        self._announce_shards()
        self._pump(self.servers[self.positions[shard]])


class _ReplicaSide:
    """The shard's side of its replica (worker/cluster_member.py's role): the
    map updates go to the relay table at the simulation's time."""

    def __init__(self, cluster: SimulatedCluster, server: RelayServer) -> None:
        self.cluster = cluster
        self.server = server

    def apply_map_update(self, update: tuple, now: float) -> None:
        self.server.cluster.apply_map_update(update, now)  # (own DROP_SHARD: new epochs, REGISTERs)

    def apply_map_updates(self, updates: list, now: float) -> None:
        self.server.cluster.apply_map_updates(updates, now)

    def reset_directory(self, entries: list, merge: bool, request: int | None, now: float) -> None:
        self.server.cluster.reset_directory(entries, now, merge=merge, request=request)

    def registrations(self) -> list[tuple[bytes, int]]:
        return self.server.cluster.registrations()

    def set_peer_shards(self, shards: list[int], now: float) -> None:
        self.server.cluster.set_peer_shards(shards, now)


def _kind_name(channel: str, message: tuple) -> str:
    if channel == "snapshot" or message[0] == "SNAPSHOT":
        return "SNAPSHOT"
    if channel == "registry":
        return Registry(message[0]).name
    if channel == "update":
        return "PEERS" if message[0] == "hb" else MapUpdate(message[2][0][1][0]).name
    return Link(message[0]).name


# ----------------------------------------------------------------------------
# Invariants
# ----------------------------------------------------------------------------


def equivalence_problems(
    cluster: SimulatedCluster, reference: SingleShard, step: int, *, unordered: bool = False
) -> list[str]:
    """Invariant 1: each client observed the same packets in this step, in the
    same order (as a multiset where ``unordered``: kills of several connections
    in one step, R-ORDER-4), is closed in both or in neither, and its
    server-side slot table is the same.

    One tolerated difference (see ``takeover_extras``): a connection that this
    step's R-CONF-3 kills may first get 03s for links its successor took over.
    """
    problems: list[str] = []
    assert len(cluster.clients) == len(reference.clients)
    for ours, theirs in zip(cluster.clients, reference.clients, strict=True):
        got, want = ours.observations(step), theirs.observations(step)
        if unordered:
            got, want = sorted(got), sorted(want)
        if got != want and takeover_extras(ours, theirs, step, got, want) is None:
            problems.append(f"{ours!r} step {step}: cluster saw {got}, one server {want}")
        if ours.closed != theirs.closed:
            problems.append(
                f"{ours!r}: closed={ours.closed} ({ours.close_reason}) in the cluster, "
                f"{theirs.closed} ({theirs.close_reason}) on one server"
            )
        if ours.live and cluster.slot_table(ours.index) != reference.slot_table(theirs.index):
            problems.append(
                f"{ours!r}: slots {cluster.slot_table(ours.index)} in the cluster, "
                f"{reference.slot_table(theirs.index)} on one server"
            )
    return problems


def takeover_extras(
    ours: ClientRecord, theirs: ClientRecord, step: int, got: list[tuple], want: list[tuple]
) -> list[tuple] | None:
    """The extra packets of the one known departure from invariant 1, or None.

    X is replaced by a new connection of its key on another shard (R-CONF-3),
    and the new one's first frame requests a peer P that is linked to X. One
    server kills X first: X sees nothing more. The cluster kills X only when
    the coordinator's SET reaches X's shard; meanwhile P's shard hands P's
    link over to the new connection and sends X's shard an UNLINK, which may
    arrive first: X gets a 03 just before it is killed (relay.py
    ``_linked_by_remote`` "that link ends first", and ``_route_request`` for
    a P on the new connection's shard). Tolerated only as: X is killed by
    R-CONF-3 in this very step in both worlds, and the extras are 03s."""
    if not (
        ours.closed_at == step == theirs.closed_at
        and ours.close_reason == theirs.close_reason == "R-CONF-3"
    ):
        return None
    extras, rest = [], iter(want)
    expected = next(rest, None)
    for packet in got:
        if packet == expected:
            expected = next(rest, None)
        elif packet[0] == "disconnect":
            extras.append(packet)
        else:
            return None
    return extras if expected is None else None


def link_problems(cluster: SimulatedCluster) -> list[str]:
    """Invariant 2 (after quiescence), and the bookkeeping behind it.

    * a slot is LINKED iff the slot of its peer (same shard: ``peer``,
      ``peer_slot``; other shard: the connection with that key *and epoch*)
      is LINKED back to it, with matching epochs;
    * no two confirmed connections hold REQUESTED slots for each other (the
      re-sent WANTs converge; on one server R-ROUTE-6 links them at once);
    * every replica of the routing map equals the coordinator's map, and each
      shard's confirmed keys are exactly its entries there;
    * ``_remote_links`` and ``_wanting`` index exactly the slots that exist.
    """
    problems: list[str] = []
    located: dict[bytes, tuple[int, ServerConnection]] = {}
    for shard, server in cluster.servers.items():
        for key, connection in server.by_key.items():
            located[key] = (shard, connection)
    entries = cluster.directory.entries
    for shard, server in sorted(cluster.servers.items()):
        mine = {k: e for k, (s, e) in entries.items() if s == shard}
        confirmed = {k: c.epoch for k, c in server.by_key.items()}
        if mine != confirmed:
            problems.append(f"shard {shard}: confirmed {_names(confirmed)}, map {_names(mine)}")
        replica = {k: RemotePeer(s, k, e) for k, (s, e) in entries.items() if s != shard}
        if server.cluster.directory != replica:
            problems.append(f"shard {shard}: replica {server.cluster.directory} != map {replica}")
        remote_links: dict[RemotePeer, set[ServerConnection]] = {}
        wanting: dict[bytes, set[ServerConnection]] = {}
        for connection in server.by_key.values():
            who = f"shard {shard} {name_of(connection.public_key)}"
            if connection.state is not ConnectionState.CONFIRMED:
                problems.append(f"{who}: indexed but {connection.state}")
            for index, slot in enumerate(connection.slots):
                if slot is None:
                    continue
                wanting.setdefault(slot.public_key, set()).add(connection)
                where = f"{who} slot {index + 16} ({name_of(slot.public_key)})"
                if connection.slot_of_key.get(slot.public_key) != index:
                    problems.append(f"{where}: slot_of_key disagrees")
                if slot.state is SlotState.LINKED:
                    if slot.remote is not None:
                        remote_links.setdefault(slot.remote, set()).add(connection)
                    problems += _linked_problems(cluster, shard, connection, slot, where)
                else:
                    if slot.peer is not None or slot.remote is not None:
                        problems.append(f"{where}: REQUESTED but points at a peer")
                    other = located.get(slot.public_key)
                    if other is not None and connection.public_key in other[1].slot_of_key:
                        problems.append(f"{where}: both sides requested, never linked")
            if len(connection.slot_of_key) != sum(s is not None for s in connection.slots):
                problems.append(f"{who}: slot_of_key has stale keys")
        indexed = {r: c for r, c in server.cluster._remote_links.items() if c}
        if indexed != remote_links:
            problems.append(f"shard {shard}: _remote_links {indexed} != slots {remote_links}")
        if server.cluster._wanting != wanting:
            problems.append(f"shard {shard}: _wanting out of step with the slots")
    return problems


def _linked_problems(
    cluster: SimulatedCluster, shard: int, connection: ServerConnection, slot, where: str
) -> list[str]:
    if slot.remote is None:  # a link on this shard
        peer = slot.peer
        if peer is None or peer.public_key != slot.public_key:
            return [f"{where}: local link to {peer}"]
        if cluster.servers[shard].by_key.get(peer.public_key) is not peer:
            return [f"{where}: linked to a connection that is gone"]
        back = peer.slots[slot.peer_slot]
        if back is None or back.state is not SlotState.LINKED or back.peer is not connection:
            return [f"{where}: peer's slot {slot.peer_slot + 16} does not link back"]
        if back.peer_slot != connection.slot_of_key.get(peer.public_key):
            return [f"{where}: peer's slot links back to another slot"]
        return []
    remote = slot.remote
    if slot.peer is not None or remote.public_key != slot.public_key or remote.shard == shard:
        return [f"{where}: bad remote {remote}"]
    if remote.shard not in cluster.servers:
        return [f"{where}: linked to a dead shard {remote}"]
    other = cluster.servers[remote.shard].by_key.get(remote.public_key)
    if other is None or other.epoch != remote.epoch:
        return [f"{where}: linked to a stale epoch {remote}"]
    back_index = other.slot_of_key.get(connection.public_key)
    back = other.slots[back_index] if back_index is not None else None
    expected = RemotePeer(shard, connection.public_key, connection.epoch)
    if back is None or back.state is not SlotState.LINKED or back.remote != expected:
        return [f"{where}: remote slot {back and back.remote} does not link back"]
    return []


def _names(keys: dict[bytes, int]) -> dict[str, int]:
    return {name_of(k): v for k, v in keys.items()}


def data_payload(identity: str, serial: int) -> bytes:
    """Routed data carries its sender's identity (checked on receipt, invariant 3)."""
    return identity.encode() + b"#%d" % serial
