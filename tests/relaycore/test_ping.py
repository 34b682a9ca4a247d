"""Ping / pong R-PING-1..5 and the timer rule R-TIME-1 (§8.4, §10), fake clock only."""

from __future__ import annotations

import pytest

from relaycore.options import RelayOptions
from relaycore.packets import DisconnectNotification, Packet, Ping, Pong, RoutedData
from tests.relaycore.harness import Network

ZERO = bytes(8)


def _not_pings(packets: list[Packet]) -> list[Packet]:
    """Drop the server's keep-alive pings (the client answers them itself)."""
    return [packet for packet in packets if not isinstance(packet, Ping)]


@pytest.mark.parametrize("ping_id", [ZERO, b"\x01" * 8, bytes(range(8)), b"\xff" * 8])
def test_r_ping_1_pong_echoes_any_id(net: Network, ping_id: bytes) -> None:
    """R-PING-1 [obs]: same 8 bytes back, all-zero included."""
    a = net.connect("a")
    net.send("a", Ping(ping_id))
    assert a.take() == [Pong(ping_id)]
    assert not a.closed


@pytest.mark.parametrize("plain", [b"\x04" + bytes(7), b"\x04" + bytes(9), b"\x04"])
def test_r_ping_1_wrong_length_kills(net: Network, plain: bytes) -> None:
    a = net.connect("a")
    net.send_plain("a", plain)
    assert a.closed and a.close_reason == "R-PING-1"
    assert a.received == []


def test_r_ping_1_pong_is_priority(net: Network) -> None:
    """R-PING-1/R-OUT-1: the PONG is sent even while the output is backed up."""
    net = Network(RelayOptions(output_soft_limit=10))
    a = net.connect("a")
    a.connection.transport_backlog = 1000
    net.send("a", Ping(b"p" * 8))
    assert a.take() == [Pong(b"p" * 8)]


def test_r_ping_2_server_pings_after_30_seconds(net: Network) -> None:
    """R-PING-2 [obs]: nothing before 30 s; at 30 s a PING with a nonzero id."""
    a = net.connect("a", answer_pings=False)
    net.tick(29.999)
    assert a.received == []
    net.tick(30.0)
    (ping,) = a.take()
    assert isinstance(ping, Ping)
    assert ping.ping_id != ZERO
    assert a.connection.ping_id == ping.ping_id
    assert a.connection.last_pinged == 30.0


def test_r_ping_2_zero_random_id_replaced_by_one(net: Network) -> None:
    a = net.connect("a", answer_pings=False)
    net.random.queue.append(ZERO)
    net.tick(30.0)
    assert a.take() == [Ping(b"\x00" * 7 + b"\x01")]
    assert a.connection.ping_id == b"\x00" * 7 + b"\x01"


def test_r_ping_2_answered_pings_repeat_every_30_seconds(net: Network) -> None:
    a = net.connect("a")  # answers pings by itself
    ids = []
    for now in (30.0, 45.0, 59.9, 60.0, 89.0, 90.0):
        net.tick(now)
        ids += [p.ping_id for p in a.take() if isinstance(p, Ping)]
        assert a.connection.ping_id == ZERO  # PONG arrived at once
    assert len(ids) == 3 and len(set(ids)) == 3
    assert not a.closed


def test_r_ping_3_matching_pong_clears(net: Network) -> None:
    a = net.connect("a", answer_pings=False)
    net.tick(30.0)
    (ping,) = a.take()
    net.send("a", Pong(ping.ping_id))  # type: ignore[union-attr]
    assert a.connection.ping_id == ZERO
    net.tick(40.0)
    net.tick(59.0)
    assert not a.closed
    assert a.received == []


def test_r_ping_3_wrong_pong_is_ignored(net: Network) -> None:
    """R-PING-3 [obs]: another id changes nothing; the ping stays outstanding."""
    a = net.connect("a", answer_pings=False)
    net.tick(30.0)
    (ping,) = a.take()
    wrong = bytes(b ^ 0xFF for b in ping.ping_id)  # type: ignore[union-attr]
    net.send("a", Pong(wrong))
    assert not a.closed
    assert a.connection.ping_id == ping.ping_id  # type: ignore[union-attr]
    net.tick(40.0)
    assert a.closed and a.close_reason == "R-PING-4"


