"""The first hop for onion (types 8/9, R-ONION, R-ORET) and forwarding (types
10/11, R-FWD) packets: known answers from test-vectors.md §7-8, the relay's
length / family / auth / staleness rules, its rate limits and the cluster path
of a reply that arrives on another shard's UDP socket."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relaycore.onion import (
    KEY_REFRESH_INTERVAL,
    SENDBACK_TIMEOUT,
    Datagram,
    Dropped,
    OnionSecrets,
    ReturnPath,
    TokenBucket,
    forward_reply,
    forwarding,
    is_sendable,
    onion_recv_1,
    onion_send_1,
    pack_return_plain,
    pack_sendback,
    seal_return_block,
    timed_auth,
)
from relaycore.options import RelayOptions
from relaycore.packets import Forwarding, ForwardRequest, OnionResponse, decode_client_packet
from relaycore.relay import RelayServer
from relaycore.shardlink import Link, MapUpdate
from tests.relaycore.harness import Network, load_vectors

SECRETS = OnionSecrets(bytes(range(100, 132)))
NODE2 = bytes.fromhex("027f000001000000000000000000000000a9ce")  # 127.0.0.1:43470
# The next hops here are on loopback: opt in, as a LAN-only relay would.
LOOPBACK_HOPS = RelayOptions(allow_private_next_hops=True)


def onion_plain(length: int, address: bytes = NODE2) -> bytes:
    """A type 8 plaintext of ``length`` bytes to ``address`` (contents opaque)."""
    head = b"\x08" + bytes(range(0x50, 0x68)) + address
    return head + bytes(i % 251 for i in range(length - len(head)))


def reply_to(datagram: Datagram, response: bytes) -> bytes:
    """What node 2 sends back: 0x8e, the return block (last 59 bytes), the response."""
    return b"\x8e" + datagram.data[-59:] + response


@pytest.fixture
def net() -> Network:
    return Network(LOOPBACK_HOPS, onion_secrets=SECRETS, now=1000.0)


# ----------------------------------------------------------------------
# Known answers (test-vectors.md §7, §8)
# ----------------------------------------------------------------------


def test_onion_vector_return_block_and_send_1() -> None:
    """§7: R in the v0.2.18 layout (con_id 3, identifier 7), the sealed block and
    the 369-byte 0x81 datagram to node 2, byte for byte."""
    onion = load_vectors()["onion"]
    path = ReturnPath(onion["tcp_client_con_id"], onion["tcp_client_identifier"])
    assert pack_return_plain(path).hex() == onion["return_plain_v0218_le"]
    key = bytes.fromhex(onion["relay_symmetric_key"])
    block = seal_return_block(key, bytes.fromhex(onion["return_nonce"]), path)
    assert block.hex() == onion["return_block"]
    plain = bytes.fromhex(onion["tcp_type8_plain"])
    datagram = onion_send_1(plain[1:], block)
    assert (datagram.host, datagram.port) == ("127.0.0.1", 43470)
    assert datagram.data.hex() == onion["udp_0x81_to_node2"]
    assert len(datagram.data) == onion["udp_0x81_len"] == 369


def test_onion_vector_recv_1_to_type_9() -> None:
    """§7: the 0x8e reply opens to the same connection and becomes type 9."""
    onion = load_vectors()["onion"]
    key = bytes.fromhex(onion["relay_symmetric_key"])
    reply = onion_recv_1(bytes.fromhex(onion["udp_0x8e_from_node2"]), [key])
    assert reply.path == ReturnPath(3, 7)
    assert reply.plain.hex() == onion["tcp_type9_plain"]


def test_forwarding_vector_auth_0x91_and_reply() -> None:
    """§8: sendback, timed auth over bucket 472222, the 0x91 datagram, and the
    0x92 reply to type 11."""
    vector = load_vectors()["forwarding"]
    key = bytes.fromhex(vector["hmac_key"])
    now = float(vector["mono_time_seconds"])
    path = ReturnPath(vector["tcp_client_con_id"], vector["tcp_client_identifier"])
    assert pack_sendback(path).hex() == vector["sendback_data"]
    assert int(now // SENDBACK_TIMEOUT) == vector["time_bucket"]
    auth = timed_auth(key, vector["time_bucket"], pack_sendback(path))
    assert auth.hex() == vector["timed_auth"]
    request = decode_client_packet(bytes.fromhex(vector["tcp_type10_plain"]))
    assert isinstance(request, ForwardRequest) and request.data == b"forward me"
    datagram = forwarding(request.address, request.data, key, path, now)
    assert (datagram.host, datagram.port) == ("127.0.0.1", 43473)
    assert datagram.data.hex() == vector["udp_0x91_to_dest"]
    reply = forward_reply(bytes.fromhex(vector["udp_0x92_from_dest"]), key, now)
    assert reply == (path, bytes.fromhex(vector["tcp_type11_plain"]))


# ----------------------------------------------------------------------
# Type 8 -> 0x81 through the relay (R-ONION-1..7)
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "sent"), [(160, 0), (178, 0), (179, 1), (1360, 1), (1361, 0), (2032, 0)]
)
def test_r_onion_3_lengths_drop_silently(net: Network, length: int, sent: int) -> None:
    """R-ONION-2/3 [obs]: 179..1360 go out; shorter or longer are dropped, no kill."""
    a = net.connect("a")
    net.send_plain("a", onion_plain(length))
    datagrams = net.server.take_datagrams()
    assert len(datagrams) == sent
    assert not a.closed and a.received == []
    if sent:
        assert len(datagrams[0].data) == length - 25 + 65  # len(P) + 65 (R-ONION-5)
    else:
        assert net.server.stats["dropped.onion_bad_length"] == 1


@pytest.mark.parametrize("family", [0, 11, 130, 138])
def test_r_onion_4_family_other_than_2_or_10_dropped(net: Network, family: int) -> None:
    a = net.connect("a")
    net.send_plain("a", onion_plain(300, bytes((family,)) + NODE2[1:]))
    assert net.server.take_datagrams() == []
    assert net.server.stats["dropped.onion_bad_family"] == 1 and not a.closed


def test_r_onion_4_ipv6_next_hop(net: Network) -> None:
    address = b"\x0a" + bytes(15) + b"\x01" + b"\x82\x35"  # [::1]:33333
    net.connect("a")
    net.send_plain("a", onion_plain(300, address))
    [datagram] = net.server.take_datagrams()
    assert (datagram.host, datagram.port) == ("::1", 33333)


@pytest.mark.parametrize(
    "address",
    [
        b"\x02\x7f\x00\x00\x01" + bytes(12) + b"\x00\x00",  # port 0
        b"\x02\xff\xff\xff\xff" + bytes(12) + b"\x82\x35",  # broadcast
        b"\x02\xe0\x00\x00\x01" + bytes(12) + b"\x82\x35",  # multicast
        b"\x02\x00\x00\x00\x00" + bytes(12) + b"\x82\x35",  # unspecified
        b"\x0a\xff\x02" + bytes(13) + b"\x01" + b"\x82\x35",  # IPv6 multicast
    ],
    ids=["port-0", "broadcast", "multicast", "any", "v6-multicast"],
)
def test_no_datagram_to_more_than_one_host_or_none(net: Network, address: bytes) -> None:
    """Documented difference: the reference would send; we refuse reflectors."""
    net.connect("a")
    net.send_plain("a", onion_plain(300, address))
    assert net.server.take_datagrams() == []
    assert net.server.stats["dropped.onion_bad_address"] == 1


def test_r_onion_6_fresh_nonce_per_packet_and_only_the_named_address(net: Network) -> None:
    net.connect("a")
    net.send_plain("a", onion_plain(300), onion_plain(300))
    first, second = net.server.take_datagrams()
    assert (first.host, first.port) == (second.host, second.port) == ("127.0.0.1", 43470)
    assert first.data[:-59] == second.data[:-59]  # everything but the return block
    assert first.data[-59:-35] != second.data[-59:-35]  # Nr differs (R-ONION-6)


# ----------------------------------------------------------------------
# 0x8e -> type 9 (R-ORET-1..6)
# ----------------------------------------------------------------------


def test_r_oret_round_trip_reaches_the_asking_connection_only(net: Network) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    net.receive_datagram(reply_to(datagram, b"\x84" + bytes(range(40))))
    assert a.take() == [OnionResponse(b"\x84" + bytes(range(40)))]  # R-ORET-6
    assert b.received == []
    net.receive_datagram(reply_to(datagram, b"\x86hello"))  # replayable until Ks rotates
    assert a.take() == [OnionResponse(b"\x86hello")]


@pytest.mark.parametrize("compat", ["0.2.18", "0.2.23"])
@pytest.mark.parametrize("response_id", [0x83, 0x85, 0x87, 0x00, 0x8E, 0xFF])
def test_r_oret_2_other_ids_dropped(compat: str, response_id: int) -> None:
    net = Network(
        RelayOptions(compat=compat, allow_private_next_hops=True), onion_secrets=SECRETS, now=1000.0
    )
    a = net.connect("a")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    net.receive_datagram(reply_to(datagram, bytes((response_id,)) + b"x" * 10))
    assert a.received == []
    assert net.server.stats["dropped.onion_reply_bad_type"] == 1


def test_r_oret_2_compat_0_2_18_drops_group_announce_responses() -> None:
    """Debian's 0.2.18 daemon delivers only 0x84/0x86 [obs: 0x88 dropped]."""
    net = Network(
        RelayOptions(compat="0.2.18", allow_private_next_hops=True),
        onion_secrets=SECRETS,
        now=1000.0,
    )
    a = net.connect("a")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    net.receive_datagram(reply_to(datagram, b"\x88" + b"x" * 10))
    assert a.received == []
    assert net.server.stats["dropped.onion_reply_bad_type"] == 1
    net.receive_datagram(reply_to(datagram, b"\x84" + b"y" * 10))
    assert a.take() == [OnionResponse(b"\x84" + b"y" * 10)]


