"""Routing R-ROUTE-1..8, notifications R-NOTIF-1, disconnects R-DISC-1..4 (§8.1-§8.3)."""

from __future__ import annotations

import hashlib

import pytest

from relaycore.crypto import public_key_of
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import SlotState
from tests.relaycore.harness import Network, secret_key_for


def offline_key(number: int) -> bytes:
    """A public key nobody connects with."""
    return hashlib.sha256(b"offline %d" % number).digest()


def net_key(name: str) -> bytes:
    """The public key the harness gives ``name``."""
    return public_key_of(secret_key_for(name))


def _slot_state(net: Network, name: str, connection_id: int) -> SlotState | None:
    slot = net[name].connection.slots[connection_id - 16]
    return None if slot is None else slot.state


# ----------------------------------------------------------------------
# R-ROUTE
# ----------------------------------------------------------------------


@pytest.mark.parametrize("key_length", [0, 31, 33])
def test_r_route_1_wrong_length_kills(net: Network, key_length: int) -> None:
    a = net.connect("a")
    net.send_plain("a", b"\x00" + bytes(range(key_length)))
    assert a.closed and a.close_reason == "R-ROUTE-1"
    assert a.received == []


def test_r_route_2_own_key_gets_rpid_0_and_no_slot(net: Network) -> None:
    a = net.connect("a")
    net.send("a", RoutingRequest(a.public_key))
    assert a.take() == [RoutingResponse(0, a.public_key)]
    assert a.connection.slots == [None] * 240
    net.send("a", RoutingRequest(offline_key(1)))
    assert a.take() == [RoutingResponse(16, offline_key(1))]


def test_r_route_3_repeated_request_same_slot_no_new_notification(net: Network) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.send("a", RoutingRequest(offline_key(1)))
    assert a.take() == [RoutingResponse(16, offline_key(1))]
    a_id, b_id = net.link("a", "b")
    assert (a_id, b_id) == (17, 16)
    net.send("a", RoutingRequest(b.public_key), RoutingRequest(b.public_key))
    assert a.take() == [RoutingResponse(17, b.public_key)] * 2
    assert b.received == []
    net.send("a", RoutingRequest(offline_key(1)))  # REQUESTED slot: same answer
    assert a.take() == [RoutingResponse(16, offline_key(1))]
    assert _slot_state(net, "a", 17) is SlotState.LINKED


def test_r_route_4_full_table_refuses_new_keys_but_answers_existing(net: Network) -> None:
    """R-ROUTE-4 / R-LIM-4: after 240 slots a new key gets rpid 0; R-ROUTE-3
    still answers keys already in the table."""
    a = net.connect("a")
    net.send("a", *(RoutingRequest(offline_key(n)) for n in range(240)))
    assert a.take() == [RoutingResponse(16 + n, offline_key(n)) for n in range(240)]
    net.send("a", RoutingRequest(offline_key(999)))
    assert a.take() == [RoutingResponse(0, offline_key(999))]
    net.send("a", RoutingRequest(offline_key(17)), RoutingRequest(offline_key(239)))
    assert a.take() == [
        RoutingResponse(33, offline_key(17)),
        RoutingResponse(255, offline_key(239)),
    ]
    assert offline_key(999) not in a.connection.slot_of_key
    assert not a.closed


def test_r_route_4_full_table_does_not_link(net: Network) -> None:
    """A refused request (rpid 0) takes no slot, so it cannot link either."""
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(a.public_key))
    b.take()
    net.send("a", *(RoutingRequest(offline_key(n)) for n in range(240)))
    a.take()
    net.send("a", RoutingRequest(b.public_key))
    assert a.take() == [RoutingResponse(0, b.public_key)]
    assert b.received == []
    assert _slot_state(net, "b", 16) is SlotState.REQUESTED


def test_r_route_5_lowest_free_slot_is_reused_first(net: Network) -> None:
    """R-ROUTE-5 [obs]: 16, 17, ...; after freeing 20 and 18, 18 comes first."""
    a = net.connect("a")
    net.send("a", *(RoutingRequest(offline_key(n)) for n in range(6)))
    assert [p.connection_id for p in a.take()] == [16, 17, 18, 19, 20, 21]  # type: ignore[union-attr]
    net.send("a", DisconnectNotification(20), DisconnectNotification(18))
    assert a.received == []
    net.send("a", *(RoutingRequest(offline_key(n)) for n in (100, 101, 102)))
    assert a.take() == [
        RoutingResponse(18, offline_key(100)),
        RoutingResponse(20, offline_key(101)),
        RoutingResponse(22, offline_key(102)),
    ]


