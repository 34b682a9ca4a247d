"""Killing connections R-KILL-1..5 (§9), including peer EOF (close_on_peer_eof)."""

from __future__ import annotations

import hashlib

from relaycore.options import RelayOptions
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    OobSend,
    Packet,
    Ping,
    Pong,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import ConnectionState, SlotState
from tests.relaycore.harness import Network, secret_key_for


def _not_pings(packets: list[Packet]) -> list[Packet]:
    return [packet for packet in packets if not isinstance(packet, Ping)]


def test_r_kill_1_every_linked_peer_notified_with_its_own_id(net: Network) -> None:
    """R-KILL-1 [obs]: each linked peer gets 03 (its slot id) and reverts to
    REQUESTED; X's slots are cleared, X leaves the key index, X gets nothing."""
    x = net.connect("x")
    b = net.connect("b")
    c = net.connect("c")
    d = net.connect("d")
    net.send("c", RoutingRequest(hashlib.sha256(b"pad").digest()))
    c.take()
    net.link("x", "b")
    _, c_id = net.link("x", "c")
    net.send("x", RoutingRequest(d.public_key))  # requested only
    x.take()
    assert c_id == 17
    net.server.kill(x.connection, "test")
    net.pump()
    assert x.closed and x.close_reason == "test" and x.received == []
    assert b.take() == [DisconnectNotification(16)]
    assert c.take() == [DisconnectNotification(17)]
    assert d.received == []
    assert x.connection.slots == [None] * 240 and x.connection.slot_of_key == {}
    assert x.public_key not in net.server.by_key
    for peer, slot_id in ((b, 16), (c, 17)):
        slot = peer.connection.slots[slot_id - 16]
        assert slot is not None
        assert (slot.state, slot.peer, slot.peer_slot) == (SlotState.REQUESTED, None, -1)


def test_r_kill_1_replies_made_before_the_kill_are_still_written(net: Network) -> None:
    """R-KILL-1 / R-ORDER-2: a PONG to a frame that preceded the bad one was sent
    before tox-bootstrapd killed; X then receives nothing more, and its linked
    peer learns of the kill in the same call."""
    x = net.connect("x")
    b = net.connect("b")
    x_id, b_id = net.link("x", "b")
    x.client.send(Ping(b"12345678"))
    x.client.send(RoutedData(x_id, b"last words"))
    net.send_raw("x", x.client.take_outbox() + b"\x08\x01")  # then R-FRAME-2
    assert x.closed and x.close_reason == "R-FRAME-2"
    assert x.take() == [Pong(b"12345678")]
    assert b.take() == [RoutedData(b_id, b"last words"), DisconnectNotification(b_id)]
    net.tick(30.0)
    net.send("b", OobSend(x.public_key, b"too late"))
    assert x.received == []


def test_r_kill_1_killed_connection_ignores_further_input(net: Network) -> None:
    x = net.connect("x")
    net.server.kill(x.connection, "test")
    x.client.send(Ping(b"12345678"))
    net.server.receive(x.connection, x.client.take_outbox(), 0.0)
    net.server.kill(x.connection, "again")  # idempotent
    net.server.peer_closed(x.connection, 0.0)
    net.pump()
    assert x.received == []
    assert net.server.stats["closed.test"] == 1 and net.server.stats["closed.again"] == 0
    assert net.server.connection_count == 0


def test_r_kill_2_requested_slots_naming_x_survive_and_relink(net: Network) -> None:
    """R-KILL-2 [obs]: peers keep their REQUESTED slots for X's key; a new
    connection with X's key links again by requesting them."""
    net.connect("x")
    b = net.connect("b")
    _, b_id = net.link("x", "b")
    net.server.kill(net["x"].connection, "test")
    net.pump()
    assert b.take() == [DisconnectNotification(b_id)]
    x2 = net.connect("x2", secret_key_for("x"))
    assert b.received == []
    net.send("x2", RoutingRequest(b.public_key))
    assert x2.take() == [RoutingResponse(16, b.public_key), ConnectNotification(16)]
    assert b.take() == [ConnectNotification(b_id)]
    net.send("b", RoutedData(b_id, b"welcome back"))
    assert x2.take() == [RoutedData(16, b"welcome back")]