@pytest.mark.parametrize("response_id", [0x84, 0x86, 0x88])
def test_r_oret_2a_default_delivers_group_announce_responses(
    net: Network, response_id: int
) -> None:
    """c-toxcore >= 0.2.19 (onion.c handle_recv_1) also passes 0x88: the group
    announce response without which a TCP-only client cannot join a public group."""
    a = net.connect("a")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    response = bytes((response_id,)) + bytes(range(200))
    net.receive_datagram(reply_to(datagram, response))
    assert a.take() == [OnionResponse(response)]
    stats = net.server.stats
    assert stats["dropped.onion_reply_bad_type"] == 0
    assert stats["onion.replies_delivered"] == 1
    assert stats[f"onion.replies_delivered_{response_id:#04x}"] == 1


def test_compat_must_name_a_known_reference() -> None:
    with pytest.raises(ValueError, match="compat"):
        RelayOptions(compat="0.2.20")


@pytest.mark.parametrize("total", [1, 60, 1401])
def test_r_oret_1_lengths(net: Network, total: int) -> None:
    a = net.connect("a")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    data = reply_to(datagram, b"\x84" + bytes(2000))[:total]
    net.receive_datagram(data)
    assert a.received == [] and net.server.stats["dropped.onion_reply_bad_length"] == 1


