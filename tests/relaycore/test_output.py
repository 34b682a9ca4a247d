"""Output queue R-OUT-1..3 (§13) with our soft and hard limits (RelayOptions)."""

from __future__ import annotations

from relaycore.options import RelayOptions
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    OobReceive,
    OobSend,
    Packet,
    Ping,
    Pong,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import SlotState
from tests.relaycore.harness import Network, secret_key_for

SOFT = 100
HARD = 1000


def _network(**options: object) -> Network:
    return Network(
        RelayOptions(output_soft_limit=SOFT, output_hard_limit=HARD, **options)  # type: ignore[arg-type]
    )


def _linked() -> tuple[Network, int, int]:
    net = _network()
    net.connect("a")
    net.connect("b")
    a_id, b_id = net.link("a", "b")
    return net, a_id, b_id


def _not_pings(packets: list[Packet]) -> list[Packet]:
    return [packet for packet in packets if not isinstance(packet, Ping)]


# ----------------------------------------------------------------------
# R-OUT-2: non-priority packets
# ----------------------------------------------------------------------


def test_r_out_2_data_dropped_over_soft_limit_without_using_a_nonce() -> None:
    """R-OUT-2 / R-FRAME-7: relayed data to a receiver whose transport holds more
    than output_soft_limit bytes is dropped and uses no nonce: the receiver
    decrypts the next frame with the nonce it expects."""
    net, a_id, b_id = _linked()
    b = net["b"]
    send_nonce = b.connection.channel.send_nonce  # type: ignore[union-attr]
    b.connection.transport_backlog = SOFT + 1
    net.send("a", RoutedData(a_id, b"dropped 1"), RoutedData(a_id, b"dropped 2"))
    assert b.connection.outbox == []
    assert b.connection.channel.send_nonce == send_nonce  # type: ignore[union-attr]
    assert net.server.stats["dropped.backpressure"] == 2
    b.connection.transport_backlog = 0
    net.send("a", RoutedData(a_id, b"delivered"))
    assert b.take() == [RoutedData(b_id, b"delivered")]
    assert not b.closed and not net["a"].closed
    assert net["a"].received == []  # the sender is never told


def test_r_out_2_soft_limit_boundary() -> None:
    """Exactly output_soft_limit bytes unsent still sends; one more drops."""
    net, a_id, b_id = _linked()
    b = net["b"]
    b.connection.transport_backlog = SOFT
    net.send("a", RoutedData(a_id, b"at the limit"))
    assert b.take() == [RoutedData(b_id, b"at the limit")]
    b.connection.transport_backlog = SOFT + 1
    net.send("a", RoutedData(a_id, b"over"))
    assert b.take() == []


def test_r_out_2_outbox_counts_as_unsent() -> None:
    """A slow reader (bytes still in the outbox) gets one packet queued, the
    rest dropped; after it drains, every frame it got decrypts in order."""
    net, a_id, b_id = _linked()
    b = net["b"]
    net.hold("b")
    net.send("a", *(RoutedData(a_id, bytes([n]) * 90) for n in range(5)))
    assert len(b.connection.outbox) == 1
    assert b.connection.outbox_size == 2 + 16 + 91
    assert net.server.stats["dropped.backpressure"] == 4
    net.release("b")
    assert b.take() == [RoutedData(b_id, bytes([0]) * 90)]
    net.send("a", RoutedData(a_id, b"after"))
    assert b.take() == [RoutedData(b_id, b"after")]


def test_r_out_2_oob_is_non_priority() -> None:
    net = _network()
    a = net.connect("a")
    b = net.connect("b")
    b.connection.transport_backlog = SOFT + 1
    net.send("a", OobSend(b.public_key, b"dropped"))
    assert b.connection.outbox == []
    b.connection.transport_backlog = 0
    net.send("a", OobSend(b.public_key, b"kept"))
    assert b.take() == [OobReceive(a.public_key, b"kept")]


# ----------------------------------------------------------------------
# R-OUT-1: priority packets
# ----------------------------------------------------------------------


def test_r_out_1_priority_packets_never_dropped_over_soft_limit() -> None:
    """R-OUT-1: routing responses, connect/disconnect notifications, PING and PONG
    are queued whatever the backlog (below the hard limit)."""
    net = _network()
    a = net.connect("a")
    b = net.connect("b")
    b.connection.transport_backlog = HARD - 200
    net.send("b", RoutingRequest(a.public_key))  # ROUTING_RESPONSE to b
    net.send("a", RoutingRequest(b.public_key))  # CONNECTION_NOTIFICATION to b
    net.send("b", Ping(b"bbbbbbbb"))  # PONG to b
    net.tick(30.0)  # server PING to b
    net.send("a", DisconnectNotification(16))  # DISCONNECT_NOTIFICATION to b
    assert not b.closed
    response, connected, pong, ping, disconnected = b.take()
    assert (response, connected, pong) == (
        RoutingResponse(16, a.public_key),
        ConnectNotification(16),
        Pong(b"bbbbbbbb"),
    )
    assert isinstance(ping, Ping) and ping.ping_id != bytes(8)
    assert disconnected == DisconnectNotification(16)
    assert net.server.stats["dropped.backpressure"] == 0


def test_output_hard_limit_kills_the_receiver_and_notifies_its_peers() -> None:
    """R-OUT-1 bound: a priority packet that would take the receiver past
    output_hard_limit kills it (R-KILL-1 follows: its linked peers are told)."""
    net = _network()
    net.connect("a")
    b = net.connect("b")
    c = net.connect("c")
    _, c_id = net.link("b", "c")
    b.connection.transport_backlog = HARD - 2  # a 2-byte notification would pass it
    net.send("a", RoutingRequest(b.public_key))
    net.send("b", RoutingRequest(net["a"].public_key))  # response 34 bytes -> kill
    assert b.closed and b.close_reason == "output_hard_limit"
    assert b.received == []
    assert c.take() == [DisconnectNotification(c_id)]
    assert net["a"].take() == [RoutingResponse(16, b.public_key)]  # never linked


