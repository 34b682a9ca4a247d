"""Shrunk failing cases of the cluster models (test_model.py, quiesced after
every step and compared with one server; test_concurrent.py, without
quiescence, with stalls and lost map updates), replayed step by step with the
invariants checked after each step (the concurrent model: once settled), or
with explicit deliveries. Each docstring names the rule and invariant broken,
the bug, and the fix; or says the expectation of the model was wrong; or, for
an expected failure, why the bug is left open."""

from __future__ import annotations

from relaycore.packets import DisconnectNotification, RoutingRequest
from tests.cluster_model.simulation import PUBLIC_KEYS, SimulatedCluster, link_problems
from tests.cluster_model.test_concurrent import ConcurrentClusterModel
from tests.cluster_model.test_model import ClusterModel

# Identity indices of the model's pool.
ALICE, BOB, CAROL, DAVE = 0, 1, 2, 3


def replay(
    n_shards: int,
    clients: list[tuple[int, int]],
    *steps: tuple[str, dict],
    model: type[ClusterModel] = ClusterModel,
    pairs: list[tuple[int, int]] = (),  # type: ignore[assignment]
) -> ClusterModel:
    """Start the model and run ``steps`` (rule name, arguments), checking the
    invariants after the start and after every step (the concurrent model:
    at the end, settled)."""
    state = model()
    state.start(n_shards=n_shards, n_identities=4, clients=clients, pairs=pairs)
    state._check()
    for name, arguments in steps:
        getattr(state, name)(**arguments)
        state._check()
    state.teardown()
    return state


def test_first_request_of_a_replacing_connection_links_on_its_shard() -> None:
    """R-CONF-3 + R-ROUTE-6, invariants 1 and 2.

    dave@0 is linked to alice@1. alice connects again on shard 0 and her first
    frame is a routing request for dave (toxcore sends PING, then its requests,
    without waiting: the coordinator's SET that ends alice@1 comes later).
    On one server the old alice is killed first, so dave gets 03 then 02 and
    the new alice 01 then 02. The cluster found dave's slot still LINKED to
    alice@1 and did not link; the UNLINK from alice@1's shard then ended that
    link (dave: 03) and nothing linked the two REQUESTED slots on shard 0
    again, for good. Fixed in ``RelayServer._route_request``: a local peer's
    slot still LINKED to our key's connection on another shard ends that link
    first, as ``_linked_by_remote`` does for a WANT from a newer epoch."""
    state = replay(
        2,
        [(DAVE, 0), (ALICE, 1)],
        ("pair", {"pick": 0, "other": 1, "first": 0, "second": 0}),
        ("connect", {"identity": ALICE, "shard": 0, "confirm": False, "schedule": 0}),
        ("route", {"pick": 2, "peer": DAVE, "schedule": 0}),
    )
    new_alice, dave = state.reference.clients[2], state.reference.clients[0]
    assert [e for _, e in new_alice.events] == [("route", 16, "dave"), ("connect", 16)]
    assert [e for _, e in dave.events][-2:] == [("disconnect", 16), ("connect", 16)]


def test_replaced_connection_may_get_03_for_a_link_its_successor_took_over() -> None:
    """R-CONF-3 across shards: the one tolerated departure from invariant 1
    (``simulation.takeover_extras``), kept as a regression of the model.

    alice@0 is linked to bob@1; alice connects again on shard 1 and her first
    frame requests bob. bob's shard ends bob's link to alice@0 (bob: 03, then
    02 with the new alice) and sends alice@0's shard an UNLINK, which in this
    delivery order arrives before the coordinator's SET that kills alice@0:
    alice@0 gets a 03 just before its close, which one server never sends. The
    same happens through ``_linked_by_remote`` when bob is on a third shard."""
    state = replay(
        2,
        [(ALICE, 0), (ALICE, 0)],
        ("connect", {"identity": ALICE, "shard": 1, "confirm": False, "schedule": 0}),
        ("connect", {"identity": ALICE, "shard": 0, "confirm": False, "schedule": 0}),
        ("connect", {"identity": BOB, "shard": 1, "confirm": False, "schedule": 0}),
        ("pair", {"pick": 0, "other": 0, "first": 0, "second": 0}),
        ("pair", {"pick": 0, "other": 1, "first": 0, "second": 1}),
    )
    assert state.cluster is not None
    old_alice = state.cluster.clients[1]
    assert old_alice.close_reason == "R-CONF-3"
    assert old_alice.events[-1] == (old_alice.closed_at, ("disconnect", 16))
    assert state.reference.clients[1].events[-1][1] == ("connect", 16)