def test_r_oret_3_tampered_block_dropped(net: Network) -> None:
    a = net.connect("a")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    data = bytearray(reply_to(datagram, b"\x84abc"))
    data[40] ^= 1
    net.receive_datagram(bytes(data))
    assert a.received == [] and net.server.stats["dropped.onion_bad_return"] == 1


def test_reply_for_a_reconnected_client_never_reaches_the_new_connection(net: Network) -> None:
    """Done-when of the onion issue: a return path names a connection instance;
    the same key connected again (R-CONF-3) gets nothing meant for the old one."""
    net.connect("a")
    net.send_plain("a", onion_plain(300))
    net.send_plain("a", b"\x0a\x02\x7f\x00\x00\x01\xa9\xd1hi")
    onion_out, forward_out = net.server.take_datagrams()
    old = net["a"]
    again = net.connect("a")
    assert old.closed and again is not old
    net.receive_datagram(reply_to(onion_out, b"\x84late"))
    sendback = forward_out.data[2:47]
    net.receive_datagram(b"\x92\x2d" + sendback + b"late")
    assert again.received == []
    assert net.server.stats["dropped.reply_stale"] == 2


def test_r_onion_8_key_rotation_keeps_one_previous_period(net: Network) -> None:
    a = net.connect("a")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    net.now += KEY_REFRESH_INTERVAL  # next period: the previous key still opens
    net.receive_datagram(reply_to(datagram, b"\x84one"))
    assert a.take() == [OnionResponse(b"\x84one")]
    net.now += KEY_REFRESH_INTERVAL  # two periods on: expired
    net.receive_datagram(reply_to(datagram, b"\x84two"))
    assert a.received == [] and net.server.stats["dropped.onion_bad_return"] == 1


def test_other_udp_packets_are_ignored(net: Network) -> None:
    for data in (b"", b"\x00" + bytes(60), b"\x80" + bytes(100), b"\x02hello"):
        net.receive_datagram(data)
    assert net.server.stats["udp.ignored"] == 4
    assert net.server.take_datagrams() == []