def test_r_route_6_link_when_second_side_requests(net: Network) -> None:
    """R-ROUTE-6 [obs]: requester gets response then notification, the other
    side gets a notification with its own slot id."""
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(offline_key(1)), RoutingRequest(offline_key(2)))
    b.take()
    net.send("a", RoutingRequest(b.public_key))
    assert a.take() == [RoutingResponse(16, b.public_key)]
    assert b.received == []
    net.send("b", RoutingRequest(a.public_key))
    assert b.take() == [RoutingResponse(18, a.public_key), ConnectNotification(18)]
    assert a.take() == [ConnectNotification(16)]
    slot_a = a.connection.slots[0]
    slot_b = b.connection.slots[2]
    assert slot_a is not None and slot_b is not None
    assert (slot_a.state, slot_a.peer, slot_a.peer_slot) == (SlotState.LINKED, b.connection, 2)
    assert (slot_b.state, slot_b.peer, slot_b.peer_slot) == (SlotState.LINKED, a.connection, 0)
    assert net.server.stats["links"] == 1


def test_r_route_6_link_in_the_other_order(net: Network) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(a.public_key))
    assert b.take() == [RoutingResponse(16, a.public_key)]
    net.send("a", RoutingRequest(b.public_key))
    assert a.take() == [RoutingResponse(16, b.public_key), ConnectNotification(16)]
    assert b.take() == [ConnectNotification(16)]


def test_r_route_7_coming_online_triggers_nothing(net: Network) -> None:
    """R-ROUTE-7 [obs]: A requests offline B; B connects silently -> A gets
    nothing; B requests A -> both linked."""
    a = net.connect("a")
    net.send("a", RoutingRequest(net_key("b")))
    assert a.take() == [RoutingResponse(16, net_key("b"))]
    b = net.connect("b")
    net.send("b", RoutingRequest(offline_key(5)))  # unrelated traffic
    assert a.received == []
    b.take()
    net.send("b", RoutingRequest(a.public_key))
    assert b.take() == [RoutingResponse(17, a.public_key), ConnectNotification(17)]
    assert a.take() == [ConnectNotification(16)]


def test_r_route_7_reconnect_triggers_nothing(net: Network) -> None:
    """A linked peer that reconnects (R-CONF-3) gets its old link end cut; the
    new connection is not linked until it requests again."""
    net.connect("a")
    b = net.connect("b")
    _, b_id = net.link("a", "b")
    a2 = net.connect("a2", secret_key_for("a"))
    assert b.take() == [DisconnectNotification(b_id)]
    net.tick(1.0)
    assert a2.received == [] and b.received == []


def test_r_route_8_ids_differ_and_are_rewritten(net: Network) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.send("a", *(RoutingRequest(offline_key(n)) for n in range(3)))
    a.take()
    a_id, b_id = net.link("a", "b")
    assert (a_id, b_id) == (19, 16)
    net.send("a", RoutedData(19, b"to b"))
    assert b.take() == [RoutedData(16, b"to b")]
    net.send("b", RoutedData(16, b"to a"))
    assert a.take() == [RoutedData(19, b"to a")]


# ----------------------------------------------------------------------
# R-NOTIF
# ----------------------------------------------------------------------


@pytest.mark.parametrize("connection_id", [0, 5, 16, 17, 255])
def test_r_notif_1_connect_notification_is_ignored(net: Network, connection_id: int) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.link("a", "b")
    net.send("a", ConnectNotification(connection_id))
    assert a.received == [] and b.received == []
    assert not a.closed
    assert _slot_state(net, "a", 16) is SlotState.LINKED


@pytest.mark.parametrize("plain", [b"\x02", b"\x02\x10\x00"])
def test_r_notif_1_wrong_length_kills(net: Network, plain: bytes) -> None:
    a = net.connect("a")
    net.send_plain("a", plain)
    assert a.closed and a.close_reason == "R-NOTIF-1"


# ----------------------------------------------------------------------
# R-DISC
# ----------------------------------------------------------------------