def test_linked_for_a_connection_that_ended_is_answered_with_unlink() -> None:
    """Concurrent model, invariants 2 and 4.

    alice@2 and bob@3 request each other while both connect; each shard sends a
    WANT. alice closes; her UNREGISTER's DEL reaches bob's shard *before* her
    WANT does (map updates and the bus are separate channels), so the doom
    finds no link to end; then the WANT links bob to the dead epoch (bob: 02)
    and the LINKED that answers it finds no alice. The LINKED was dropped
    there, so bob stayed linked to a connection that no longer exists, for
    good. Fixed in ``RelayServer._linked_by_remote``: a LINKED for a local end
    that is gone is answered with UNLINK (bob: 03), as one for a slot given up
    already was. Since bob's shard remembers the epochs the map ended
    (``RelayServer._dead``), the late WANT itself is refused (NOLINK): bob is
    never linked to the dead epoch and hears nothing (the UNLINK answer still
    covers a DEL that comes after the WANT)."""
    state = replay(
        2,
        [(ALICE, 0), (ALICE, 0)],
        ("crash", {"schedule": 0, "shard": 0}),
        ("connect", {"confirm": False, "identity": ALICE, "schedule": 0, "shard": 1}),
        ("connect", {"confirm": False, "identity": BOB, "schedule": 0, "shard": 0}),
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 12001799}),
        ("end", {"how": "eof", "pick": 0, "schedule": 1}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )
    assert state.cluster is not None
    bob = state.cluster.clients[3]
    assert [e for _, e in bob.events if e[0] in ("connect", "disconnect")] == []


def test_want_from_a_crashed_shard_read_after_its_drop_makes_no_link() -> None:
    """Concurrent model, invariant 2 (and 4: a 02 with no 03 ever after).

    alice@2 and carol@1 request each other; alice's shard dies with its WANT
    still on the bus. The coordinator's DROP_SHARD reaches carol's shard first
    and ends what was linked to shard 2; then the WANT is read, carol's
    REQUESTED slot links to the dead epoch (carol: 02), and the LINKED answer
    goes nowhere: linked to a dead shard for good. Fixed in
    ``CrossShard.receive_link``: WANT / LINKED from a shard dropped by the
    map (and not named by a SET since) are dropped and counted."""
    state = replay(
        2,
        [(ALICE, 1), (BOB, 0), (CAROL, 0)],
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 1020}),
        ("crash", {"schedule": 0, "shard": 1}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )
    assert state.cluster is not None
    assert sum(s.stats["dropped.dead_shard"] for s in state.cluster.servers.values()) >= 1