def test_onion_reply_is_non_priority(net: Network) -> None:
    """R-ORET-5: dropped while the client's output is backed up (R-OUT-2)."""
    a = net.connect("a")
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    a.connection.transport_backlog = net.server.options.output_soft_limit + 1
    net.receive_datagram(reply_to(datagram, b"\x84x"))
    assert a.received == [] and net.server.stats["dropped.backpressure"] == 1


# ----------------------------------------------------------------------
# Type 10 -> 0x91, 0x92 -> type 11 (R-FWD)
# ----------------------------------------------------------------------


def forward_out(net: Network, name: str, data: bytes = b"payload") -> Datagram:
    net.send_plain(name, b"\x0a\x02\x7f\x00\x00\x01\xa9\xd1" + data)
    [datagram] = net.server.take_datagrams()
    return datagram


def test_r_fwd_4_datagram_layout(net: Network) -> None:
    net.connect("a")
    datagram = forward_out(net, "a", b"")
    assert (datagram.host, datagram.port) == ("127.0.0.1", 43473)
    assert datagram.data[:2] == b"\x91\x2d" and len(datagram.data) == 47  # empty data [obs]
    assert datagram.data[34] == 2  # SENDBACK_TCP (R-FWD-2)


@pytest.mark.parametrize("data", [b"", b"reply", bytes(2001)])
def test_r_fwd_5_reply_delivered_as_type_11(net: Network, data: bytes) -> None:
    a = net.connect("a")
    sendback = forward_out(net, "a").data[2:47]
    net.receive_datagram(b"\x92\x2d" + sendback + data)
    assert a.take() == [Forwarding(data)]


def test_r_fwd_5_auth_valid_for_this_and_the_previous_bucket(net: Network) -> None:
    a = net.connect("a")
    sendback = forward_out(net, "a").data[2:47]
    net.now += SENDBACK_TIMEOUT
    net.receive_datagram(b"\x92\x2d" + sendback + b"one")
    assert a.take() == [Forwarding(b"one")]
    net.now += SENDBACK_TIMEOUT
    net.receive_datagram(b"\x92\x2d" + sendback + b"two")
    assert a.received == [] and net.server.stats["dropped.forward_reply_bad_auth"] == 1


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda d: d[:33], "forward_reply_bad_length"),
        (lambda d: d[:1] + b"\x20" + d[2:], "forward_reply_bad_length"),  # n = 32 < 33
        (lambda d: d[:1] + b"\xff" + d[2:], "forward_reply_bad_length"),  # n > 254
        (lambda d: d[:1] + b"\x2e" + d[2:], "forward_reply_bad_auth"),  # n = 46
        (lambda d: d[:10] + bytes((d[10] ^ 1,)) + d[11:], "forward_reply_bad_auth"),
    ],
    ids=["short", "n-32", "n-255", "n-46", "flipped-auth"],
)
def test_r_fwd_5_bad_replies_dropped(net: Network, mangle, reason: str) -> None:  # type: ignore[no-untyped-def]
    a = net.connect("a")
    sendback = forward_out(net, "a").data[2:47]
    net.receive_datagram(mangle(b"\x92\x2d" + sendback + b"data"))
    assert a.received == [] and net.server.stats[f"dropped.{reason}"] == 1


@pytest.mark.parametrize("length", [2002, 3000, 65000])
def test_r_fwd_6_over_long_reply_dropped_at_the_first_hop(net: Network, length: int) -> None:
    """Issue 10 finding 1: a 0x92 reply with a valid sendback and more data
    than a frame holds made encrypt raise (on the bus: in the peer bus reader,
    which then never read again). R-FWD-6: type 11 data <= 2001 bytes."""
    a = net.connect("a")
    sendback = forward_out(net, "a").data[2:47]
    net.receive_datagram(b"\x92\x2d" + sendback + bytes(length))
    assert a.received == [] and not a.closed
    assert net.server.stats["dropped.datagram_too_long"] == 1  # 47 + 2002 > 2048
    net.receive_datagram(b"\x92\x2d" + sendback + b"still served")
    assert a.take() == [Forwarding(b"still served")]