def test_r_ping_3_zero_pong_kills(net: Network) -> None:
    a = net.connect("a", answer_pings=False)
    net.tick(30.0)
    a.take()
    net.send("a", Pong(ZERO))
    assert a.closed and a.close_reason == "R-PING-3"


def test_r_ping_3_zero_pong_kills_without_outstanding_ping(net: Network) -> None:
    a = net.connect("a")
    net.send("a", Pong(ZERO))
    assert a.closed and a.close_reason == "R-PING-3"


@pytest.mark.parametrize("plain", [b"\x05" + bytes(7), b"\x05" + b"\x01" * 9])
def test_r_ping_3_wrong_length_kills(net: Network, plain: bytes) -> None:
    a = net.connect("a")
    net.send_plain("a", plain)
    assert a.closed and a.close_reason == "R-PING-3"


def test_r_ping_4_unanswered_ping_kills_at_plus_10_and_notifies_peers(net: Network) -> None:
    """R-PING-4 [obs 9.99 s]: killed at last_pinged + 10 (R-TIME-1: last + interval
    <= now), linked peers get DISCONNECT_NOTIFICATION."""
    a = net.connect("a", answer_pings=False)
    b = net.connect("b")
    a_id, b_id = net.link("a", "b")
    net.tick(30.0)
    assert [type(p) for p in a.take()] == [Ping]
    net.tick(39.999)
    assert not a.closed
    net.tick(40.0)
    assert a.closed and a.close_reason == "R-PING-4"
    assert a.received == []
    assert _not_pings(b.take()) == [DisconnectNotification(b_id)]
    assert a.public_key not in net.server.by_key
    assert not b.closed and a_id == 16


def test_r_ping_4_other_traffic_does_not_count(net: Network) -> None:
    """R-PING-4: only a matching PONG counts: pings, data, notifications do not."""
    a = net.connect("a", answer_pings=False)
    b = net.connect("b")
    a_id, _ = net.link("a", "b")
    net.tick(30.0)
    a.take()
    net.tick(35.0)
    net.send("a", Ping(b"alive!!!"), RoutedData(a_id, b"still here"))
    assert a.take() == [Pong(b"alive!!!")]
    assert _not_pings(b.take()) == [RoutedData(16, b"still here")]
    net.tick(40.0)
    assert a.closed and a.close_reason == "R-PING-4"


def test_r_ping_4_one_second_ticks_kill_exactly_at_plus_10(net: Network) -> None:
    """With the adapter's 1 s tick the kill lands on the first tick >= +10 s."""
    a = net.connect("a", answer_pings=False)
    for second in range(1, 40):
        net.tick(float(second))
        assert not a.closed, second
    assert [type(p) for p in a.take()] == [Ping]
    net.tick(40.0)
    assert a.closed and a.close_reason == "R-PING-4"


def test_r_ping_4_unconfirmed_connections_are_not_pinged() -> None:
    net = Network(RelayOptions(handshake_timeout=0))
    a = net.handshake("a")
    net.tick(30.0)
    net.tick(100.0)
    assert a.received == [] and not a.closed


def test_r_ping_5_ping_that_cannot_be_queued_kills() -> None:
    """R-PING-5 analogue: our 'allocation failure' is output_hard_limit; a ping
    that would pass it kills the connection at once instead of after 40 s."""
    net = Network(RelayOptions(output_hard_limit=1000))
    a = net.connect("a", answer_pings=False)
    b = net.connect("b")
    _, b_id = net.link("a", "b")
    a.connection.transport_backlog = 995
    net.tick(30.0)
    assert a.closed and a.close_reason == "output_hard_limit"
    assert _not_pings(b.take()) == [DisconnectNotification(b_id)]


def test_ping_options_change_the_intervals() -> None:
    net = Network(RelayOptions(ping_interval=5.0, ping_timeout=2.0))
    a = net.connect("a", answer_pings=False)
    net.tick(5.0)
    assert [type(p) for p in a.take()] == [Ping]
    net.tick(7.0)
    assert a.closed and a.close_reason == "R-PING-4"
