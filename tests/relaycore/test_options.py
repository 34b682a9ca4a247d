"""Our documented improvements over 0.2.18 (RelayOptions): handshake timeout
(vs R-TIME-2), connection limits (vs the rings of R-LIM-1/2) and the
per-connection bookkeeping they rely on."""

from __future__ import annotations

import pytest

from relaycore.options import RelayOptions
from relaycore.packets import Ping, Pong
from relaycore.relay import ConnectionRefused, ConnectionState
from tests.relaycore.harness import Network

# ----------------------------------------------------------------------
# handshake_timeout
# ----------------------------------------------------------------------


def test_handshake_timeout_closes_incoming_after_10_s(net: Network) -> None:
    incoming = net.open("i")
    net.tick(9.999)
    assert not incoming.closed
    net.tick(10.0)
    assert incoming.closed and incoming.close_reason == "handshake_timeout"
    assert incoming.received == []
    assert net.server.pending == set() and net.server.connection_count == 0


def test_handshake_timeout_closes_unconfirmed_counted_from_accept(net: Network) -> None:
    """The clock starts at accept, not at the hello."""
    unconfirmed = net.open("u")
    net.now = 9.0
    net.pump()  # the hello arrives at 9 s
    assert unconfirmed.connection.state is ConnectionState.UNCONFIRMED
    net.tick(9.999)
    assert not unconfirmed.closed
    net.tick(10.0)
    assert unconfirmed.closed and unconfirmed.close_reason == "handshake_timeout"


def test_handshake_timeout_spares_confirmed(net: Network) -> None:
    a = net.connect("a")
    net.tick(10.0)
    net.tick(25.0)
    assert not a.closed
    net.send("a", Ping(b"confirmd"))
    assert a.take() == [Pong(b"confirmd")]


def test_handshake_timeout_zero_disables() -> None:
    """R-TIME-2 (0.2.18): no timeout at all for INCOMING / UNCONFIRMED."""
    net = Network(RelayOptions(handshake_timeout=0))
    incoming = net.open("i")
    unconfirmed = net.handshake("u")
    for now in (10.0, 50.0, 10_000.0):
        net.tick(now)
    assert not incoming.closed and not unconfirmed.closed
    assert unconfirmed.connection.state is ConnectionState.UNCONFIRMED
    assert net.server.pending == {incoming.connection, unconfirmed.connection}


def test_handshake_timeout_custom_value() -> None:
    net = Network(RelayOptions(handshake_timeout=2.5))
    incoming = net.open("i")
    net.tick(2.4)
    assert not incoming.closed
    net.tick(2.5)
    assert incoming.closed


# ----------------------------------------------------------------------
# max_connections, max_connections_per_ip, max_unconfirmed
# ----------------------------------------------------------------------


def test_max_connections_refuses_then_frees_on_close() -> None:
    net = Network(RelayOptions(max_connections=2))
    first = net.connect("a")
    net.open("b", ip="10.0.0.2")
    with pytest.raises(ConnectionRefused) as caught:
        net.open("c", ip="10.0.0.3")
    assert caught.value.reason == "max_connections"
    assert net.server.stats["refused.max_connections"] == 1
    assert net.server.connection_count == 2
    net.server.kill(first.connection, "test")
    net.pump()
    assert net.server.connection_count == 1
    net.connect("c", ip="10.0.0.3")
    assert net.server.connection_count == 2


def test_max_connections_per_ip() -> None:
    net = Network(RelayOptions(max_connections_per_ip=2))
    net.connect("a", ip="192.0.2.7")
    second = net.open("b", ip="192.0.2.7")
    with pytest.raises(ConnectionRefused) as caught:
        net.open("c", ip="192.0.2.7")
    assert caught.value.reason == "max_connections_per_ip"
    net.connect("d", ip="192.0.2.8")  # other addresses are not affected
    assert net.server.connections_per_ip == {"192.0.2.7": 2, "192.0.2.8": 1}
    net.peer_eof("b")
    assert second.closed
    assert net.server.connections_per_ip["192.0.2.7"] == 1
    net.connect("c", ip="192.0.2.7")


def test_connections_per_ip_entry_removed_when_last_one_closes(net: Network) -> None:
    a = net.connect("a", ip="198.51.100.1")
    net.peer_eof("a")
    assert a.closed
    assert "198.51.100.1" not in net.server.connections_per_ip


