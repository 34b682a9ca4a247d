"""The two unframed handshake messages, both roles (tcp-relay-protocol.md §4).

Client hello (128 bytes): client_pk(32) · nonce(24) · box(temp_pk · base_nonce).
Server reply (96 bytes): nonce(24) · box(temp_pk · base_nonce).
Each side announces the base nonce of the frames *it* will send (R-HS-6).
"""

from dataclasses import dataclass

from relaycore.constants import (
    CRYPTO_NONCE_SIZE,
    CRYPTO_PUBLIC_KEY_SIZE,
    TCP_CLIENT_HANDSHAKE_SIZE,
    TCP_SERVER_HANDSHAKE_SIZE,
)
from relaycore.crypto import CryptoError, beforenm, open_box, seal
from relaycore.errors import HandshakeError

_PK = CRYPTO_PUBLIC_KEY_SIZE
_NONCE = CRYPTO_NONCE_SIZE


@dataclass(frozen=True, slots=True)
class HandshakeHalf:
    """What one side's handshake message tells the other side."""

    temp_public_key: bytes
    base_nonce: bytes


def make_client_hello(
    client_pk: bytes,
    client_sk: bytes,
    server_pk: bytes,
    temp_pk: bytes,
    base_nonce: bytes,
    hello_nonce: bytes,
) -> bytes:
    handshake_key = beforenm(server_pk, client_sk)
    return client_pk + hello_nonce + seal(handshake_key, hello_nonce, temp_pk + base_nonce)


def open_client_hello(hello: bytes, server_sk: bytes) -> tuple[bytes, HandshakeHalf]:
    """Server side: (client long-term pk, client's half). R-HS-2/R-HS-3."""
    client_pk, client_half, _ = open_client_hello_keyed(hello, server_sk)
    return client_pk, client_half


def open_client_hello_keyed(hello: bytes, server_sk: bytes) -> tuple[bytes, HandshakeHalf, bytes]:
    """``open_client_hello`` plus the handshake key it computed, so that the
    server's reply (``seal_server_reply``) does not compute the same X25519
    shared key a second time (one of three per handshake on the server)."""
    if len(hello) != TCP_CLIENT_HANDSHAKE_SIZE:
        raise HandshakeError("R-HS-1", f"hello is {len(hello)} bytes, not 128")
    client_pk = hello[:_PK]
    try:  # beforenm fails (CryptoError) for a low-order C such as all zeros
        handshake_key = beforenm(client_pk, server_sk)
        plain = open_box(handshake_key, hello[_PK : _PK + _NONCE], hello[_PK + _NONCE :])
    except CryptoError:
        raise HandshakeError("R-HS-2", "client hello does not open") from None
    return client_pk, HandshakeHalf(plain[:_PK], plain[_PK:]), handshake_key


def make_server_reply(
    server_sk: bytes, client_pk: bytes, temp_pk: bytes, base_nonce: bytes, reply_nonce: bytes
) -> bytes:
    return seal_server_reply(beforenm(client_pk, server_sk), temp_pk, base_nonce, reply_nonce)


def seal_server_reply(
    handshake_key: bytes, temp_pk: bytes, base_nonce: bytes, reply_nonce: bytes
) -> bytes:
    """The server reply, given the handshake key beforenm(client_pk, server_sk)."""
    return reply_nonce + seal(handshake_key, reply_nonce, temp_pk + base_nonce)


def open_server_reply(reply: bytes, client_sk: bytes, server_pk: bytes) -> HandshakeHalf:
    """Client side: the server's half, or HandshakeError (wrong server key)."""
    if len(reply) != TCP_SERVER_HANDSHAKE_SIZE:
        raise HandshakeError("R-HS-4", f"reply is {len(reply)} bytes, not 96")
    try:
        handshake_key = beforenm(server_pk, client_sk)
        plain = open_box(handshake_key, reply[:_NONCE], reply[_NONCE:])
    except CryptoError:
        raise HandshakeError("R-HS-2", "server reply does not open (wrong relay key?)") from None
    return HandshakeHalf(plain[:_PK], plain[_PK:])
