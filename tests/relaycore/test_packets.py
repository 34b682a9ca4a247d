"""OOB R-OOB-1..3, routed data R-DATA-1..4, reserved ids R-RSV-1 and the onion /
forwarding length checks R-PKT-8..11 (onion-over-tcp.md R-ONION-1, R-FWD-1)."""

from __future__ import annotations

import hashlib

import pytest

from relaycore.constants import MAX_PLAINTEXT_SIZE
from relaycore.errors import ProtocolViolation
from relaycore.packets import (
    ForwardRequest,
    OnionRequest,
    OobReceive,
    OobSend,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
    decode_client_packet,
)
from tests.relaycore.harness import Network, load_vectors

OFFLINE = hashlib.sha256(b"nobody").digest()


def _quiet(net: Network, *names: str) -> None:
    for name in names:
        assert net[name].received == [], name
        assert not net[name].closed, name


# ----------------------------------------------------------------------
# R-OOB
# ----------------------------------------------------------------------


@pytest.mark.parametrize("data_length", [0, 1025, MAX_PLAINTEXT_SIZE - 33])
def test_r_oob_1_bad_data_length_kills(net: Network, data_length: int) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.send_plain("a", b"\x06" + b.public_key + b"d" * data_length)
    assert a.closed and a.close_reason == "R-OOB-1"
    assert b.received == []


@pytest.mark.parametrize("plain_length", [1, 2, 32])
def test_r_oob_1_truncated_key_kills(net: Network, plain_length: int) -> None:
    a = net.connect("a")
    net.send_plain("a", b"\x06" + bytes(plain_length - 1))
    assert a.closed and a.close_reason == "R-OOB-1"


@pytest.mark.parametrize("data_length", [1, 1024])
def test_r_oob_1_and_2_data_1_to_1024_delivered(net: Network, data_length: int) -> None:
    """R-OOB-2 [obs]: the destination gets 07 · sender key · data; no slot needed."""
    a = net.connect("a")
    b = net.connect("b")
    data = bytes(range(256)) * 4
    net.send("a", OobSend(b.public_key, data[:data_length]))
    assert b.take() == [OobReceive(a.public_key, data[:data_length])]
    _quiet(net, "a")
    assert a.connection.slots == [None] * 240 and b.connection.slots == [None] * 240


def test_r_oob_2_to_self(net: Network) -> None:
    a = net.connect("a")
    net.send("a", OobSend(a.public_key, b"me"))
    assert a.take() == [OobReceive(a.public_key, b"me")]


def test_r_oob_3_offline_destination_dropped_silently(net: Network) -> None:
    net.connect("a")
    net.send("a", OobSend(OFFLINE, b"anyone?"))
    _quiet(net, "a")
    assert net.server.stats["dropped.oob_offline"] == 1


def test_r_oob_3_closed_destination_dropped(net: Network) -> None:
    net.connect("a")
    b = net.connect("b")
    net.server.kill(b.connection, "test")
    net.send("a", OobSend(b.public_key, b"gone"))
    _quiet(net, "a")
    assert b.received == []


# ----------------------------------------------------------------------
# R-DATA
# ----------------------------------------------------------------------


@pytest.mark.parametrize("connection_id", [16, 100, 255])
def test_r_data_2_unused_slot_kills(net: Network, connection_id: int) -> None:
    a = net.connect("a")
    net.send("a", RoutedData(connection_id, b"x"))
    assert a.closed and a.close_reason == "R-DATA-2"
    assert a.received == []


def test_r_data_3_requested_slot_drops(net: Network) -> None:
    a = net.connect("a")
    b = net.connect("b")
    net.send("a", RoutingRequest(b.public_key))
    a.take()
    net.send("a", RoutedData(16, b"not linked"))
    _quiet(net, "a", "b")
    assert net.server.stats["dropped.not_linked"] == 1


