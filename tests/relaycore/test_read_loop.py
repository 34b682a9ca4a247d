"""The per-read frame loop (RelayServer._read_frames): routed data to a local
peer is re-sealed inline, everything else goes through the packet handlers.
One read holding a mix of both must give what one frame per read gives, in
the same order (R-FRAME-5, R-DATA-4, R-ORDER-*), with the same counters."""

from __future__ import annotations

from relaycore.packets import (
    DisconnectNotification,
    OobReceive,
    OobSend,
    Ping,
    Pong,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import FRAMES_PER_RECEIVE, ConnectionState
from tests.relaycore.harness import Network


def _linked_pair() -> tuple[Network, int, int]:
    net = Network()
    net.connect("a")
    net.connect("b")
    a_id, b_id = net.link("a", "b")
    return net, a_id, b_id


def _one_read(net: Network, name: str, *packets: object) -> None:
    """Every packet framed first, then all of them delivered in one receive."""
    peer = net[name]
    for packet in packets:
        peer.client.send(packet)  # type: ignore[arg-type]
    data = peer.client.take_outbox()
    net.server.receive(peer.connection, data, net.now)
    net.pump()


def test_mixed_read_keeps_order_and_counts_like_single_frames() -> None:
    net, a_id, b_id = _linked_pair()
    net.connect("c")
    net.send("a", RoutingRequest(net["c"].public_key))  # requested, not linked
    (response,) = net["a"].take()
    assert isinstance(response, RoutingResponse)
    unlinked_id = response.connection_id
    stats = net.server.stats
    before = {key: stats[key] for key in ("frames_in", "relayed", "relayed_bytes", "frames_out")}
    _one_read(
        net,
        "a",
        RoutedData(a_id, b"first"),
        Ping(b"12345678"),
        RoutedData(unlinked_id, b"nobody"),  # R-DATA-3: dropped, counted
        RoutedData(a_id, b"second"),
        OobSend(net["b"].public_key, b"oob"),
        RoutedData(a_id, b"third"),
    )
    assert net["b"].take() == [
        RoutedData(b_id, b"first"),
        RoutedData(b_id, b"second"),
        OobReceive(net["a"].public_key, b"oob"),
        RoutedData(b_id, b"third"),
    ]
    assert net["a"].take() == [Pong(b"12345678")]
    assert net["c"].take() == []
    assert stats["frames_in"] - before["frames_in"] == 6
    assert stats["relayed"] - before["relayed"] == 4  # three data + the OOB
    # Relayed bytes are the plaintexts delivered: id byte + payload, OOB 1 + 32 + 3.
    assert stats["relayed_bytes"] - before["relayed_bytes"] == 6 + 7 + 36 + 6
    assert stats["frames_out"] - before["frames_out"] == 5  # four relayed + the PONG
    assert stats["dropped.not_linked"] == 1


def test_bad_frame_after_routed_data_delivers_what_came_before() -> None:
    """R-FRAME-5 / R-FRAME-4: the frames before a bad one are relayed, the
    sender is killed at it, and its peer is told after the data (R-KILL-1)."""
    net, a_id, b_id = _linked_pair()
    a = net["a"]
    for payload in (b"one", b"two", b"three"):
        a.client.send(RoutedData(a_id, payload))
    data = a.client.take_outbox() + (40).to_bytes(2, "big") + bytes(40)  # MAC fails
    net.server.receive(a.connection, data, net.now)
    net.pump()
    assert net["b"].take() == [
        RoutedData(b_id, b"one"),
        RoutedData(b_id, b"two"),
        RoutedData(b_id, b"three"),
        DisconnectNotification(b_id),
    ]
    assert a.connection.state is ConnectionState.CLOSED
    assert a.connection.close_reason == "R-FRAME-4"


def test_frame_budget_holds_for_routed_data() -> None:
    """A read of routed data stops at FRAMES_PER_RECEIVE; the rest is relayed
    on the adapter's next call, in order, none lost or repeated."""
    net, a_id, b_id = _linked_pair()
    a, b = net["a"], net["b"]
    total = FRAMES_PER_RECEIVE + 44
    for number in range(total):
        a.client.send(RoutedData(a_id, number.to_bytes(2, "big")))
    relayed_before = net.server.stats["relayed"]
    net.server.receive(a.connection, a.client.take_outbox(), net.now)
    assert net.server.stats["relayed"] - relayed_before == FRAMES_PER_RECEIVE
    assert a.connection.more_input
    net.pump()  # the adapter's later turns
    assert not a.connection.more_input
    assert b.take() == [RoutedData(b_id, number.to_bytes(2, "big")) for number in range(total)]


def test_routed_data_before_confirmation_confirms_then_is_handled() -> None:
    """R-CONF-1: the first frame confirms whatever it is; a data frame for an
    unused id is then R-DATA-2 (killed), read through the same loop."""
    net = Network()
    peer = net.handshake("a")
    peer.client.send(RoutedData(16, b"too early"))
    net.server.receive(peer.connection, peer.client.take_outbox(), net.now)
    assert peer.connection.state is ConnectionState.CLOSED
    assert peer.connection.close_reason == "R-DATA-2"
    assert net.server.stats["confirmed"] == 1
