"""Confirmation and registration R-CONF-1..5 (tcp-relay-protocol.md §6)."""

from __future__ import annotations

from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    OobReceive,
    OobSend,
    Ping,
    Pong,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import ConnectionState, SlotState
from tests.relaycore.harness import Network, secret_key_for


def test_r_conf_1_first_good_frame_confirms_and_is_handled(net: Network) -> None:
    a = net.handshake("a")
    b = net.connect("b")
    assert a.public_key not in net.server.by_key
    net.send("a", RoutingRequest(b.public_key))
    assert a.connection.state is ConnectionState.CONFIRMED
    assert net.server.by_key[a.public_key] is a.connection
    assert a.connection not in net.server.pending
    assert a.take() == [RoutingResponse(16, b.public_key)]


def test_r_conf_1_pong_zero_as_first_packet_confirms_then_kills(net: Network) -> None:
    """R-CONF-1 [obs]: the frame confirms, then its handling (R-PING-3) kills."""
    a = net.handshake("a")
    net.send("a", Pong(bytes(8)))
    assert a.closed and a.close_reason == "R-PING-3"
    assert net.server.stats["confirmed"] == 1
    assert a.connection.identifier == 1
    assert net.server.by_key == {}
    assert a.received == []


def test_r_conf_1_bad_first_frame_kills_unconfirmed(net: Network) -> None:
    a = net.handshake("a")
    net.send_raw("a", b"\x00\x20" + bytes(32))
    assert a.closed and a.close_reason == "R-FRAME-4"
    assert net.server.stats["confirmed"] == 0
    assert a.connection.identifier == 0
    assert net.server.pending == set()


def test_r_conf_1_reserved_first_packet_confirms_then_kills(net: Network) -> None:
    a = net.handshake("a")
    net.send_plain("a", b"\x0c")
    assert a.closed and a.close_reason == "R-RSV-1"
    assert net.server.stats["confirmed"] == 1


def test_r_conf_2_ping_as_first_packet(net: Network) -> None:
    """R-CONF-2: a real toxcore client confirms with a PING."""
    a = net.handshake("a")
    net.send("a", Ping(b"\x00" * 7 + b"\x2a"))
    assert a.connection.state is ConnectionState.CONFIRMED
    assert a.take() == [Pong(b"\x00" * 7 + b"\x2a")]


def test_r_conf_2_routing_request_for_own_key_as_first_packet(net: Network) -> None:
    """R-CONF-2 / auto_tests/TCP_test.c: first packet = routing request for own key."""
    a = net.handshake("a")
    net.send("a", RoutingRequest(a.public_key))
    assert a.take() == [RoutingResponse(0, a.public_key)]
    assert a.connection.state is ConnectionState.CONFIRMED


def test_r_conf_3_same_key_replaces_confirmed_connection(net: Network) -> None:
    """R-CONF-3: old connection killed (its linked peers get 03), new one starts
    with an empty slot table; last confirmed wins."""
    old = net.connect("a")
    b = net.connect("b")
    net.connect("c")
    old_id, b_id = net.link("a", "b")
    net.send("a", RoutingRequest(net["c"].public_key))  # a second, unlinked slot
    old.take()
    new = net.connect("a2", secret_key_for("a"))
    assert old.closed and old.close_reason == "R-CONF-3"
    assert old.received == []
    assert b.take() == [DisconnectNotification(b_id)]
    assert net["c"].received == []
    assert net.server.by_key[new.public_key] is new.connection
    assert new.connection.slots == [None] * 240
    assert new.connection.slot_of_key == {}
    b_slot = b.connection.slots[b_id - 16]
    assert b_slot is not None and b_slot.state is SlotState.REQUESTED and b_slot.peer is None
    # The new connection's own requests start at slot 16 again and relink b.
    assert old_id == 16
    net.send("a2", RoutingRequest(b.public_key))
    assert new.take() == [RoutingResponse(16, b.public_key), ConnectNotification(16)]
    assert b.take() == [ConnectNotification(b_id)]


def test_r_conf_3_unconfirmed_duplicate_disturbs_nobody(net: Network) -> None:
    """R-CONF-3 [obs]: a second hello with a connected key changes nothing until
    that connection confirms."""
    old = net.connect("a")
    b = net.connect("b")
    old_id, b_id = net.link("a", "b")
    new = net.handshake("a2", secret_key_for("a"))
    assert not old.closed
    assert net.server.by_key[old.public_key] is old.connection
    assert new.connection.state is ConnectionState.UNCONFIRMED
    net.send("b", RoutedData(b_id, b"still here"))
    assert old.take() == [RoutedData(old_id, b"still here")]
    net.send("b", OobSend(old.public_key, b"oob"))
    assert old.take() == [OobReceive(b.public_key, b"oob")]
    assert b.received == [] and new.received == []


def test_r_conf_3_last_confirmed_wins(net: Network) -> None:
    first = net.handshake("a1", secret_key_for("a"))
    second = net.handshake("a2", secret_key_for("a"))
    net.send("a2", Ping(b"22222222"))
    net.send("a1", Ping(b"11111111"))
    assert second.closed and second.close_reason == "R-CONF-3"
    assert not first.closed
    assert net.server.by_key[first.public_key] is first.connection
    assert first.take() == [Pong(b"11111111")]
    assert second.take() == [Pong(b"22222222")]


def test_r_conf_4_identifiers_count_confirmations_and_are_not_reused(net: Network) -> None:
    a = net.handshake("a")
    b = net.handshake("b")
    net.send("b", Ping(bytes(8)))
    net.send("a", Ping(bytes(8)))
    assert (b.connection.identifier, a.connection.identifier) == (1, 2)
    net.server.kill(a.connection, "test")
    net.pump()
    c = net.connect("a-again", secret_key_for("a"))
    assert c.connection.identifier == 3
    unconfirmed = net.handshake("d")
    assert unconfirmed.connection.identifier == 0


def test_r_conf_4_last_pinged_set_at_confirmation(net: Network) -> None:
    """R-CONF-4: last_pinged = now of confirmation, ping_id = 0; the first server
    ping therefore comes 30 s after confirmation, not after accept."""
    a = net.handshake("a")
    net.tick(5.0)
    net.send("a", Ping(bytes(8)))
    a.take()
    assert a.connection.last_pinged == 5.0
    assert a.connection.ping_id == bytes(8)
    net.tick(34.9)
    assert a.received == []
    net.tick(35.0)
    assert [type(p) for p in a.take()] == [Ping]


def test_r_conf_5_unconfirmed_key_is_not_routable(net: Network) -> None:
    """R-CONF-5: only CONFIRMED connections are indexed: OOB to an unconfirmed
    key is dropped and a routing request does not link to it."""
    a = net.connect("a")
    b = net.handshake("b")
    net.send("b", RoutingRequest(a.public_key))  # confirms b; b's slot 16 = a
    b.take()
    c = net.handshake("c")
    net.send("a", OobSend(c.public_key, b"x"), RoutingRequest(c.public_key))
    assert a.take() == [RoutingResponse(16, c.public_key)]
    assert net.server.stats["dropped.oob_offline"] == 1
    assert c.received == []
    assert set(net.server.by_key) == {a.public_key, b.public_key}