@pytest.mark.parametrize("payload_length", [0, 1, 512, MAX_PLAINTEXT_SIZE - 1])
def test_r_data_1_and_4_linked_relays_with_id_rewrite(net: Network, payload_length: int) -> None:
    """R-DATA-1/4 [obs 1-byte and 2032-byte plaintexts]: identical bytes, id
    replaced by the peer's slot id."""
    a = net.connect("a")
    b = net.connect("b")
    net.send("b", RoutingRequest(OFFLINE))
    b.take()
    a_id, b_id = net.link("a", "b")
    assert (a_id, b_id) == (16, 17)
    payload = (bytes(range(256)) * 8)[:payload_length]
    net.send("a", RoutedData(a_id, payload))
    assert b.take() == [RoutedData(b_id, payload)]
    net.send("b", RoutedData(b_id, payload[::-1]))
    assert a.take() == [RoutedData(a_id, payload[::-1])]
    _quiet(net, "a", "b")


def test_r_data_4_order_is_kept(net: Network) -> None:
    net.connect("a")
    b = net.connect("b")
    a_id, b_id = net.link("a", "b")
    net.send("a", *(RoutedData(a_id, b"%d" % n) for n in range(50)))
    assert b.take() == [RoutedData(b_id, b"%d" % n) for n in range(50)]


# ----------------------------------------------------------------------
# R-RSV, R-PKT-9, R-PKT-11
# ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("packet_id", "rule"),
    [
        (1, "R-RSV-1"),
        (7, "R-RSV-1"),
        (9, "R-PKT-9"),
        (11, "R-PKT-11"),
        (12, "R-RSV-1"),
        (13, "R-RSV-1"),
        (14, "R-RSV-1"),
        (15, "R-RSV-1"),
    ],
)
@pytest.mark.parametrize("length", [1, 2, 34, 300])
def test_r_rsv_1_reserved_ids_kill(net: Network, packet_id: int, rule: str, length: int) -> None:
    """R-RSV-1, R-PKT-9, R-PKT-11 [obs all]: whatever the length."""
    a = net.connect("a")
    net.send_plain("a", bytes([packet_id]) + bytes(length - 1))
    assert a.closed and a.close_reason == rule
    assert a.received == []


def test_r_rsv_1_well_formed_responses_from_a_client_kill(net: Network) -> None:
    a = net.connect("a")
    net.send("a", RoutingResponse(16, OFFLINE))
    assert a.closed and a.close_reason == "R-RSV-1"
    b = net.connect("b")
    net.send("b", OobReceive(OFFLINE, b"x"))
    assert b.closed and b.close_reason == "R-RSV-1"


# ----------------------------------------------------------------------
# R-PKT-8 (onion request) and R-PKT-10 (forward request)
# ----------------------------------------------------------------------


@pytest.mark.parametrize("length", [1, 2, 100, 159])
def test_r_pkt_8_onion_request_up_to_159_kills(net: Network, length: int) -> None:
    """R-PKT-8 / R-ONION-1 [obs]: length <= 159 = 1 + 24 + 2*67 kills."""
    a = net.connect("a")
    net.send_plain("a", b"\x08" + bytes(length - 1))
    assert a.closed and a.close_reason == "R-PKT-8"


@pytest.mark.parametrize("length", [160, 178, 179, 1360, 1361, MAX_PLAINTEXT_SIZE])
def test_r_pkt_8_onion_request_from_160_never_kills(net: Network, length: int) -> None:
    """R-PKT-8 / R-ONION-2: never a reason to kill (here family 24, dropped by
    R-ONION-4; test_onion.py has what is forwarded)."""
    net.connect("a")
    net.connect("b")
    net.send_plain("a", (b"\x08" + bytes(range(256)) * 8)[:length])
    _quiet(net, "a", "b")
    assert net.server.stats["packets_in.onion_request"] == 1
    assert net.server.take_datagrams() == []


