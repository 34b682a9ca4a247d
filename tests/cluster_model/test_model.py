"""Model-based test of the relay cluster (docs/architecture.md, "Invariants").

A hypothesis ``RuleBasedStateMachine`` plays a random client script against a
``SimulatedCluster`` of N = 1..4 shards and, step by step, against one plain
``RelayServer`` (``SingleShard``). Clients use a small pool of 4-6 identities
(long-term keys), so requests hit keys that are online, offline, on the same
shard, on another shard, or the requester itself.

Rules (client actions; every step ends with the cluster run to quiescence in a
delivery order drawn by hypothesis, ``schedule``):

* ``connect``: handshake on a chosen shard, first frame a PING (R-CONF-2), or
  left UNCONFIRMED so that its next packet confirms it (R-CONF-1);
* ``reconnect_elsewhere``: the same identity on another shard while the old
  connection lives (R-CONF-3: last confirmed wins, old one killed);
* ``route``: ROUTING_REQUEST for another identity or its own (R-ROUTE-2..7);
* ``pair``: two live clients request each other, one step each (R-ROUTE-6);
* ``data``, ``talk``: routed data on an id the client holds, on a linked one
  (R-DATA-3, R-DATA-4);
* ``oob``: OOB_SEND to any identity (R-OOB-2, R-OOB-3);
* ``disconnect``: DISCONNECT_NOTIFICATION for an id it holds (R-DISC-3);
* ``end``: the client closes its socket (R-KILL-4, killed on EOF), or sends
  data or a 03 on an unused id and is killed (R-DATA-2, R-DISC-2, R-KILL-1);
* ``time_passes``: timers (handshake timeout; in the cluster the unlink
  grace and the wait for a WANT's answer);
* ``crash``: a worker dies with all its connections and is restarted (a new
  shard id, as docs/architecture.md builds it); the coordinator drops its
  keys (DROP_SHARD). The reference kills the same connections (R-KILL-1),
  whose clients receive nothing more;
* ``send_to_replaced`` (issue 12): a client's key connects again on another
  shard; as soon as the old connection is closed, another client sends an
  OOB (and maybe a routing request) to that key, racing the map update that
  tells its shard where the key went. One server delivers to the new one;
* ``restart_coordinator``: a new coordinator with an empty map; the shards
  register their clients again and merge its snapshot. Clients notice
  nothing (one server has no coordinator).

Invariants after every step:

1. equivalence: each client saw the same packets as on one server (keys as
   identity names; per client in order, as a multiset in a crash step since
   several kills at once have no defined order, R-ORDER-4), is open or closed
   alike, and its slot table on the server side is the same;
2. symmetry: a slot is LINKED iff its peer's slot (same shard, or the
   connection with that key and epoch on another) is LINKED back; no mutual
   REQUESTED pair survives quiescence; replicas equal the coordinator's map;
3. no misdelivery: data only arrives on an id the client sees as linked and
   carries the identity of that slot's peer (checked per packet, both worlds);
4. one DISCONNECT_NOTIFICATION per link end: a 03 only for a linked id, an 02
   only for a requested one (per packet, both worlds; counts also via 1).

One departure from invariant 1 is tolerated, narrowly
(``simulation.takeover_extras``): a connection that an R-CONF-3 replacement on
another shard kills in this very step may first get 03s for links that its
successor took over (the kill waits for the coordinator's SET; the takeover's
UNLINK may come first). test_regressions.py keeps the case.

``test_concurrent.py`` runs the same rules without quiescence between steps.

``CLUSTER_MODEL_EXAMPLES`` (default 300) and ``CLUSTER_MODEL_STEPS`` (default
40) size a run, e.g. ``CLUSTER_MODEL_EXAMPLES=5000 pytest tests/cluster_model``.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from relaycore.packets import (
    DisconnectNotification,
    OobSend,
    RoutedData,
    RoutingRequest,
)
from tests.cluster_model.simulation import (
    IDENTITIES,
    PUBLIC_KEYS,
    ScheduleChooser,
    SimulatedCluster,
    SingleShard,
    data_payload,
    equivalence_problems,
    link_problems,
)

EXAMPLES = int(os.environ.get("CLUSTER_MODEL_EXAMPLES", "300"))
STEPS = int(os.environ.get("CLUSTER_MODEL_STEPS", "40"))

#: The delivery order of one step's quiescence (see ScheduleChooser).
schedules = st.integers(min_value=0, max_value=2**32 - 1)
#: Which live client acts (modulo the number of live clients).
picks = st.integers(min_value=0, max_value=63)
identities = st.integers(min_value=0, max_value=len(IDENTITIES) - 1)
shards = st.integers(min_value=0, max_value=3)


# Releases of held re-WANT rounds in one step before it is judged stuck.
HELD_ROUNDS_MAX = 8


class ClusterModel(RuleBasedStateMachine):
    """One client script, an N-shard cluster and one server side by side."""

    def __init__(self) -> None:
        super().__init__()
        self.cluster: SimulatedCluster | None = None
        self.reference = SingleShard()
        self.n_shards = 1
        self.n_identities = 4
        self.unordered = False
        self.serial = 0

    @initialize(
        n_shards=st.sampled_from([1, 2, 2, 3, 3, 4, 4]),
        n_identities=st.integers(min_value=4, max_value=6),
        clients=st.lists(st.tuples(identities, shards), min_size=2, max_size=5),
        pairs=st.lists(st.tuples(picks, picks), min_size=1, max_size=3),
    )
    def start(
        self,
        n_shards: int,
        n_identities: int,
        clients: list[tuple[int, int]],
        pairs: list[tuple[int, int]] = (),  # type: ignore[assignment]
    ) -> None:
        """N shards, the identity pool, a few confirmed clients and links."""
        self._new_worlds(n_shards)
        self.n_shards = n_shards
        self.n_identities = n_identities
        for identity, shard in clients:
            self.connect(identity, shard, confirm=True, schedule=0)
        for pick, other in pairs:
            if self._pairs():
                self.pair(pick, other, first=0, second=0)

    def _new_worlds(self, n_shards: int) -> None:
        self.cluster = SimulatedCluster(n_shards)

    def teardown(self) -> None:
        """Coverage notes for ``--hypothesis-show-statistics``."""
        if self.cluster is None:
            return
        delivered = self.cluster.delivered
        kills = sum(s.stats["closed.R-CONF-3"] for s in self.cluster.servers.values())
        notes = [
            f"shards={self.n_shards}",
            f"steps: {min(self.cluster.step // 10 * 10, 50)}+",
            f"R-CONF-3 kills in the cluster: {'yes' if kills else 'no'}",
        ] + [
            f"{kind} delivered: {'yes' if delivered[kind] else 'no'}"
            for kind in ("LINKED", "UNLINK", "DATA", "OOB", "DROP_SHARD", "SNAPSHOT")
        ]
        try:
            for note in notes:
                event(note)
        except InvalidArgument:
            pass  # a replay outside hypothesis (test_regressions.py)

    # -- helpers -------------------------------------------------------------

    def _live(self) -> list[int]:
        return [record.index for record in self.reference.clients if record.live]

    def _pick(self, pick: int) -> int:
        live = self._live()
        return live[pick % len(live)]

    def _identity(self, index: int) -> str:
        return IDENTITIES[index % self.n_identities]

    def _run(self, action, schedule: int, *, unordered: bool = False) -> None:
        """One step: the action on both worlds, then the cluster to quiescence."""
        assert self.cluster is not None
        self.reference.begin_step()
        self.cluster.begin_step()
        action(self.reference)
        action(self.cluster)
        self.cluster.quiesce(ScheduleChooser(schedule))
        self._release_held_rounds(schedule)
        self.unordered = unordered

    def _release_held_rounds(self, schedule: int) -> None:
        """A key that reconnects again within REWANT_INTERVAL has its
        requesters' WANTs held back (the pacing that bounds a reconnect storm,
        issue 10 #7); they go at the next call at or after their due time,
        which the worker's timer guarantees. Time passes to that moment in
        both worlds, so the step is judged once the held round went: the
        cluster converges on the one-server links a moment later, not never."""
        assert self.cluster is not None
        for _ in range(HELD_ROUNDS_MAX):
            due = self.cluster.held_round_due()
            if due is None:
                return
            now = max(due, self.reference.now)
            self.reference.tick(now)
            self.cluster.tick(now)
            self.cluster.quiesce(ScheduleChooser(schedule))
        raise AssertionError(f"re-WANT rounds still held after {HELD_ROUNDS_MAX} releases")

    def _send(self, index: int, packet, schedule: int) -> None:
        self._run(
            lambda world: world.send(index, packet),
            schedule,
            unordered=self._replaces_elsewhere(index),
        )

    def _replaces_elsewhere(self, index: int) -> bool:
        """Does this client's next frame confirm it (R-CONF-1) while another
        connection of its key is confirmed on another shard? Then the old one
        is killed asynchronously, when the coordinator's SET reaches its shard
        (docs/architecture.md: "the coordinator tells the shard holding the
        older epoch to close it"), so the peers' 03s for the old connection
        and what the new one's first packet causes (an OOB) have no defined
        order: compared as a multiset, like other events of different
        connections in one step (R-ORDER-4)."""
        record = self.reference.clients[index]
        return record.frames_sent == 0 and any(
            other.identity == record.identity
            and other.shard != record.shard
            and other.frames_sent > 0
            and other.live
            for other in self.reference.clients
        )

    def has_live(self) -> bool:
        return bool(self._live())

    # -- rules ----------------------------------------------------------------

    @rule(identity=identities, shard=shards, confirm=st.booleans(), schedule=schedules)
    def connect(self, identity: int, shard: int, confirm: bool, schedule: int) -> None:
        """A new connection (R-CONF-1/2; an existing one of that key: R-CONF-3)."""
        name, where = self._identity(identity), shard % self.n_shards
        self._run(lambda world: world.connect(name, where, confirm=confirm), schedule)

    @precondition(lambda self: self.has_live() and self.n_shards > 1)
    @rule(pick=picks, offset=st.integers(min_value=1, max_value=3), schedule=schedules)
    def reconnect_elsewhere(self, pick: int, offset: int, schedule: int) -> None:
        """R-CONF-3 across shards: the newer epoch wins, the old one is killed
        and each of its linked peers gets exactly one 03 (invariant 4)."""
        old = self.reference.clients[self._pick(pick)]
        where = (old.shard + 1 + (offset - 1) % (self.n_shards - 1)) % self.n_shards
        self._run(lambda world: world.connect(old.identity, where), schedule)

    @precondition(has_live)
    @rule(pick=picks, peer=identities, schedule=schedules)
    def route(self, pick: int, peer: int, schedule: int) -> None:
        """ROUTING_REQUEST (R-ROUTE-2..7, R-DISC-4; across shards: WANT/LINKED)."""
        index = self._pick(pick)
        self._send(index, RoutingRequest(PUBLIC_KEYS[self._identity(peer)]), schedule)

    def _pairs(self) -> list[tuple[int, int]]:
        """Live clients of two different identities, not linked yet."""
        clients = [self.reference.clients[i] for i in self._live()]
        return [
            (a.index, b.index)
            for a in clients
            for b in clients
            if a.identity < b.identity
            and not any(v.peer == b.identity and v.linked for v in a.slots.values())
        ]

    @precondition(lambda self: self._pairs())
    @rule(pick=picks, other=picks, first=schedules, second=schedules)
    def pair(self, pick: int, other: int, first: int, second: int) -> None:
        """Two live clients request each other, in two steps (R-ROUTE-6 on one
        server; WANT / LINKED between two shards). ``other`` picks who asks first."""
        pairs = self._pairs()
        a, b = pairs[pick % len(pairs)]
        if other % 2:
            a, b = b, a
        first_client, second_client = self.reference.clients[a], self.reference.clients[b]
        self._send(a, RoutingRequest(PUBLIC_KEYS[second_client.identity]), first)
        if second_client.live:
            self._check()
            self._send(b, RoutingRequest(PUBLIC_KEYS[first_client.identity]), second)

    def _holders(self, linked: bool) -> list[int]:
        """Live clients that hold an id (a linked one if ``linked``)."""
        return [
            i
            for i in self._live()
            if any(view.linked or not linked for view in self.reference.clients[i].slots.values())
        ]

    @precondition(lambda self: self._holders(linked=False))
    @rule(
        pick=picks,
        slot=st.integers(min_value=0, max_value=239),
        linked=st.booleans(),
        schedule=schedules,
    )
    def data(self, pick: int, slot: int, linked: bool, schedule: int) -> None:
        """Routed data on an id the client holds, a linked one if ``linked`` and
        there is one (R-DATA-3 dropped, R-DATA-4 relayed; across shards: DATA)."""
        holders = self._holders(linked) or self._holders(linked=False)
        record = self.reference.clients[holders[pick % len(holders)]]
        ids = sorted(i for i, view in record.slots.items() if view.linked or not linked)
        ids = ids or sorted(record.slots)
        self.serial += 1
        packet = RoutedData(ids[slot % len(ids)], data_payload(record.identity, self.serial))
        self._send(record.index, packet, schedule)

    @precondition(lambda self: self._holders(linked=True))
    @rule(pick=picks, slot=st.integers(min_value=0, max_value=239), schedule=schedules)
    def talk(self, pick: int, slot: int, schedule: int) -> None:
        """Routed data on a linked id (R-DATA-4: relayed with the peer's id;
        across shards a DATA message naming both epochs)."""
        self.data(pick, slot, linked=True, schedule=schedule)

    @precondition(has_live)
    @rule(pick=picks, peer=identities, schedule=schedules)
    def oob(self, pick: int, peer: int, schedule: int) -> None:
        """OOB_SEND to any identity, online or not (R-OOB-2, R-OOB-3)."""
        index = self._pick(pick)
        self.serial += 1
        packet = OobSend(PUBLIC_KEYS[self._identity(peer)], b"oob#%d" % self.serial)
        self._send(index, packet, schedule)

    @precondition(lambda self: self._holders(linked=False))
    @rule(pick=picks, slot=st.integers(min_value=0, max_value=239), schedule=schedules)
    def disconnect(self, pick: int, slot: int, schedule: int) -> None:
        """DISCONNECT_NOTIFICATION for a held id (R-DISC-3: the peer gets one 03;
        across shards: UNLINK)."""
        holders = self._holders(linked=False)
        record = self.reference.clients[holders[pick % len(holders)]]
        ids = sorted(record.slots)
        self._send(record.index, DisconnectNotification(ids[slot % len(ids)]), schedule)

    @precondition(has_live)
    @rule(pick=picks, how=st.sampled_from(["eof", "data", "disconnect"]), schedule=schedules)
    def end(self, pick: int, how: str, schedule: int) -> None:
        """A connection ends: the client closes its socket (``eof``, R-KILL-4:
        killed at once), or sends data (R-DATA-2) or a 03 (R-DISC-2) for an
        unused id and is killed (R-KILL-1). Its linked peers get one 03 each."""
        record = self.reference.clients[self._pick(pick)]
        if how == "eof":
            self._run(lambda world: world.close(record.index), schedule)
            return
        free = sorted(set(range(16, 256)) - set(record.slots))
        # Routing requests the server has not answered yet take the lowest
        # free ids first (R-ROUTE-5): an id they may take is not "unused" (a
        # server holding this client's frames answers them before the 03).
        outstanding = max(0, record.requests_sent - record.responses_seen)
        unused = free[min(outstanding, len(free) - 1)]
        packet = RoutedData(unused, b"x") if how == "data" else DisconnectNotification(unused)
        self._send(record.index, packet, schedule)

    @rule(seconds=st.sampled_from([0.5, 1.5, 2.5, 11.0]), schedule=schedules)
    def time_passes(self, seconds: float, schedule: int) -> None:
        """The timers run (§10): the 10 s handshake timeout kills UNCONFIRMED
        connections (R-KILL-5) in both worlds; in the cluster the grace of
        map-driven unlinks and the requester's 2 s wait for an answer expire,
        which must change nothing after quiescence."""
        now = self.reference.now + seconds
        self._run(lambda world: world.tick(now), schedule, unordered=True)

    @rule(shard=shards, schedule=schedules)
    def crash(self, shard: int, schedule: int) -> None:
        """A worker dies (docs/architecture.md "Failure handling"): its clients
        are cut off without UNLINKs; DROP_SHARD ends their remote links."""
        where = shard % self.n_shards
        self._run(lambda world: world.crash(where), schedule, unordered=True)

    @precondition(lambda self: self.n_shards > 1 and len(self._live()) > 1)
    @rule(
        pick=picks,
        sender=picks,
        offset=st.integers(min_value=1, max_value=3),
        request=st.booleans(),
        schedule=schedules,
    )
    def send_to_replaced(
        self, pick: int, sender: int, offset: int, request: bool, schedule: int
    ) -> None:
        """Issue 12: A2 connects with A1's key on another shard (R-CONF-3); as
        soon as A1's close is seen, B sends an OOB (R-OOB-2) and, with
        ``request``, a ROUTING_REQUEST (R-ROUTE-6) to that key. In the
        cluster B's shard may still map the key to A1 then."""
        old = self.reference.clients[self._pick(pick)]
        # A confirmed sender: an unconfirmed one's first frame would replace
        # its own key's connection too (R-CONF-3), another race than this one.
        senders = [
            i
            for i in self._live()
            if self.reference.clients[i].identity != old.identity
            and self.reference.clients[i].frames_sent > 0
        ]
        if not senders:
            return
        b = senders[sender % len(senders)]
        where = (old.shard + 1 + (offset - 1) % (self.n_shards - 1)) % self.n_shards
        key = PUBLIC_KEYS[old.identity]
        self.serial += 1
        packets = [OobSend(key, b"oob#%d" % self.serial)]
        if request:
            packets.append(RoutingRequest(key))

        def action(world) -> None:  # type: ignore[no-untyped-def]
            world.connect(old.identity, where)
            if isinstance(world, SimulatedCluster):
                world.deliver_until(
                    lambda: world.clients[old.index].closed, ScheduleChooser(schedule)
                )
            for packet in packets:
                if world.clients[b].live:
                    world.send(b, packet)

        self._run(action, schedule, unordered=True)

    @precondition(lambda self: self.n_shards > 1)
    @rule(schedule=schedules)
    def restart_coordinator(self, schedule: int) -> None:
        """A new coordinator (empty map, new incarnation): every shard registers
        its clients again and merges the new snapshot; no client notices."""
        assert self.cluster is not None
        cluster = self.cluster
        self._run(lambda world: world is cluster and cluster.restart_coordinator(), schedule)

    # -- invariants ---------------------------------------------------------

    def _check(self) -> None:
        """The invariants, between the steps of one rule."""
        self.equivalent_to_one_server()
        self.links_symmetric()
        self.clients_see_consistent_slots()

    @invariant()
    def equivalent_to_one_server(self) -> None:
        """Invariant 1."""
        if self.cluster is None:
            return
        step = self.cluster.step
        problems = equivalence_problems(
            self.cluster, self.reference, step, unordered=self.unordered
        )
        assert not problems, "\n".join(problems)

    @invariant()
    def links_symmetric(self) -> None:
        """Invariant 2 (the cluster has quiesced after every step)."""
        if self.cluster is None:
            return
        assert not self.cluster.pending()
        problems = link_problems(self.cluster)
        assert not problems, "\n".join(problems)

    @invariant()
    def clients_see_consistent_slots(self) -> None:
        """Invariants 3 and 4, per packet, in both worlds."""
        worlds = [self.reference] + ([self.cluster] if self.cluster else [])
        violations = [v for world in worlds for c in world.clients for v in c.violations]
        assert not violations, "\n".join(violations)


ClusterModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# Shrinking a long failing script takes minutes; the generating phase does not.
TestClusterModel = pytest.mark.timeout(1800)(ClusterModel.TestCase)