def test_r_fwd_6_over_long_reply_for_another_shard_never_reaches_the_bus() -> None:
    asking = Network(LOOPBACK_HOPS, onion_secrets=SECRETS, now=100.0, shard=1)
    asking.connect("a")
    asking.send_plain("a", b"\x0a\x02\x7f\x00\x00\x01\xa9\xd1x")
    [datagram] = asking.server.take_datagrams()
    other = _shard(2)
    other.receive_datagram(b"\x92\x2d" + datagram.data[2:47] + bytes(2002), 100.5)
    assert other.cluster.take_bus(100.5) == []
    assert other.stats["dropped.datagram_too_long"] == 1


def test_r_fwd_6_forward_reply_refuses_data_no_frame_can_carry() -> None:
    key = SECRETS.forward_key()
    sendback = pack_sendback(ReturnPath(1, 5))
    head = b"\x92\x2d" + timed_auth(key, 0, sendback) + sendback
    assert forward_reply(head + bytes(2001), key, 10.0).plain == b"\x0b" + bytes(2001)
    with pytest.raises(Dropped, match="forward_reply_too_long"):
        forward_reply(head + bytes(2002), key, 10.0)


def test_an_over_long_reply_from_the_bus_is_dropped_not_raised() -> None:
    """A REPLY message whose plaintext no frame can carry (an older worker, a
    bug elsewhere) is counted and dropped where it would be framed."""
    asking = Network(LOOPBACK_HOPS, onion_secrets=SECRETS, now=100.0, shard=1)
    a = asking.connect("a")
    epoch = asking.server.by_key[a.client.public_key].epoch
    asking.server.cluster.receive_link(2, (Link.REPLY, epoch, b"\x0b" + bytes(2100)), 100.6)
    asking.pump()
    assert a.received == [] and not a.closed
    assert asking.server.stats["dropped.reply_too_long"] == 1


def test_r_fwd_5_udp_and_chain_sendbacks_are_not_ours() -> None:
    key = SECRETS.forward_key()
    for first in (0, 1):
        sendback = bytes((first,)) + bytes(12)
        data = b"\x92\x2d" + timed_auth(key, 0, sendback) + sendback + b"x"
        with pytest.raises(Dropped, match="forward_reply_not_ours"):
            forward_reply(data, key, 10.0)


# ----------------------------------------------------------------------
# Rate limits and address policy
# ----------------------------------------------------------------------


def test_per_client_rate_limit_counts_drops_and_refills() -> None:
    options = RelayOptions(
        onion_rate_per_client=2.0, onion_burst_per_client=3.0, allow_private_next_hops=True
    )
    net = Network(options, onion_secrets=SECRETS, now=50.0)
    a = net.connect("a")
    net.connect("b")
    net.send_plain("a", *[onion_plain(300)] * 5)
    assert len(net.server.take_datagrams()) == 3
    assert net.server.stats["dropped.onion_rate_client"] == 2
    net.send_plain("b", onion_plain(300))  # another client is not held back
    assert len(net.server.take_datagrams()) == 1
    net.now += 1.0  # two more tokens
    net.send_plain("a", *[onion_plain(300)] * 3)
    assert len(net.server.take_datagrams()) == 2
    assert not a.closed


def test_per_worker_rate_limit() -> None:
    options = RelayOptions(onion_rate_per_worker=4.0, allow_private_next_hops=True)
    net = Network(options, onion_secrets=SECRETS, now=50.0)
    for name in "abc":
        net.connect(name)
        net.send_plain(name, onion_plain(300), onion_plain(300))
    assert len(net.server.take_datagrams()) == 4
    assert net.server.stats["dropped.onion_rate_worker"] == 2


def test_token_bucket_zero_rate_is_unlimited() -> None:
    bucket = TokenBucket(0.0, 0.0, 0.0)
    assert all(bucket.take(0.0) for _ in range(10000))


def test_is_sendable() -> None:
    assert is_sendable("127.0.0.1", 33445) and is_sendable("::1", 1)
    assert not is_sendable("127.0.0.1", 0)
    assert not is_sendable("255.255.255.255", 33445)
    assert not is_sendable("ff02::1", 33445)


def test_secrets_derive_distinct_keys_and_need_32_bytes() -> None:
    assert SECRETS.return_key(1) != SECRETS.return_key(2) != SECRETS.forward_key()
    assert OnionSecrets(SECRETS.master).return_key(-1) == SECRETS.return_key(-1)
    with pytest.raises(ValueError):
        OnionSecrets(bytes(31))


# ----------------------------------------------------------------------
# Cluster: the reply arrives on another shard's socket
# ----------------------------------------------------------------------


def _shard(shard: int) -> RelayServer:
    server = RelayServer(bytes(range(32)), shard=shard, onion_secrets=SECRETS)
    server.cluster.set_peer_shards([1, 2], 0.0)
    return server