def test_response_read_after_the_client_gave_the_id_up_is_not_a_new_slot() -> None:
    """Concurrent model; a wrong expectation of the model, not a relay bug.

    bob's request for alice (on another shard) makes his shard hold his next
    frames until alice's shard answers (docs/architecture.md, departure 1).
    Meanwhile bob repeats the request (R-ROUTE-3: answer ``01 16``) and then
    gives id 16 up (03). The ``01 16`` comes after bob sent that 03; the
    client model took it for a new slot 16, which the server then freed: its
    view disagreed with the server. A response to a request sent before the
    03 no longer resurrects the id (``ClientRecord.freed``)."""
    replay(
        2,
        [(BOB, 0), (ALICE, 1)],
        ("disconnect", {"pick": 0, "schedule": 0, "slot": 0}),
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 385}),
        ("route", {"peer": ALICE, "pick": 0, "schedule": 860335}),
        ("disconnect", {"pick": 0, "schedule": 0, "slot": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_shard_that_missed_its_own_drop_registers_its_clients_again() -> None:
    """Concurrent model (``stall``, ``lose_update``); the map, invariant 2.

    The coordinator drops a live shard (silent 3 s); its own DROP_SHARD is the
    update it then loses (a stalled SUB overflows). A heartbeat shows the gap,
    the snapshot it fetches lacks its keys, and nothing made it register them
    again (the adapter does that on seeing its own DROP_SHARD): alice stayed
    off the map for good, unreachable from other shards. Fixed in
    ``CrossShard.reset_directory``: after a gap, confirmed keys that the
    snapshot lacks are registered again (a no-op if their REGISTER was still
    on its way)."""
    replay(
        1,
        [(ALICE, 0), (ALICE, 0)],
        ("stall", {"schedule": 240, "shard": 0}),
        ("lose_update", {"schedule": 0, "shard": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_drop_hidden_by_a_snapshot_still_ends_and_renews_the_links() -> None:
    """Concurrent model (``stall`` and ``lose_update`` together), invariant 2.

    bob@1 is linked to carol@3. Shard 1 loses an update, and shard 3 is
    dropped while alive: it ends its side of the link and registers carol
    again. Shard 1 resyncs from a snapshot taken after that, which holds carol
    at the same epoch, so it never learns of the drop: bob stayed linked,
    carol did not, for good. Fixed in ``CrossShard.apply_map_update`` (own
    DROP_SHARD): each link it ends is UNLINKed and WANTed again on the bus."""
    replay(
        4,
        [(BOB, 0), (CAROL, 2)],
        ("connect", {"confirm": False, "identity": ALICE, "schedule": 0, "shard": 0}),
        ("oob", {"peer": ALICE, "pick": 2, "schedule": 4849}),
        ("lose_update", {"schedule": 0, "shard": 0}),
        ("stall", {"schedule": 0, "shard": 2}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_linked_from_a_shard_dropped_while_alive_is_answered_with_unlink() -> None:
    """Concurrent model (``stall`` twice), invariant 2.

    Both shards are dropped while alive; each ends its links, registers again
    and WANTs its old peers again. Shard 2 has seen shard 1's DROP_SHARD (and
    no SET from it yet) when carol's LINKED comes; the first version of the
    dead-shard filter dropped it silently, but shard 1 was alive and carol
    stayed linked to an alice who had given that slot up meanwhile. Fixed in
    ``CrossShard.receive_link``: a WANT / LINKED from a dropped shard makes
    no link but is answered (NOLINK / UNLINK), which a dead shard never reads."""
    replay(
        2,
        [(ALICE, 1), (BOB, 0), (CAROL, 0)],
        ("stall", {"schedule": 630, "shard": 1}),
        ("stall", {"schedule": 60965, "shard": 0}),
        ("disconnect", {"pick": 0, "schedule": 0, "slot": 1}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0), (0, 0)],
    )


def test_a_shard_not_seen_since_its_drop_is_not_dropped_again() -> None:
    """Concurrent model (``stall`` twice); a wrong expectation of the model.

    The simulated coordinator dropped a stalled shard a second time before the
    shard had come back, publishing DROP_SHARD twice around its registering
    again: its second drop ended links that the others had already renewed.
    The real coordinator (coordinator/service.py ``_drop``) publishes nothing
    for a shard it has neither seen nor mapped since the last drop; so does
    ``SimulatedCluster.stall`` now."""
    replay(
        2,
        [(ALICE, 0), (BOB, 1)],
        ("stall", {"schedule": 561550360, "shard": 1}),
        ("stall", {"schedule": 4207583, "shard": 1}),
        ("settle", {"schedule": 6}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_connection_replaced_by_a_lost_set_is_killed_after_the_resync() -> None:
    """Concurrent model (``lose_update``): R-CONF-3 across shards, the map,
    invariant 2.

    bob@1 reconnects on shard 2; the SET naming bob@1 as replaced is the update
    shard 1 loses. Shard 1 resyncs from a snapshot that maps bob to shard 2,
    but ``reset_directory`` only looked at other shards' entries: bob@1 was
    never killed and stayed confirmed beside bob@2 with its links (one
    server: last confirmed wins). Fixed in ``CrossShard.reset_directory``:
    after a gap, a local connection whose SET the shard has seen and that the
    snapshot maps to another connection of its key is killed (R-CONF-3). (One
    whose SET it never saw: ``test_replaced_connection_whose_set_was_never_seen_is_killed``.)"""
    replay(
        2,
        [(ALICE, 0), (BOB, 0)],
        ("end", {"how": "eof", "pick": 0, "schedule": 1}),
        ("reconnect_elsewhere", {"offset": 1, "pick": 0, "schedule": 1}),
        ("lose_update", {"schedule": 0, "shard": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_replaced_connection_whose_set_was_never_seen_is_killed() -> None:
    """Concurrent model (``lose_update``): R-CONF-3 across shards, the map.

    alice connects on shard 1 and then on shard 2; shard 2 loses an update
    and, while it waits for its snapshot, buffers and then skips (as older
    than the snapshot) the SET of its own alice, and the SET that replaced
    her by the later alice@1. The snapshot maps alice to shard 1; shard 2 had
    never seen its alice mapped, so ``reset_directory`` could not tell her
    from a connection newer than the snapshot (whose SET is still to come):
    she stayed confirmed beside alice@1 (the model used to make that kill
    itself). Fixed: the adapter numbers its snapshot requests and tells the
    core when it sends one (``CrossShard.snapshot_requested``), behind every
    REGISTER it took (one DEALER, in order); our epochs only grow, so every
    connection with an epoch up to the last REGISTER taken then is in the
    snapshot, and one the snapshot maps elsewhere was replaced: killed."""
    replay(
        4,
        [(ALICE, 0), (ALICE, 0)],
        ("connect", {"confirm": True, "identity": ALICE, "schedule": 0, "shard": 0}),
        ("lose_update", {"schedule": 2, "shard": 1}),
        ("reconnect_elsewhere", {"offset": 1, "pick": 0, "schedule": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def _deliver(cluster: SimulatedCluster, kind: str, address: object) -> None:
    """Deliver the head of one named channel."""
    for index, (k, a, _) in enumerate(cluster.pending()):
        if (k, a) == (kind, address):
            cluster.deliver_one(index)
            return
    raise AssertionError(f"nothing on {kind} {address}")


def test_links_ended_by_a_drop_are_unlinked_on_the_bus_too() -> None:
    """Invariant 2 with a shard dropped while alive (found by the concurrent
    model with ``stall``; replayed here with explicit deliveries).

    dave@1 holds a request for bob@2. Shard 2 stalls and is dropped; it reads
    its own DROP_SHARD first (bob gets a new epoch), and bob's request for
    dave reaches shard 1 before shard 1 reads the DROP_SHARD: both link (02).
    Then shard 1 reads the DROP_SHARD and ended dave's link without a word
    (dave: 03); dave gave the id up: bob stayed linked to nobody, for good.
    Fixed in ``CrossShard.apply_map_update`` (DROP_SHARD of another shard):
    each link it ends is also UNLINKed on the bus, after that LINKED (bob: 03).

    (Before own drops renewed epochs the shard's own WANT after its drop made
    the link; a link to the new epoch made before the other shard reads the
    drop still needs the UNLINK.)"""
    cluster = SimulatedCluster(2)
    dave, bob = cluster.connect("dave", 0), cluster.connect("bob", 1)
    cluster.quiesce()
    cluster.send(dave.index, RoutingRequest(PUBLIC_KEYS["bob"]))
    cluster.quiesce()  # bob has no slot for dave: NOLINK
    cluster.stall(1)
    _deliver(cluster, "update", 2)  # shard 2 reads its own DROP_SHARD: bob's new epoch
    cluster.send(bob.index, RoutingRequest(PUBLIC_KEYS["dave"]))  # WANT (new epoch)
    _deliver(cluster, "bus", (2, 1))  # WANT: dave links, LINKED
    _deliver(cluster, "bus", (1, 2))  # bob links
    assert [e for _, e in bob.events][-1] == ("connect", 16)
    _deliver(cluster, "update", 1)  # shard 1 reads the DROP_SHARD: dave 03
    cluster.send(dave.index, DisconnectNotification(16))
    cluster.quiesce()
    cluster.tick(cluster.now + 3.0)
    cluster.quiesce()
    assert link_problems(cluster) == []
    assert [e for _, e in bob.events][-2:] == [("connect", 16), ("disconnect", 16)]
    assert not bob.violations and not dave.violations


def test_link_made_before_a_shard_reads_its_own_drop_is_unlinked_and_renewed() -> None:
    """Invariant 2 with a shard dropped while alive (found by the concurrent
    model with ``stall``, in a 33-step example; replayed here with explicit
    deliveries).

    Shard 2 is dropped but has not read its DROP_SHARD yet when alice connects
    there. Her REGISTER makes a SET that tells shard 1 that shard 2 lives
    again; bob@1 and alice link. Then shard 2 reads its own DROP_SHARD and
    ended alice's link without a word; alice registering again changes
    nothing in the map (no SET), so bob stayed linked for good. Fixed in
    ``CrossShard.apply_map_update`` (own DROP_SHARD): each link it ends is
    UNLINKed and WANTed again on the bus (bob: 03, then both 02)."""
    cluster = SimulatedCluster(2)
    bob = cluster.connect("bob", 0)
    cluster.quiesce()
    cluster.stall(1)
    _deliver(cluster, "update", 1)  # shard 1 reads DROP_SHARD(2)
    alice = cluster.connect("alice", 1)  # on the dropped shard 2, before it knows
    _deliver(cluster, "registry", 2)  # her REGISTER: SET(alice, 2)
    cluster.send(bob.index, RoutingRequest(PUBLIC_KEYS["alice"]))
    cluster.send(alice.index, RoutingRequest(PUBLIC_KEYS["bob"]))
    for _ in range(3):  # shard 1 reads the SET (and a heartbeat): WANT
        _deliver(cluster, "update", 1)
    _deliver(cluster, "bus", (1, 2))  # WANT: alice links, LINKED
    _deliver(cluster, "bus", (2, 1))  # bob links
    assert [e for _, e in bob.events][-1] == ("connect", 16)
    cluster.quiesce()  # shard 2 reads its own DROP_SHARD, ...
    cluster.tick(cluster.now + 3.0)
    cluster.quiesce()
    assert link_problems(cluster) == []
    assert [e for _, e in bob.events][-3:] == [("connect", 16), ("disconnect", 16), ("connect", 16)]


def test_link_taken_over_by_a_doomed_connection_is_wanted_again() -> None:
    """Concurrent model (no map fault), invariant 2: REQUESTED both ways for
    good after R-CONF-3 races.

    alice is confirmed on shards 1 (e1.4) and 3 (e3.2) at once; the
    coordinator keeps e1.4 (registered last). carol@4 links to e1.4; then the
    WANT of the doomed e3.2 arrives, and carol's shard hands the link over to
    it ("an older connection of that key: that link ends first"), UNLINKing
    e1.4. e3.2 is killed and its UNLINK ends carol's link: carol and e1.4 both
    REQUESTED, and the SET that would make carol's shard WANT e1.4 again had
    come while carol was still linked. Fixed in
    ``RelayServer._end_remote_link``: when a remote link ends and the map
    holds another connection of that key, WANT it."""
    replay(
        3,
        [(ALICE, 0), (BOB, 0), (CAROL, 0)],
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 0}),
        ("connect", {"confirm": False, "identity": ALICE, "schedule": 0, "shard": 0}),
        ("reconnect_elsewhere", {"offset": 2, "pick": 0, "schedule": 240}),
        ("connect", {"confirm": False, "identity": ALICE, "schedule": 5736569, "shard": 1}),
        ("crash", {"schedule": 16, "shard": 1}),
        ("end", {"how": "eof", "pick": 0, "schedule": 0}),
        ("reconnect_elsewhere", {"offset": 1, "pick": 0, "schedule": 4151605}),
        ("disconnect", {"pick": 0, "schedule": 1, "slot": 0}),
        ("reconnect_elsewhere", {"offset": 1, "pick": 0, "schedule": 0}),
        ("reconnect_elsewhere", {"offset": 2, "pick": 0, "schedule": 0}),
        ("oob", {"peer": ALICE, "pick": 0, "schedule": 0}),
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 0}),
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_link_messages_sent_before_a_drop_do_not_relink_the_dropped_shard() -> None:
    """A shard dropped while alive, and link messages its peers sent before
    they read the drop (tests/cluster_process/test_faults.py
    ``..._past_the_silence_limit_comes_back_symmetric``, about 1 run in 4).

    alice@1 holds a request for bob@2; bob requests alice: shard 1 links alice
    and answers LINKED, but shard 2 stalls before it reads that answer and is
    dropped. Shard 1 reads the DROP_SHARD (alice: 03, UNLINK behind the
    LINKED). Shard 2 reads its own DROP_SHARD, then the stale LINKED: bob
    linked (02), the UNLINK ended it (03), and the SET of bob's registering
    again linked the pair (02): 02 03 02 where one server gives 02. Fixed in
    ``RelayServer._renew_after_own_drop``: a dropped shard's connections get
    new epochs, so what was sent to the old ones is dropped as stale; the
    SETs of the new epochs relink once."""
    cluster = SimulatedCluster(2)
    alice, bob = cluster.connect("alice", 0), cluster.connect("bob", 1)
    cluster.quiesce()
    cluster.send(alice.index, RoutingRequest(PUBLIC_KEYS["bob"]))
    cluster.quiesce()  # bob has no slot for alice: NOLINK
    cluster.send(bob.index, RoutingRequest(PUBLIC_KEYS["alice"]))
    _deliver(cluster, "bus", (2, 1))  # WANT: alice links (02), LINKED on its way
    cluster.stall(1)
    _deliver(cluster, "update", 1)  # shard 1 reads DROP_SHARD(2): alice 03, UNLINK
    _deliver(cluster, "update", 2)  # shard 2 reads its own DROP_SHARD
    _deliver(cluster, "bus", (1, 2))  # the LINKED sent before the drop
    _deliver(cluster, "bus", (1, 2))  # the UNLINK of the drop
    cluster.quiesce()
    cluster.tick(cluster.now + 3.0)
    cluster.quiesce()
    assert link_problems(cluster) == []
    assert [e for _, e in bob.events if e[0] in ("connect", "disconnect")] == [("connect", 16)]
    assert [e for _, e in alice.events if e[0] in ("connect", "disconnect")] == [
        ("connect", 16),
        ("disconnect", 16),
        ("connect", 16),
    ]
    assert not bob.violations and not alice.violations


def _quiesce_without(cluster: SimulatedCluster, shard: int) -> None:
    """Deliver everything that does not go to ``shard`` (it is stopped)."""
    while True:
        for index, (kind, address, _) in enumerate(cluster.pending()):
            to = address[1] if kind == "bus" else address
            if to != shard and not (kind == "registry" and address == shard):
                cluster.deliver_one(index)
                break
        else:
            return


def test_late_want_from_a_replaced_connection_does_not_break_the_new_link() -> None:
    """R-CONF-3 across shards; invariant 1 (no 03/02 on one server).
    tests/cluster_process/test_cross_shard.py has the same with real processes.

    alice@1 holds a request for bob while bob is offline; shard 1 lags while
    bob connects on shard 2 and alice again on shard 3 (her SET names alice@1
    as replaced) and the new alice links with bob. Shard 1 then reads bob's
    SET, which re-sends alice@1's WANT, before the SET that replaces her.
    Bob's shard took any other epoch of the key for a newer one: it ended the
    link to the new alice (03), linked the dead one (02), was UNLINKed back
    (03) and WANTed the new one again (02). Fixed in ``RelayServer``: an epoch
    the map said was replaced or ended is remembered (``_dead``) and its WANT
    or LINKED is refused without touching the link."""
    cluster = SimulatedCluster(3)
    alice = cluster.connect("alice", 0)
    cluster.quiesce()
    cluster.send(alice.index, RoutingRequest(PUBLIC_KEYS["bob"]))
    cluster.quiesce()
    bob = cluster.connect("bob", 1)
    _deliver(cluster, "registry", 2)  # SET(bob)
    new_alice = cluster.connect("alice", 2)
    _quiesce_without(cluster, 1)  # SET(alice@3, replaced alice@1), except on shard 1
    cluster.send(new_alice.index, RoutingRequest(PUBLIC_KEYS["bob"]))
    cluster.send(bob.index, RoutingRequest(PUBLIC_KEYS["alice"]))
    _quiesce_without(cluster, 1)
    assert [e for _, e in bob.events][-1] == ("connect", 16)
    while not cluster.bus.get((1, 2)):
        _deliver(cluster, "update", 1)  # SET(bob): alice@1's WANT
    _deliver(cluster, "bus", (1, 2))  # ... read by bob's shard first
    cluster.quiesce()
    cluster.tick(cluster.now + 3.0)
    cluster.quiesce()
    assert link_problems(cluster) == []
    assert alice.close_reason == "R-CONF-3"
    assert [e for _, e in bob.events if e[0] in ("connect", "disconnect")] == [("connect", 16)]
    assert [e for _, e in new_alice.events if e[0] in ("connect", "disconnect")] == [
        ("connect", 16)
    ]


def test_shard_that_missed_its_own_drop_renews_its_epochs_after_the_resync() -> None:
    """Concurrent model (``stall``, then ``lose_update``), invariant 2.

    alice@1 and bob@2 are linked; shard 1 is dropped while alive and loses
    that very DROP_SHARD. Its resync finds alice missing from the snapshot and
    registered her again under the same epoch, which shard 2 had noted as
    ended with the drop (``RelayServer._dead``): the LINKED answering shard
    2's WANT was refused, both slots REQUESTED for good. Fixed in
    ``CrossShard.reset_directory``: a connection the map had and the
    snapshot lacks went with our own DROP_SHARD, so the resync does what that
    update does (``_renew_after_own_drop``: new epochs); and a SET naming an
    epoch takes it off the dead list."""
    replay(
        2,
        [(ALICE, 0), (BOB, 1), (CAROL, 0)],
        ("stall", {"schedule": 15, "shard": 0}),
        ("lose_update", {"schedule": 0, "shard": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_oob_to_a_key_that_just_reconnected_elsewhere_reaches_it() -> None:
    """Model (``send_to_replaced``, issue 12), R-OOB-2, invariant 1.

    alice@2 reconnects on shard 1 (R-CONF-3); as soon as alice@2 is closed,
    bob@1 sends her an OOB. Bob's shard had not read the SET yet and sent the
    OOB to alice@2's epoch on shard 2, which dropped it as stale: one server
    delivers it to the new alice. Fixed in ``CrossShard._on_oob``: the old
    epoch's shard read the SET that closed it, so it forwards the OOB once to
    the key's current connection (or delivers it, when that one is its own)."""
    state = replay(
        3,
        [(ALICE, 1), (BOB, 0)],
        (
            "send_to_replaced",
            {"offset": 2, "pick": 1, "request": False, "schedule": 0, "sender": 0},
        ),
    )
    assert sum(s.stats["oob_forwarded"] for s in state.cluster.servers.values()) == 1


def test_a_key_that_left_while_the_coordinator_restarted_leaves_every_replica() -> None:
    """Concurrent model (``restart_coordinator``), the map, invariant 2.

    The coordinator restarts; before the shards read its first heartbeat,
    alice@2 closes: her UNREGISTER reaches a coordinator that never knew her
    (no DEL), and shard 2 does not register her again. Shard 1 merged the new
    snapshot into its replica, which only adds: alice's entry stayed there
    for good (an OOB to her went to a dead epoch instead of being offered to
    every shard). Fixed in ``coordinator.replica.Replica``: MERGE_CHECK_DELAY
    after a merge, a full snapshot replaces the replica."""
    replay(
        2,
        [(ALICE, 1), (BOB, 0)],
        ("restart_coordinator", {"schedule": 0}),
        ("end", {"how": "eof", "pick": 0, "schedule": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_an_answer_to_an_older_snapshot_request_is_not_applied() -> None:
    """Concurrent model (``restart_coordinator`` four times), the map.

    Each restart made the replicas ask for a snapshot again; the new
    coordinator answered the older requests too. Shard 2 merged the answer to
    an older request, applied alice's SET, then took the answer to its latest
    request (taken before that SET, read after it) as a full snapshot: the
    replica went back to before the SET, which never comes again. Fixed in
    ``coordinator.replica.Replica.snapshot``: only the answer to the latest
    request, while syncing, is used (``stale_snapshots`` counts the rest)."""
    replay(
        3,
        [(ALICE, 0), (ALICE, 2)],
        *[("restart_coordinator", {"schedule": 0})] * 4,
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )


def test_re_wants_held_back_by_their_pacing_go_at_the_next_timer_round() -> None:
    """Concurrent model (``restart_coordinator`` with crashes and stalls); a
    wrong expectation of the model.

    carol@1 and alice@4 requested each other while the map moved under them;
    the last SETs came within REWANT_INTERVAL of the round of WANTs before,
    so shard 4 held that round back for a later call. ``settle`` ended with
    the timers' one round and checked at once: both slots REQUESTED. A
    shard's timer runs every second (the held round goes then); ``settle``
    now runs one more timer round before it checks."""
    replay(
        4,
        [(CAROL, 2), (ALICE, 3), (BOB, 0)],
        ("reconnect_elsewhere", {"offset": 2, "pick": 0, "schedule": 1}),
        ("crash", {"schedule": 0, "shard": 1}),
        ("stall", {"schedule": 0, "shard": 0}),
        ("restart_coordinator", {"schedule": 1679}),
        ("crash", {"schedule": 2, "shard": 1}),
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 2}),
        ("stall", {"schedule": 0, "shard": 0}),
        ("settle", {"schedule": 1}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0), (0, 0)],
    )


def test_requests_to_a_key_that_reconnected_again_within_the_pacing_link_once_it_passes() -> None:
    """Issue 10 #7 pacing, R-ROUTE-6 across shards, invariant 1.

    Four keys each reconnect on the other shard in one instant, then two
    clients request each other. The second and later SETs of a key within
    REWANT_INTERVAL hold their re-WANT round back (the bound on a reconnect
    storm). The model judged the step before time passed and saw two
    REQUESTED slots where one server links at once. The held round goes at
    the worker's next call after the interval (its timer at the latest):
    ``ClusterModel._run`` now lets that time pass in both worlds before it
    judges, and the pair must be linked then."""
    state = ClusterModel()
    state.start(
        n_shards=2, n_identities=5, clients=[(2, 0), (4, 0), (3, 0), (1, 0)], pairs=[(0, 0)]
    )
    state._check()
    steps: list[tuple[str, dict]] = [
        ("oob", {"peer": 0, "pick": 0, "schedule": 0}),
        ("pair", {"first": 0, "other": 0, "pick": 23, "second": 0}),
        ("oob", {"peer": 0, "pick": 0, "schedule": 0}),
        *[
            ("reconnect_elsewhere", {"offset": 1, "pick": pick, "schedule": 0})
            for pick in (0, 2, 3, 1)
        ],
        ("pair", {"first": 0, "other": 0, "pick": 44, "second": 0}),
        ("connect", {"confirm": False, "identity": 1, "schedule": 0, "shard": 1}),
        ("pair", {"first": 3, "other": 0, "pick": 5, "second": 0}),
    ]
    for name, arguments in steps:
        getattr(state, name)(**arguments)
        state._check()
    state.teardown()


def test_a_held_re_want_round_goes_at_exactly_its_due_time() -> None:
    """Issue 10 #7 pacing; found by the model once held rounds were released.

    Coordinator restarts in a row re-SET alice within REWANT_INTERVAL; the
    held round was due at last + 0.1 s, but the pacing compared now - last
    with 0.1 s, which floating point makes 0.0999... at that very moment:
    the round stayed held at its own due time (on a worker, until a later
    flush). ``CrossShard._send_rewants`` now compares with the same sum as
    ``held_round_due``."""
    state = ClusterModel()
    state.start(n_shards=2, n_identities=4, clients=[(0, 0), (1, 1)], pairs=[(0, 0)])
    state._check()
    for _ in range(21):
        state.restart_coordinator(schedule=0)
        state._check()
    state.teardown()


def test_a_03_for_an_id_a_pending_request_takes_is_not_sent_as_unused() -> None:
    """Concurrent model; the expectation of the model was wrong (found by a
    helper's long run, failing since the concurrent model existed).

    carol@0 requests alice (on another shard), so her shard stops reading her
    frames until alice's shard answers; she then requests bob and, to be
    killed (R-DISC-2), sends a 03 for what her view calls the lowest unused
    id, 17. When her frames are read, the request for bob takes 17 first
    (R-ROUTE-5) and the 03 legitimately gives it up (R-DISC-3): no kill, and
    her view (17: requested, from the late ROUTING_RESPONSE) differed from the
    server's table. A real client never sends a 03 for an id it has not been
    given; the model's ``end`` now skips the ids its unanswered requests can
    take, so the 03 is for an id that stays unused."""
    state = replay(
        3,
        [(ALICE, 1), (BOB, 0)],
        *[("restart_coordinator", {"schedule": schedule}) for schedule in (3, 0, 0, 0, 0)],
        ("connect", {"confirm": False, "identity": CAROL, "schedule": 4343986, "shard": 0}),
        ("pair", {"first": 0, "other": 0, "pick": 0, "second": 0}),
        ("route", {"peer": BOB, "pick": 26, "schedule": 0}),
        ("end", {"how": "disconnect", "pick": 20, "schedule": 0}),
        ("settle", {"schedule": 0}),
        model=ConcurrentClusterModel,
        pairs=[(0, 0)],
    )
    assert state.cluster is not None
    carol = state.cluster.clients[2]
    assert carol.close_reason == "R-DISC-2"
