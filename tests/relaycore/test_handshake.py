"""Handshake rules R-HS-1..7 (tcp-relay-protocol.md §4) through RelayServer."""

from __future__ import annotations

import pytest

from relaycore.client import ClientConnection, ClientState
from relaycore.crypto import beforenm, generate_keypair, nonce_bytes, public_key_of, seal
from relaycore.errors import HandshakeError
from relaycore.handshake import make_client_hello, make_server_reply, open_server_reply
from relaycore.packets import Ping, Pong, RoutingRequest, RoutingResponse
from relaycore.relay import ConnectionState
from tests.relaycore.harness import SERVER_SK, Network, secret_key_for

FIXED_TEMP = generate_keypair()


def _fixed_network() -> Network:
    """A relay whose temporary key and nonces repeat exactly in every instance."""
    return Network(keypair=lambda: FIXED_TEMP)


def _hello_and_frames(*packets: object) -> tuple[bytes, bytes, bytes, ClientConnection]:
    """(hello, frames, reply, client): what a client that already knew the reply
    would write in one go, computed against a throw-away relay with the same
    randomness; ``client`` has read that reply and decodes the next frames."""
    scout = _fixed_network()
    peer = scout.open("a")
    hello = peer.client.take_outbox()
    scout.server.receive(peer.connection, hello, 0.0)
    reply = b"".join(peer.connection.outbox)
    peer.client.receive(reply)
    for packet in packets:
        peer.client.send(packet)  # type: ignore[arg-type]
    return hello, peer.client.take_outbox(), reply, peer.client


def test_r_hs_1_hello_split_127_plus_1(net: Network) -> None:
    """R-HS-1: nothing happens before byte 128; then exactly one 96-byte reply."""
    peer = net.open("a")
    hello = peer.client.take_outbox()
    assert len(hello) == 128
    net.server.receive(peer.connection, hello[:127], 0.0)
    assert peer.connection.state is ConnectionState.INCOMING
    assert peer.connection.outbox == []
    net.server.receive(peer.connection, hello[127:], 0.0)
    assert peer.connection.state is ConnectionState.UNCONFIRMED
    assert [len(chunk) for chunk in peer.connection.outbox] == [96]


def test_r_hs_1_hello_byte_by_byte(net: Network) -> None:
    """R-HS-1: a hello in 128 one-byte pieces works like one piece."""
    peer = net.open("a")
    hello = peer.client.take_outbox()
    for index in range(127):
        net.server.receive(peer.connection, hello[index : index + 1], 0.0)
        assert peer.connection.outbox == []
    net.server.receive(peer.connection, hello[127:], 0.0)
    reply = b"".join(peer.connection.outbox)
    assert len(reply) == 96
    peer.connection.outbox.clear()
    assert peer.client.receive(reply) == []
    assert peer.client.state is ClientState.CONNECTED
    net.send("a", Ping(b"12345678"))
    assert peer.take() == [Pong(b"12345678")]


def test_r_hs_1_bytes_after_hello_are_frames() -> None:
    """R-HS-1 / R-ORDER-2: the server reads 128 bytes for the hello and parses
    the rest of the same chunk as frames, all answered at once."""
    a_key = public_key_of(secret_key_for("a"))
    hello, frames, reply, client = _hello_and_frames(RoutingRequest(a_key), Ping(b"pingpong"))
    net = _fixed_network()
    peer = net.open("a")
    peer.client.take_outbox()
    net.server.receive(peer.connection, hello + frames, 0.0)
    out = b"".join(peer.connection.outbox)
    assert out[:96] == reply
    assert peer.connection.state is ConnectionState.CONFIRMED
    assert client.receive(out[96:]) == [RoutingResponse(0, a_key), Pong(b"pingpong")]


def test_r_hs_1_hello_and_frames_byte_by_byte() -> None:
    hello, frames, reply, client = _hello_and_frames(Ping(b"pingpong"))
    net = _fixed_network()
    peer = net.open("a")
    peer.client.take_outbox()
    stream = hello + frames
    for index in range(len(stream)):
        net.server.receive(peer.connection, stream[index : index + 1], 0.0)
    out = b"".join(peer.connection.outbox)
    assert out[:96] == reply
    assert client.receive(out[96:]) == [Pong(b"pingpong")]


@pytest.mark.parametrize("position", [0, 31, 32, 55, 56, 100, 127])
def test_r_hs_2_bad_hello_killed_without_reply(net: Network, position: int) -> None:
    """R-HS-2: any flipped bit (key, nonce or box) -> kill, no reply."""
    peer = net.open("a")
    hello = bytearray(peer.client.take_outbox())
    hello[position] ^= 0x01
    net.send_raw("a", bytes(hello))
    assert peer.closed
    assert peer.close_reason == "R-HS-2"
    assert peer.connection.state is ConnectionState.CLOSED
    assert peer.received == []
    assert net.server.stats["handshakes"] == 0


def test_r_hs_2_hello_for_another_relay_key(net: Network) -> None:
    """R-HS-2: a hello boxed for a different server key is refused."""
    peer = net.open("a")
    peer.client.take_outbox()
    other_server_pk = public_key_of(bytes(range(32)))
    sk = secret_key_for("a")
    hello = make_client_hello(
        public_key_of(sk), sk, other_server_pk, FIXED_TEMP[0], bytes(24), bytes(24)
    )
    net.send_raw("a", hello)
    assert peer.closed and peer.received == []


def test_r_hs_2_low_order_client_key_kills_without_raising(net: Network) -> None:
    """R-HS-2: a hello whose key C is a low-order point (all zero) cannot be
    opened; the core kills the connection instead of raising."""
    peer = net.open("a")
    peer.client.take_outbox()
    other = net.connect("b")
    net.send_raw("a", bytes(128))
    assert peer.closed
    assert peer.close_reason == "R-HS-2"
    assert not other.closed