def test_reply_for_another_shard_crosses_the_bus_and_is_delivered_there() -> None:
    asking = Network(LOOPBACK_HOPS, onion_secrets=SECRETS, now=100.0, shard=1)
    asking.server.cluster.set_peer_shards([2], 100.0)
    a = asking.connect("a")
    asking.send_plain("a", onion_plain(300))
    [datagram] = asking.server.take_datagrams()
    asking.server.cluster.take_bus(100.0)
    # The reply lands on shard 2's UDP socket.
    other = _shard(2)
    other.receive_datagram(reply_to(datagram, b"\x84crossed"), 100.5)
    [(destination, message)] = other.cluster.take_bus(100.5)
    assert destination == 1 and message[0] == Link.REPLY
    asking.server.cluster.receive_link(2, message, 100.6)
    asking.pump()
    assert a.take() == [OnionResponse(b"\x84crossed")]


def test_reply_for_a_shard_that_is_gone_is_dropped() -> None:
    asking = RelayServer(bytes(range(32)), shard=7, onion_secrets=SECRETS)
    block = seal_return_block(asking.first_hop.return_keys(5.0)[0], bytes(24), ReturnPath(7, 99))
    other = _shard(2)
    other.cluster.apply_map_update((MapUpdate.DROP_SHARD, 7, True), 5.0)  # shard 7 exited
    other.receive_datagram(b"\x8e" + block + b"\x84x", 5.0)
    assert other.cluster.take_bus(100.5) == []
    assert other.stats["dropped.reply_stale"] == 1


def test_reply_for_a_shard_not_yet_listed_still_crosses() -> None:
    """Just after start a shard may not know its peers yet (heartbeats every
    0.5 s); the reply goes to the shard the block names all the same."""
    asking = RelayServer(bytes(range(32)), shard=9, onion_secrets=SECRETS)
    block = seal_return_block(asking.first_hop.return_keys(5.0)[0], bytes(24), ReturnPath(9, 1))
    other = RelayServer(bytes(range(32)), shard=2, onion_secrets=SECRETS)
    other.receive_datagram(b"\x8e" + block + b"\x84x", 5.0)
    assert other.cluster.take_bus(100.5) == [(9, (Link.REPLY, 1, b"\x09\x84x"))]


# ----------------------------------------------------------------------
# Whatever arrives on the UDP port or in a type 8/10, nothing breaks
# ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=2100), first=st.sampled_from([0x8E, 0x92, 0x80, 0x02]))
def test_any_datagram_is_handled_or_counted_never_raises(data: bytes, first: int) -> None:
    net = Network(LOOPBACK_HOPS, onion_secrets=SECRETS, now=1000.0)
    a = net.connect("a")
    net.receive_datagram(bytes((first,)) + data)
    assert a.received == [] and not a.closed  # nothing opens without the key
    assert sum(v for k, v in net.server.stats.items() if k.startswith(("dropped.", "udp."))) == 1


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=159, max_size=2031), kind=st.sampled_from([8, 10]))
def test_any_request_is_sent_dropped_or_kills_by_the_spec(body: bytes, kind: int) -> None:
    net = Network(LOOPBACK_HOPS, onion_secrets=SECRETS, now=1000.0)
    a = net.connect("a")
    net.send_plain("a", bytes((kind,)) + body)
    datagrams = net.server.take_datagrams()
    if a.closed:
        assert a.close_reason == "R-PKT-10" and datagrams == []
    else:
        for datagram in datagrams:
            assert is_sendable(datagram.host, datagram.port)
            assert len(datagram.data) <= (1400 if kind == 8 else 2048)


def test_answers_follow_a_connection_whose_epoch_was_renewed() -> None:
    """After its own DROP_SHARD (dropped while alive) a shard renews its
    connections' epochs; return paths made afterwards still reach them."""
    net = Network(LOOPBACK_HOPS, onion_secrets=SECRETS, now=100.0, shard=1)
    a = net.connect("a")
    old_epoch = a.connection.epoch
    net.server.cluster.apply_map_update((MapUpdate.DROP_SHARD, 1, False), net.now)
    assert a.connection.epoch != old_epoch
    net.send_plain("a", onion_plain(300))
    [datagram] = net.server.take_datagrams()
    net.receive_datagram(reply_to(datagram, b"\x84renewed"))
    assert a.take() == [OnionResponse(b"\x84renewed")]