def test_output_hard_limit_exact_boundary() -> None:
    """R-OUT-1 bound: reaching output_hard_limit exactly is allowed, passing it kills."""
    net = _network()
    a = net.connect("a")
    a.connection.transport_backlog = HARD - 9
    net.send("a", Ping(b"12345678"))  # 9-byte PONG: exactly at the limit
    assert a.take() == [Pong(b"12345678")] and not a.closed
    a.connection.transport_backlog = HARD - 8
    net.send("a", Ping(b"12345678"))
    assert a.closed and a.close_reason == "output_hard_limit"


def test_hard_limit_on_own_routing_response_takes_no_slot_and_links_nothing() -> None:
    """R-ROUTE-5/6 with R-OUT-1's bound: a requester killed by its own
    ROUTING_RESPONSE takes no slot and is not linked to the peer that wanted it;
    the peer's slot stays REQUESTED and a later connection with the same key
    links with it normally."""
    net = _network()
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(a.public_key))
    assert b.take() == [RoutingResponse(16, a.public_key)]
    a.connection.transport_backlog = HARD
    net.send("a", RoutingRequest(b.public_key))
    assert a.closed and a.close_reason == "output_hard_limit"
    assert b.received == []
    slot = b.connection.slots[0]
    assert slot is not None and slot.state is SlotState.REQUESTED and slot.peer is None
    assert net.server.stats["links"] == 0
    a2 = net.connect("a2", secret_key_for("a"))
    net.send("a2", RoutingRequest(b.public_key))
    assert a2.take() == [RoutingResponse(16, b.public_key), ConnectNotification(16)]
    assert b.take() == [ConnectNotification(16)]


def test_hard_limit_on_own_connect_notification_leaves_the_peer_untold() -> None:
    """R-ROUTE-6 with R-OUT-1's bound: the response fits, the requester's
    CONNECTION_NOTIFICATION does not. The requester dies before the link exists,
    so the other side sees neither a connect nor a disconnect notification."""
    net = _network()
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(a.public_key))
    b.take()
    # response: 34-byte plaintext passes (backlog + 34 <= HARD) and queues 52
    # bytes; the 2-byte notification then fails (backlog + 52 + 2 > HARD).
    a.connection.transport_backlog = HARD - 40
    net.send("a", RoutingRequest(b.public_key))
    assert a.closed and a.close_reason == "output_hard_limit"
    assert b.received == []
    slot = b.connection.slots[0]
    assert slot is not None and slot.state is SlotState.REQUESTED and slot.peer is None
    net.send("b", RoutedData(16, b"nobody there"))
    assert not b.closed and b.received == []


def test_hard_limit_on_peers_connect_notification_tells_the_requester() -> None:
    """R-ROUTE-6 / R-KILL-1: the other side dies on its CONNECTION_NOTIFICATION
    (output_hard_limit). The requester saw the link come up, so it gets the
    matching DISCONNECT_NOTIFICATION."""
    net = _network()
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(a.public_key))
    b.take()
    b.connection.transport_backlog = HARD - 1
    net.send("a", RoutingRequest(b.public_key))
    assert b.closed and b.close_reason == "output_hard_limit"
    assert a.take() == [
        RoutingResponse(16, b.public_key),
        ConnectNotification(16),
        DisconnectNotification(16),
    ]
    slot = a.connection.slots[0]
    assert slot is not None and slot.state is SlotState.REQUESTED and slot.peer is None


def test_cascading_hard_limit_kill_in_tick_sends_nothing_to_the_dead() -> None:
    """R-PING-4 / R-KILL-1: a peer killed (hard limit) by a ping-timeout kill
    inside tick() is not pinged by the same tick: a killed connection receives
    nothing."""
    net = Network(RelayOptions(output_hard_limit=1076))
    a = net.connect("a", answer_pings=False)
    net.tick(10.0)
    b = net.connect("b")
    net.link("a", "b")
    net.hold("b")
    net.send("a", OobSend(b.public_key, b"x" * 1024))  # 1075 bytes queued for b
    assert b.connection.outbox_size == 1075
    net.tick(30.0)  # a pinged, b not due (confirmed at 10)
    net.tick(40.0)  # a times out -> 03 to b passes the hard limit -> b killed
    assert a.closed and a.close_reason == "R-PING-4"
    assert b.closed and b.close_reason == "output_hard_limit"
    assert b.connection.outbox == []


# ----------------------------------------------------------------------
# R-OUT-3: order
# ----------------------------------------------------------------------


def test_r_out_3_bytes_leave_in_nonce_order() -> None:
    """Priority and non-priority packets queued behind each other for a slow
    reader come out in the order they were made (each decrypts with the next
    nonce)."""
    net = Network()
    a = net.connect("a")
    b = net.connect("b")
    a_id, b_id = net.link("a", "b")
    net.hold("b")
    net.send("a", RoutedData(a_id, b"one"))
    net.send("b", Ping(b"b-ping-1"))
    net.send("a", OobSend(b.public_key, b"two"), RoutedData(a_id, b"three"))
    net.send("b", RoutingRequest(b.public_key))
    assert len(b.connection.outbox) == 5
    net.release("b")
    assert b.take() == [
        RoutedData(b_id, b"one"),
        Pong(b"b-ping-1"),
        OobReceive(a.public_key, b"two"),
        RoutedData(b_id, b"three"),
        RoutingResponse(0, b.public_key),
    ]
    assert _not_pings(a.take()) == []
