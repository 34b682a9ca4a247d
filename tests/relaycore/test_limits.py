"""Limits a hostile client meets (issue 10 #5-#8), on the sans-IO core with a
fake clock: refused next hops, per-address handshake caps, WANTs coalesced
per SET batch, OOB broadcasts and onion requests budgeted per address."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from relaycore.limits import AddressBuckets, PendingByAddress, address_key
from relaycore.nexthop import (
    OWN_ADDRESS,
    PRIVATE,
    SELF,
    VERDICTS_CACHED,
    NextHopPolicy,
    reached_address,
)
from relaycore.onion import OnionSecrets
from relaycore.options import RelayOptions
from relaycore.packets import ForwardRequest, OobSend, RoutingRequest
from relaycore.shardlink import EPOCH_COUNTER_BITS, Link, MapUpdate
from tests.relaycore.harness import Network

SECRETS = OnionSecrets(bytes(range(7, 39)))


# ----------------------------------------------------------------------
# #5 Next hops
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1", "127.9.9.9", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1",
        "100.64.0.1", "100.127.255.254", "0.1.2.3", "192.0.0.8", "198.18.0.1", "240.0.0.1",
        "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::127.0.0.1", "2002:7f00:1::1",
        "64:ff9b::a00:1", "64:ff9b:1::1", "fe80::1", "fc00::1", "fd12:3456::1", "fec0::1",
    ],
)  # fmt: skip
def test_non_global_next_hops_are_refused(host: str) -> None:
    assert NextHopPolicy().refusal(host, 33445) in (PRIVATE, OWN_ADDRESS)
    assert NextHopPolicy(allow_private=True).refusal(host, 33445) is None


@pytest.mark.parametrize(
    "host", ["1.1.1.1", "8.8.4.4", "::ffff:1.1.1.1", "2606:4700::1111", "64:ff9b::808:808"]
)
def test_global_next_hops_are_sent_to(host: str) -> None:
    assert NextHopPolicy().refusal(host, 33445) is None


def test_mapped_forms_reach_their_ipv4_address() -> None:
    assert str(reached_address("::ffff:10.0.0.1")) == "10.0.0.1"
    assert str(reached_address("2002:0a00:0001::5")) == "10.0.0.1"
    assert str(reached_address("64:ff9b::7f00:1")) == "127.0.0.1"


def test_own_addresses_and_own_udp_endpoint() -> None:
    policy = NextHopPolicy(own_addresses=["203.0.114.5", "2001:4860::5"], own_ports=[33445])
    assert policy.refusal("203.0.114.5", 9) == OWN_ADDRESS
    assert policy.refusal("::ffff:203.0.114.5", 9) == OWN_ADDRESS
    assert policy.refusal("2001:4860::5", 9) == OWN_ADDRESS
    assert policy.refusal("203.0.114.5", 33445) == SELF
    assert policy.refusal("203.0.114.6", 33445) is None
    lan = NextHopPolicy(True, own_addresses=["203.0.114.5"], own_ports=[33445])
    assert lan.refusal("203.0.114.5", 9) is None
    assert lan.refusal("203.0.114.5", 33445) == SELF
    assert lan.refusal("127.0.0.1", 33445) == SELF  # loopback is always the host itself


def test_next_hop_verdicts_are_remembered_within_a_bound() -> None:
    """The per-host verdict cache (9 us of ipaddress work per datagram saved)
    gives the same answers the second time, per port, and a client sending
    to ever new addresses cannot make it hold more than VERDICTS_CACHED."""
    policy = NextHopPolicy(own_addresses=["203.0.114.5"], own_ports=[33445])
    for _ in range(2):
        assert policy.refusal("203.0.114.5", 33445) == SELF
        assert policy.refusal("203.0.114.5", 9) == OWN_ADDRESS
        assert policy.refusal("10.0.0.1", 9) == PRIVATE
        assert policy.refusal("8.8.4.4", 9) is None
    for n in range(VERDICTS_CACHED + 100):
        policy.refusal(str(ipaddress.IPv4Address(0x08000000 + n)), 9)
    assert len(policy._verdicts) <= VERDICTS_CACHED
    assert policy.refusal("203.0.114.5", 33445) == SELF  # still right after emptying


def forward_to(host: bytes, port: int) -> ForwardRequest:
    return ForwardRequest(b"\x02" + host + struct.pack(">H", port), b"payload")


def test_relay_counts_refused_next_hops_and_sends_nothing() -> None:
    net = Network(onion_secrets=SECRETS, now=10.0)
    net.connect("a")
    net.send("a", forward_to(bytes((127, 0, 0, 1)), 9))
    net.send("a", forward_to(bytes((192, 168, 0, 1)), 9))
    net.send("a", forward_to(bytes((100, 64, 0, 1)), 9))
    net.send("a", forward_to(bytes((1, 1, 1, 1)), 9))
    [datagram] = net.server.take_datagrams()
    assert (datagram.host, datagram.port) == ("1.1.1.1", 9)
    stats = net.server.stats
    assert stats["dropped.next_hop_own_address"] == 1
    assert stats["dropped.next_hop_private"] == 2
    assert stats["forward.requests_sent"] == 1
    assert not net["a"].closed  # a silent drop, as any failed request (R-ONION-2)


# ----------------------------------------------------------------------
# #6 Half-open handshakes per address
# ----------------------------------------------------------------------


def test_address_key_counts_ipv6_per_64() -> None:
    assert address_key("198.51.100.7") == "198.51.100.7"
    assert address_key("::ffff:198.51.100.7") == "198.51.100.7"
    assert address_key("2001:db8:1:2::1") == address_key("2001:db8:1:2:aaaa::9")
    assert address_key("2001:db8:1:2::1") != address_key("2001:db8:1:3::1")
    assert address_key("?") == "?"


def test_pending_by_address_finds_the_oldest_of_the_busiest() -> None:
    pending = PendingByAddress()
    for name, key in [("a1", "A"), ("b1", "B"), ("b2", "B"), ("a2", "A"), ("b3", "B")]:
        pending.add(key, name)
    assert pending.oldest_of_busiest() == "b1"
    pending.remove("B", "b1")
    pending.remove("B", "b2")
    assert pending.oldest_of_busiest() == "a1"
    pending.remove("A", "a1")
    pending.remove("A", "a2")
    pending.remove("B", "b3")
    pending.remove("B", "b3")  # twice: no-op
    assert pending.oldest_of_busiest() is None and pending.by_key == {}


def test_half_open_flood_from_one_address_never_locks_newcomers_out() -> None:
    """Bare connects from one address used to keep max_unconfirmed full (every
    newcomer refused); now each newcomer evicts a flood socket and the honest
    handshakes survive."""
    net = Network(RelayOptions(max_unconfirmed=100, max_unconfirmed_per_ip=0), now=1.0)
    connected = 0
    for second in range(5):
        net.now = 1.0 + second
        for number in range(200):
            net.open(f"flood{second}.{number}", ip="198.51.100.66", answer_pings=False)
        honest = net.connect(f"honest{second}", ip=f"192.0.2.{second + 1}")
        connected += not honest.closed
    assert connected == 5
    assert len(net.server.pending) == 99  # the cap, less the last honest one
    opened = 5 * 201
    assert net.server.stats["closed.evicted_unconfirmed"] == opened - 5 - 99
    assert "refused.max_unconfirmed" not in net.server.stats


# ----------------------------------------------------------------------
# #7 Amplification across workers
# ----------------------------------------------------------------------


def _epoch(shard: int, serial: int) -> int:
    return shard << EPOCH_COUNTER_BITS | serial


def test_wants_after_sets_are_sent_once_per_batch_per_key() -> None:
    """R-ROUTE-6 across shards: 3 requesters of K; K reconnects 10 times on
    shard 2 within one batch of updates: 3 WANTs (to the newest epoch), not 30;
    and at most one such round per key per REWANT_INTERVAL."""
    net = Network(shard=1, now=5.0)
    net.server.cluster.set_peer_shards([2], net.now)
    key = bytes(range(32))
    for name in ("r1", "r2", "r3"):
        net.connect(name)
        net.send(name, RoutingRequest(key))
    net.server.cluster.take_bus(net.now)
    previous = None
    for serial in range(1, 11):
        replaced = (2, previous) if previous else (None, None)
        net.server.cluster.apply_map_update(
            (MapUpdate.SET, key, 2, _epoch(2, serial), *replaced), net.now
        )
        previous = _epoch(2, serial)
    wants = [m for _, m in net.server.cluster.take_bus(net.now) if m[0] == Link.WANT]
    assert len(wants) == 3
    assert {m[4] for m in wants} == {_epoch(2, 10)}
    assert net.server.stats["wants_after_set"] == 3
    # Another SET at once: the next round waits REWANT_INTERVAL (0.1 s), then
    # WANTs the newest connection of K.
    net.server.cluster.apply_map_update(
        (MapUpdate.SET, key, 2, _epoch(2, 11), 2, _epoch(2, 10)), net.now
    )
    net.server.cluster.apply_map_update(
        (MapUpdate.SET, key, 2, _epoch(2, 12), 2, _epoch(2, 11)), net.now
    )
    assert [m for _, m in net.server.cluster.take_bus(net.now) if m[0] == Link.WANT] == []
    net.tick(5.05)
    assert [m for _, m in net.server.cluster.take_bus(net.now) if m[0] == Link.WANT] == []
    net.tick(5.1)
    wants = [m for _, m in net.server.cluster.take_bus(net.now) if m[0] == Link.WANT]
    assert len(wants) == 3 and {m[4] for m in wants} == {_epoch(2, 12)}
    # A SET then a DEL of K in one batch: nothing to WANT.
    net.tick(6.0)
    net.server.cluster.apply_map_update(
        (MapUpdate.SET, key, 2, _epoch(2, 13), 2, _epoch(2, 12)), net.now
    )
    net.server.cluster.apply_map_update((MapUpdate.DEL, key, 2, _epoch(2, 13)), net.now)
    assert [m for _, m in net.server.cluster.take_bus(net.now) if m[0] == Link.WANT] == []


def test_oob_broadcasts_are_limited_per_address_and_per_worker() -> None:
    options = RelayOptions(
        oob_broadcast_rate_per_ip=10.0,
        oob_broadcast_burst_per_ip=40.0,
        oob_broadcast_rate_per_worker=60.0,
    )
    net = Network(options, shard=1, now=5.0)
    net.server.cluster.set_peer_shards([2, 3, 4], net.now)
    net.connect("a", ip="198.51.100.1")
    for number in range(100):
        net.send("a", OobSend(bytes([number]) * 32, b"hi"))
    assert len(net.server.cluster.take_bus(net.now)) == 40 * 3  # one copy per other shard
    assert net.server.stats["dropped.oob_broadcast_rate_ip"] == 60
    net.connect("a2", ip="198.51.100.1")  # a new connection: no fresh burst
    net.send("a2", OobSend(bytes(32), b"hi"))
    assert net.server.cluster.take_bus(net.now) == []
    net.now += 1.0  # 10 more tokens for the address
    for number in range(20):
        net.send("a2", OobSend(bytes([number]) * 32, b"hi"))
    assert len(net.server.cluster.take_bus(net.now)) == 10 * 3
    for host in range(2, 6):  # other addresses: the worker's 60/s ends it
        net.connect(f"b{host}", ip=f"198.51.100.{host}")
        for number in range(20):
            net.send(f"b{host}", OobSend(bytes([number]) * 32, b"hi"))
    assert net.server.stats["dropped.oob_broadcast_rate_worker"] == 80 - 50
    assert net.server.stats["oob_broadcast"] == 40 + 60  # the burst, then 1 s of 60/s


# ----------------------------------------------------------------------
# #8 Onion budget
# ----------------------------------------------------------------------


def test_address_buckets_outlive_connections_until_refilled() -> None:
    buckets = AddressBuckets(rate=10.0, burst=20.0)
    assert sum(buckets.take("A", 0.0) for _ in range(30)) == 20
    buckets.forget_refilled(1.0)  # half refilled: kept
    assert sum(buckets.take("A", 1.0) for _ in range(30)) == 10
    buckets.forget_refilled(5.0)  # full again: forgotten, and nothing changes
    assert buckets.buckets == {}
    assert sum(buckets.take("A", 5.0) for _ in range(30)) == 20


def test_address_buckets_are_bounded_and_forgotten_a_slice_at_a_time() -> None:
    buckets = AddressBuckets(rate=1.0, burst=2.0, limit=1000)
    for number in range(1500):  # spent buckets of 1500 addresses: the oldest go
        buckets.take(f"198.51.{number // 256}.{number % 256}", 0.0)
    assert len(buckets.buckets) == 1000
    buckets.forget_refilled(10.0, limit=300)  # all full again; 300 looked at
    assert len(buckets.buckets) == 700
    buckets.forget_refilled(10.0)
    assert buckets.buckets == {}


def test_new_connections_from_one_address_bring_no_fresh_onion_burst() -> None:
    options = RelayOptions(
        onion_rate_per_client=50.0, onion_burst_per_client=200.0,
        onion_rate_per_ip=100.0, onion_burst_per_ip=300.0, allow_private_next_hops=True,
    )  # fmt: skip
    net = Network(options, onion_secrets=SECRETS, now=5.0)
    for number in range(5):
        net.connect(f"c{number}", ip="198.51.100.9")
        for _ in range(200):
            net.send(f"c{number}", forward_to(bytes((1, 1, 1, 1)), 9))
    assert len(net.server.take_datagrams()) == 300
    assert net.server.stats["dropped.onion_rate_ip"] == 700


def test_heavy_addresses_cannot_take_the_reserved_share_of_the_worker() -> None:
    """Ten addresses flooding past their own rate take the worker's budget down
    to its reserved quarter; an address that sends little still gets through
    (first come, first served it got almost nothing). Only while the flooders'
    own bursts last (the first ticks) can they take the reserve too."""
    options = RelayOptions(
        onion_rate_per_client=0.0, onion_rate_per_ip=100.0, onion_burst_per_ip=100.0,
        onion_rate_per_worker=400.0, allow_private_next_hops=True,
    )  # fmt: skip
    net = Network(options, onion_secrets=SECRETS, now=5.0)
    attackers = [net.connect(f"x{i}", ip=f"198.51.100.{i + 1}").name for i in range(10)]
    net.connect("honest", ip="192.0.2.1")
    honest_sent = 0
    for tick in range(50):
        net.now = 5.0 + tick * 0.1
        for name in attackers:
            for _ in range(20):  # 200/s each: twice their own rate
                net.send(name, forward_to(bytes((1, 1, 1, 1)), 9))
        before = net.server.stats["forward.requests_sent"]
        net.send("honest", forward_to(bytes((1, 1, 1, 2)), 9))
        honest_sent += net.server.stats["forward.requests_sent"] - before
        net.server.take_datagrams()
    assert honest_sent >= 45
    assert net.server.stats["dropped.onion_rate_worker"] > 0
    assert net.server.stats["forward.requests_sent"] <= 400 + 5 * 400  # burst + 5 s