def test_r_kill_3_requested_slot_never_expires(net: Network) -> None:
    """R-KILL-3: a REQUESTED slot survives any time; only its owner frees it."""
    a = net.connect("a")
    absent_key = net.open("later").public_key
    net.server.kill(net["later"].connection, "not yet")
    net.send("a", RoutingRequest(absent_key))
    assert a.take() == [RoutingResponse(16, absent_key)]
    for now in range(30, 3601, 30):
        net.tick(float(now))
    assert not a.closed
    assert [type(p) for p in a.take()] == [Ping] * 120
    later = net.connect("later2", secret_key_for("later"))
    net.send("later2", RoutingRequest(a.public_key))
    assert later.take() == [RoutingResponse(16, a.public_key), ConnectNotification(16)]
    assert a.take() == [ConnectNotification(16)]


def test_r_kill_4_peer_eof_kills_at_once_by_default(net: Network) -> None:
    """R-KILL-4 (our SHOULD, close_on_peer_eof=True): killed on EOF, peers
    notified in the same call."""
    a = net.connect("a")
    b = net.connect("b")
    _, b_id = net.link("a", "b")
    net.peer_eof("a")
    assert a.closed and a.close_reason == "R-KILL-4"
    assert a.connection.peer_closed
    assert b.take() == [DisconnectNotification(b_id)]


def test_r_kill_4_without_close_on_eof_the_ping_timeout_ends_it() -> None:
    """R-KILL-4 (0.2.18 behaviour): EOF is not acted on; the connection stays
    registered until the unanswered ping kills it (peer notified within 41 s)."""
    net = Network(RelayOptions(close_on_peer_eof=False))
    a = net.connect("a")
    b = net.connect("b")
    _, b_id = net.link("a", "b")
    net.tick(1.0)
    net.peer_eof("a")
    assert not a.closed
    assert a.connection.state is ConnectionState.CONFIRMED
    assert net.server.by_key[a.public_key] is a.connection
    net.send("b", RoutedData(b_id, b"into the void"))  # still relayed, then lost
    assert not b.closed and _not_pings(b.take()) == []
    net.tick(30.0)  # ping to a, never answered
    assert not a.closed
    net.tick(39.999)
    assert not a.closed
    net.tick(40.0)
    assert a.closed and a.close_reason == "R-PING-4"
    assert _not_pings(b.take()) == [DisconnectNotification(b_id)]


def test_r_kill_4_eof_before_confirmation_always_kills() -> None:
    net = Network(RelayOptions(close_on_peer_eof=False))
    incoming = net.open("i")
    unconfirmed = net.handshake("u")
    net.peer_eof("i")
    net.peer_eof("u")
    assert incoming.closed and unconfirmed.closed
    assert net.server.pending == set()


def test_r_kill_5_incoming_and_unconfirmed_are_just_closed(net: Network) -> None:
    """R-KILL-5: no notifications, no key index change, nothing sent."""
    a = net.connect("a")
    net.send("a", RoutingRequest(net.open("b").public_key))
    a.take()
    b = net["b"]
    net.server.kill(b.connection, "test")
    net.pump()
    c = net.handshake("c")
    net.send("a", RoutingRequest(c.public_key))
    a.take()
    net.server.kill(c.connection, "test")
    net.pump()
    assert b.closed and c.closed
    assert b.received == [] and c.received == [] and a.received == []
    assert set(net.server.by_key) == {a.public_key}
    assert net.server.pending == set()
    assert net.server.connection_count == 1


def test_r_kill_5_duplicate_unconfirmed_killed_leaves_confirmed_alone(net: Network) -> None:
    old = net.connect("a")
    dup = net.handshake("a2", secret_key_for("a"))
    net.send_raw("a2", b"\x00\x01\x00")
    assert dup.closed and not old.closed
    assert net.server.by_key[old.public_key] is old.connection
    net.send("a", OobSend(old.public_key, b"still mine"))
    assert len(old.take()) == 1