def test_max_unconfirmed_counts_incoming_and_unconfirmed() -> None:
    """At the cap a newcomer is accepted and the oldest handshake of the
    address holding the most is evicted (issue 10 #6); confirming leaves the
    pending set."""
    net = Network(RelayOptions(max_unconfirmed=2))
    incoming = net.open("incoming")
    unconfirmed = net.handshake("unconfirmed")
    net.open("c")
    net.pump()
    assert incoming.closed and incoming.close_reason == "evicted_unconfirmed"
    assert not unconfirmed.closed
    assert net.server.stats["closed.evicted_unconfirmed"] == 1
    assert len(net.server.pending) == 2
    net.send("unconfirmed", Ping(bytes(8)))  # confirms: leaves the pending set
    assert unconfirmed.connection.state is ConnectionState.CONFIRMED
    net.open("d")
    assert len(net.server.pending) == 2
    assert net.server.stats["closed.evicted_unconfirmed"] == 1


def test_max_unconfirmed_evicts_the_oldest_of_the_busiest_address() -> None:
    """Half-open flood (issue 10 #6): a flooding address loses its own oldest
    handshakes; honest addresses' handshakes survive and newcomers get in."""
    net = Network(RelayOptions(max_unconfirmed=4, max_unconfirmed_per_ip=0))
    honest = net.handshake("honest", ip="192.0.2.10")
    flood = [net.open(f"f{i}", ip="198.51.100.66") for i in range(3)]
    newcomer = net.open("newcomer", ip="192.0.2.11")
    net.pump()
    assert flood[0].closed and flood[0].close_reason == "evicted_unconfirmed"
    assert not honest.closed and not newcomer.closed
    more = [net.open(f"g{i}", ip="198.51.100.66") for i in range(5)]
    net.pump()
    assert not honest.closed and not newcomer.closed
    assert [p.closed for p in flood + more] == [True] * 6 + [False] * 2
    net.send("honest", Ping(bytes(8)))
    assert honest.connection.state is ConnectionState.CONFIRMED


def test_max_unconfirmed_per_ip_refuses_that_address_only() -> None:
    """IPv4 addresses count one by one, IPv6 ones per /64 (issue 10 #6)."""
    net = Network(RelayOptions(max_unconfirmed_per_ip=2))
    net.open("a1", ip="198.51.100.1")
    net.open("a2", ip="::ffff:198.51.100.1")  # the same address, IPv4-mapped
    with pytest.raises(ConnectionRefused) as caught:
        net.open("a3", ip="198.51.100.1")
    assert caught.value.reason == "max_unconfirmed_per_ip"
    net.open("b1", ip="198.51.100.2")
    net.open("v1", ip="2001:db8:1:2::1")
    net.open("v2", ip="2001:db8:1:2:ffff::9")
    with pytest.raises(ConnectionRefused):
        net.open("v3", ip="2001:db8:1:2::77")
    net.open("w1", ip="2001:db8:1:3::1")  # another /64
    assert net.server.stats["refused.max_unconfirmed_per_ip"] == 2
    net.pump()  # every hello is answered
    net.send("a1", Ping(bytes(8)))  # a1 confirms: room for one more
    assert net["a1"].connection.state is ConnectionState.CONFIRMED
    net.open("a4", ip="198.51.100.1")


def test_max_unconfirmed_freed_by_handshake_timeout() -> None:
    net = Network(RelayOptions(max_unconfirmed=1))
    slow = net.open("slow")
    net.tick(10.0)
    assert slow.closed and slow.close_reason == "handshake_timeout"
    net.connect("b")


def test_zero_limits_mean_unlimited() -> None:
    net = Network(RelayOptions(max_connections=0, max_connections_per_ip=0, max_unconfirmed=0))
    for number in range(30):
        net.open(f"c{number}")
    assert net.server.connection_count == 30
    assert len(net.server.pending) == 30


def test_refused_connection_leaves_no_trace() -> None:
    net = Network(RelayOptions(max_connections=1))
    net.connect("a")
    accepted = net.server.stats["accepted"]
    with pytest.raises(ConnectionRefused):
        net.server.open_connection("10.9.9.9", 0.0)
    assert net.server.stats["accepted"] == accepted
    assert "10.9.9.9" not in net.server.connections_per_ip
    assert net.server.pending == set()
