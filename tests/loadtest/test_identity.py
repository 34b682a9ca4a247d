"""The generator's precomputed identities (cluster/loadtest/identity.py, issue 13 point 4)."""

from __future__ import annotations

import os

import pytest

import cluster.loadtest.identity as identity_module
from cluster.loadtest.identity import LoadCore, make_identity
from relaycore.client import ClientState
from relaycore.crypto import beforenm, generate_keypair, public_key_of
from relaycore.errors import HandshakeError
from relaycore.framing import SecureChannel
from relaycore.handshake import open_client_hello_keyed, seal_server_reply
from relaycore.packets import Ping, RoutedData, encode

SERVER_SK = bytes(range(0x40, 0x60))
SERVER_PK = public_key_of(SERVER_SK)


def _server_reply(hello: bytes) -> tuple[bytes, SecureChannel, bytes]:
    """What a relay answers (tcp-relay-protocol.md §4): reply, its channel, client pk."""
    client_pk, half, handshake_key = open_client_hello_keyed(hello, SERVER_SK)
    temp_pk, temp_sk = generate_keypair()
    base_nonce = os.urandom(24)
    reply = seal_server_reply(handshake_key, temp_pk, base_nonce, os.urandom(24))
    channel = SecureChannel(
        beforenm(half.temp_public_key, temp_sk),
        send_base_nonce=base_nonce,
        recv_base_nonce=half.base_nonce,
    )
    return reply, channel, client_pk


def test_load_core_handshakes_with_a_relay_and_frames_both_ways() -> None:
    identity = make_identity(os.urandom(32), SERVER_PK)
    core = LoadCore(identity, SERVER_PK)
    reply, server, client_pk = _server_reply(core.take_outbox())
    assert client_pk == identity.public_key  # R-HS-2: the hello names the client's key
    frame = server.encrypt(encode(RoutedData(16, b"hello")))
    assert core.receive(reply + frame[:5]) == []  # reply and part of a frame
    assert core.state is ClientState.CONNECTED
    assert core.receive(frame[5:] + server.encrypt(encode(Ping(b"\x01" * 8)))) == [
        RoutedData(16, b"hello"),
        Ping(b"\x01" * 8),
    ]
    assert list(server.receive(core.take_outbox())) == [b"\x05" + b"\x01" * 8]  # R-TIME-3
    core.send_plain(b"\x10abc")
    assert list(server.receive(core.take_outbox())) == [b"\x10abc"]


def test_reply_under_another_relay_key_is_refused() -> None:
    other_pk = public_key_of(os.urandom(32))
    core = LoadCore(make_identity(os.urandom(32), other_pk), other_pk)
    hello = core.take_outbox()
    with pytest.raises(HandshakeError):
        open_client_hello_keyed(hello, SERVER_SK)  # the relay cannot open it either
    reply, _, _ = _server_reply(LoadCore(make_identity(os.urandom(32), SERVER_PK), SERVER_PK)
                                .take_outbox())  # fmt: skip
    with pytest.raises(HandshakeError):
        core.receive(reply)


def test_two_x25519_operations_per_connection_once_the_identity_exists(monkeypatch) -> None:
    identity = make_identity(os.urandom(32), SERVER_PK)
    calls: list[str] = []
    for name in ("beforenm", "generate_keypair", "public_key_of"):
        real = getattr(identity_module, name)
        monkeypatch.setattr(
            identity_module,
            name,
            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a),
        )
    for _ in range(3):  # three connections of one identity (a handshake lane)
        core = LoadCore(identity, SERVER_PK)
        reply, _, _ = _server_reply(core.take_outbox())
        core.receive(reply)
        assert core.state is ClientState.CONNECTED
    # The relay does three per connection; a plain ClientConnection five.
    assert sorted(calls) == ["beforenm"] * 3 + ["generate_keypair"] * 3


def test_unusable_relay_key_fails_each_connection_not_the_identity() -> None:
    identity = make_identity(os.urandom(32), bytes(32))  # low-order point
    assert identity.handshake_key is None
    with pytest.raises(Exception, match="unusable"):
        LoadCore(identity, bytes(32))