def test_r_hs_3_low_order_temporary_key_kills_without_raising(net: Network) -> None:
    """R-HS-3: the MAC is the only check on T_c, but an all-zero T_c yields no
    session key: the core kills (no reply) instead of raising."""
    peer = net.open("a")
    peer.client.take_outbox()
    sk = secret_key_for("a")
    hello = make_client_hello(
        public_key_of(sk), sk, net.server.public_key, bytes(32), bytes(24), bytes(24)
    )
    net.send_raw("a", hello)
    assert peer.closed
    assert peer.received == []
    assert net.server.stats["handshakes"] == 0


def test_r_hs_3_key_already_connected_is_accepted(net: Network) -> None:
    """R-HS-3: no check of C against connected keys at hello time."""
    first = net.connect("a")
    second = net.handshake("a2", secret_key_for("a"))
    assert second.connection.public_key == first.public_key
    assert second.connection.state is ConnectionState.UNCONFIRMED
    assert first.connection.state is ConnectionState.CONFIRMED


def test_r_hs_3_any_temporary_key_is_accepted(net: Network) -> None:
    """R-HS-3: T_c need not come from a key pair the server knows."""
    peer = net.open("a")
    peer.client.take_outbox()
    sk = secret_key_for("a")
    temp_pk = bytes(range(1, 33))
    hello = make_client_hello(
        public_key_of(sk), sk, net.server.public_key, temp_pk, bytes(24), bytes(24)
    )
    net.server.receive(peer.connection, hello, 0.0)
    assert peer.connection.state is ConnectionState.UNCONFIRMED


def test_r_hs_4_reply_is_96_bytes_for_the_clients_key(net: Network) -> None:
    """R-HS-4: one 96-byte reply, boxed to C with the handshake key."""
    peer = net.open("a")
    net.server.receive(peer.connection, peer.client.take_outbox(), 0.0)
    assert len(peer.connection.outbox) == 1
    reply = peer.connection.outbox[0]
    assert len(reply) == 96
    half = open_server_reply(reply, secret_key_for("a"), net.server.public_key)
    assert len(half.temp_public_key) == 32 and len(half.base_nonce) == 24
    with pytest.raises(HandshakeError):
        open_server_reply(reply, secret_key_for("b"), net.server.public_key)


def test_r_hs_5_r_hs_6_session_key_and_nonce_directions(net: Network) -> None:
    """R-HS-5/6: K = beforenm(T_c, t_s); recv_nonce = B_c (the client's own
    sending base), send_nonce = B_s."""
    sk = secret_key_for("a")
    client_temp_pk, client_temp_sk = generate_keypair()
    server_temp_pk, server_temp_sk = generate_keypair()
    network = Network(keypair=lambda: (server_temp_pk, server_temp_sk))
    peer = network.open("a")
    peer.client.take_outbox()
    client_base = bytes(range(24))
    hello = make_client_hello(
        public_key_of(sk), sk, network.server.public_key, client_temp_pk, client_base, bytes(24)
    )
    network.server.receive(peer.connection, hello, 0.0)
    half = open_server_reply(peer.connection.outbox[0], sk, network.server.public_key)
    assert half.temp_public_key == server_temp_pk
    channel = peer.connection.channel
    assert channel is not None
    assert channel.key == beforenm(client_temp_pk, server_temp_sk)
    assert channel.key == beforenm(server_temp_pk, client_temp_sk)
    assert nonce_bytes(channel.recv_nonce) == client_base
    assert nonce_bytes(channel.send_nonce) == half.base_nonce


def test_r_hs_5_client_and_server_agree(net: Network) -> None:
    peer = net.handshake("a")
    server_channel, client_channel = peer.connection.channel, peer.client.channel
    assert server_channel is not None and client_channel is not None
    assert server_channel.key == client_channel.key
    assert server_channel.recv_nonce == client_channel.send_nonce
    assert server_channel.send_nonce == client_channel.recv_nonce


def test_r_hs_7_frame_sealed_with_handshake_key_kills(net: Network) -> None:
    """R-HS-7: frames use the session key only; the long-term key k_hs is refused."""
    peer = net.handshake("a")
    channel = peer.client.channel
    assert channel is not None
    handshake_key = beforenm(net.server.public_key, secret_key_for("a"))
    boxed = seal(handshake_key, nonce_bytes(channel.send_nonce), b"\x04" + bytes(8))
    net.send_raw("a", len(boxed).to_bytes(2, "big") + boxed)
    assert peer.closed and peer.close_reason == "R-FRAME-4"
    assert peer.received == []


def test_client_refuses_reply_from_wrong_relay() -> None:
    """Client role of R-HS-2: a reply that does not open is a HandshakeError."""
    client = ClientConnection(secret_key_for("a"), public_key_of(SERVER_SK))
    reply = make_server_reply(
        bytes(range(32)), client.public_key, FIXED_TEMP[0], bytes(24), bytes(24)
    )
    with pytest.raises(HandshakeError):
        client.receive(reply)


def test_client_refuses_low_order_server_temporary_key() -> None:
    """Client role: a reply announcing an all-zero T_s raises HandshakeError
    (a ProtocolViolation), not a library error."""
    client = ClientConnection(secret_key_for("a"), public_key_of(SERVER_SK))
    reply = make_server_reply(SERVER_SK, client.public_key, bytes(32), bytes(24), bytes(24))
    with pytest.raises(HandshakeError):
        client.receive(reply)