def test_r_pkt_8_vector_onion_request_accepted() -> None:
    """test-vectors.md §7: the 329-byte TCP type 8 plaintext decodes and is accepted."""
    vectors = load_vectors()
    plain = bytes.fromhex(vectors["onion"]["tcp_type8_plain"])
    assert len(plain) == vectors["onion"]["tcp_type8_len"] == 329
    assert decode_client_packet(plain) == OnionRequest(plain[1:])
    net = Network()
    net.connect("a")
    net.send_plain("a", plain)
    _quiet(net, "a")


@pytest.mark.parametrize(
    "plain",
    [
        b"\x0a",  # no address at all [obs]
        b"\x0a\x02",  # family only
        b"\x0a\x02\x7f\x00\x00\x01\xa9",  # IPv4 address one byte short
        b"\x0a\x0a" + bytes(17),  # IPv6 address one byte short
        b"\x0a\x0b" + bytes(18),  # family 11 (TCP client) not allowed
        b"\x0a\x82\x7f\x00\x00\x01\xa9\xd1",  # family 130 (TOX_TCP_INET) not allowed
        b"\x0a\x00" + bytes(30),  # family 0
    ],
    ids=["empty", "family-only", "ipv4-short", "ipv6-short", "family-11", "family-130", "f0"],
)
def test_r_pkt_10_bad_address_kills(net: Network, plain: bytes) -> None:
    """R-PKT-10 / R-FWD-1 [obs]: the address must parse as family 2 or 10."""
    a = net.connect("a")
    net.send_plain("a", plain)
    assert a.closed and a.close_reason == "R-PKT-10"


@pytest.mark.parametrize("family_address", [b"\x02\x7f\x00\x00\x01\xa9\xd1", b"\x0a" + bytes(18)])
def test_r_pkt_10_data_over_1792_kills(net: Network, family_address: bytes) -> None:
    a = net.connect("a")
    net.send_plain("a", b"\x0a" + family_address + bytes(1793))
    assert a.closed and a.close_reason == "R-PKT-10"


@pytest.mark.parametrize("family_address", [b"\x02\x7f\x00\x00\x01\xa9\xd1", b"\x0a" + bytes(18)])
@pytest.mark.parametrize("data_length", [0, 1, 1792])
def test_r_pkt_10_valid_forward_request_accepted(
    net: Network, family_address: bytes, data_length: int
) -> None:
    """R-FWD-1 [obs]: empty data and 1792 bytes are accepted (and forwarded)."""
    net.connect("a")
    net.send_plain("a", b"\x0a" + family_address + b"f" * data_length)
    _quiet(net, "a")
    assert net.server.stats["packets_in.forward_request"] == 1


def test_r_pkt_10_vector_forward_request_accepted(net: Network) -> None:
    """test-vectors.md §8: the type 10 plaintext to 127.0.0.1:43473."""
    forwarding = load_vectors()["forwarding"]
    plain = bytes.fromhex(forwarding["tcp_type10_plain"])
    packet = decode_client_packet(plain)
    assert packet == ForwardRequest(bytes.fromhex(forwarding["dest_ipport_packed"]), b"forward me")
    net.connect("a")
    net.send_plain("a", plain)
    _quiet(net, "a")


def test_decoder_kill_rules_name_their_rule() -> None:
    """The codec raises ProtocolViolation with the spec id the relay logs."""
    cases = {
        b"\x00": "R-ROUTE-1",
        b"\x02": "R-NOTIF-1",
        b"\x03\x10\x00": "R-DISC-1",
        b"\x04": "R-PING-1",
        b"\x05": "R-PING-3",
        b"\x06" + bytes(32): "R-OOB-1",
        b"\x08" + bytes(158): "R-PKT-8",
        b"\x09": "R-PKT-9",
        b"\x0a": "R-PKT-10",
        b"\x0b": "R-PKT-11",
        b"\x0c": "R-RSV-1",
    }
    for plain, rule in cases.items():
        with pytest.raises(ProtocolViolation) as caught:
            decode_client_packet(plain)
        assert caught.value.rule == rule, plain