@pytest.mark.parametrize("plain", [b"\x03", b"\x03\x10\x10"])
def test_r_disc_1_wrong_length_kills(net: Network, plain: bytes) -> None:
    a = net.connect("a")
    net.send("a", RoutingRequest(offline_key(1)))
    net.send_plain("a", plain)
    assert a.closed and a.close_reason == "R-DISC-1"


@pytest.mark.parametrize("connection_id", [0, 5, 15])
def test_r_disc_2_id_below_16_kills(net: Network, connection_id: int) -> None:
    """R-DISC-2 [obs id 5]: id < 16 wraps to slot 240..255 -> out of range."""
    a = net.connect("a")
    net.send("a", *(RoutingRequest(offline_key(n)) for n in range(240)))
    net.send("a", DisconnectNotification(connection_id))
    assert a.closed and a.close_reason == "R-DISC-2"


@pytest.mark.parametrize("connection_id", [16, 17, 255])
def test_r_disc_2_unused_slot_kills(net: Network, connection_id: int) -> None:
    a = net.connect("a")
    if connection_id != 16:
        net.send("a", RoutingRequest(offline_key(1)))  # slot 16 used, the others not
    net.send("a", DisconnectNotification(connection_id))
    assert a.closed and a.close_reason == "R-DISC-2"


def test_r_disc_2_freed_slot_is_unused(net: Network) -> None:
    a = net.connect("a")
    net.send("a", RoutingRequest(offline_key(1)), DisconnectNotification(16))
    assert not a.closed
    net.send("a", DisconnectNotification(16))
    assert a.closed and a.close_reason == "R-DISC-2"


def test_r_disc_3_linked_peer_notified_and_reverts(net: Network) -> None:
    """R-DISC-3 [obs]: peer gets 03 with its id, its slot reverts to REQUESTED;
    the sender gets nothing and its slot is freed."""
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(offline_key(1)))
    b.take()
    a_id, b_id = net.link("a", "b")
    assert (a_id, b_id) == (16, 17)
    net.send("a", DisconnectNotification(a_id))
    assert b.take() == [DisconnectNotification(b_id)]
    assert a.received == []
    assert a.connection.slots[0] is None
    assert b.public_key not in a.connection.slot_of_key
    assert _slot_state(net, "b", b_id) is SlotState.REQUESTED
    # b's data to the now REQUESTED slot is dropped (R-DATA-3), a sees nothing.
    net.send("b", RoutedData(b_id, b"lost"))
    assert a.received == [] and not b.closed
    # a's data to the freed id kills a (R-DATA-2).
    net.send("a", RoutedData(a_id, b"x"))
    assert a.closed and a.close_reason == "R-DATA-2"


def test_r_disc_3_requested_slot_freed_silently(net: Network) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.send("a", RoutingRequest(b.public_key))
    a.take()
    net.send("a", DisconnectNotification(16))
    assert a.received == [] and b.received == []
    assert a.connection.slots[0] is None
    # b now requests a: a no longer wants b, so no link.
    net.send("b", RoutingRequest(a.public_key))
    assert b.take() == [RoutingResponse(16, a.public_key)]
    assert a.received == []


def test_r_disc_3_freed_slot_reused(net: Network) -> None:
    a = net.connect("a")
    net.connect("b")
    net.link("a", "b")
    net.send("a", DisconnectNotification(16), RoutingRequest(offline_key(1)))
    assert a.take() == [RoutingResponse(16, offline_key(1))]


def test_r_disc_4_relink_keeps_the_peers_slot_id(net: Network) -> None:
    """R-DISC-4 [obs]: the side that kept its REQUESTED slot is relinked with
    the same id when the other side requests again."""
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(offline_key(1)))
    b.take()
    a_id, b_id = net.link("a", "b")
    net.send("a", RoutingRequest(offline_key(2)))  # a's slot 17
    a.take()
    net.send("a", DisconnectNotification(a_id))
    b.take()
    net.send("a", RoutingRequest(b.public_key))
    assert a.take() == [RoutingResponse(16, b.public_key), ConnectNotification(16)]
    assert b.take() == [ConnectNotification(b_id)]
    net.send("a", RoutedData(16, b"again"))
    assert b.take() == [RoutedData(b_id, b"again")]
