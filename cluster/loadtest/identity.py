"""Client identities with their X25519 work done once, and a client core that uses them.

A plain ``relaycore.client.ClientConnection`` does five X25519 operations per
connection: the long-term public key, the temporary key pair, the hello's
handshake key beforenm(S, c), the same key again to open the reply, and the
session key. The relay does three (its handshake key, reused for the reply; its
temporary key pair; the session key). A load generator that spends more than
the relay it drives cannot saturate it on equal cores, so the generator:

* computes an ``Identity`` -- public key and handshake key -- once per client
  key (``make_identity``), and the ``handshake`` mode reuses one identity per
  lane for that lane's consecutive connections, as a real client reconnects
  with its one long-term key (the relay's work per connection is unchanged:
  it cannot know the key was seen before);
* opens the server's reply with the handshake key it already has.

Left per connection: the temporary key pair and the session key (two X25519
operations), what the protocol needs for a fresh session.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from relaycore.client import ClientConnection, ClientState
from relaycore.constants import CRYPTO_NONCE_SIZE, CRYPTO_PUBLIC_KEY_SIZE, TCP_SERVER_HANDSHAKE_SIZE
from relaycore.crypto import CryptoError, beforenm, generate_keypair, open_box, public_key_of, seal
from relaycore.errors import HandshakeError
from relaycore.framing import SecureChannel
from relaycore.packets import Packet

_NONCE = CRYPTO_NONCE_SIZE
_PK = CRYPTO_PUBLIC_KEY_SIZE


@dataclass(frozen=True, slots=True)
class Identity:
    """A client's long-term key pair and its handshake key with one relay."""

    secret_key: bytes
    public_key: bytes
    # beforenm(relay public key, secret key), tcp-relay-protocol.md §4; None when the
    # relay key is unusable (a low-order point): every connection then fails, counted.
    handshake_key: bytes | None


def make_identity(secret_key: bytes, server_public_key: bytes) -> Identity:
    """Two X25519 operations, once per client key."""
    try:
        handshake_key: bytes | None = beforenm(server_public_key, secret_key)
    except (CryptoError, RuntimeError):  # libsodium refuses a low-order relay key
        handshake_key = None
    return Identity(secret_key, public_key_of(secret_key), handshake_key)


class LoadCore(ClientConnection):
    """``ClientConnection`` from a precomputed ``Identity`` (same bytes on the wire)."""

    def __init__(self, identity: Identity, server_public_key: bytes) -> None:
        # Not super().__init__: that would redo the identity's X25519 work.
        if identity.handshake_key is None:
            raise CryptoError("the relay public key is unusable (low-order point)")
        self.secret_key = identity.secret_key
        self.public_key = identity.public_key
        self.server_public_key = server_public_key
        self.answer_pings = True
        self.state = ClientState.HANDSHAKING
        self.channel: SecureChannel | None = None
        self._handshake_key = identity.handshake_key
        self._reply = bytearray()
        self._temp_pk, self._temp_sk = generate_keypair()
        self._base_nonce = os.urandom(_NONCE)
        hello_nonce = os.urandom(_NONCE)
        boxed = seal(identity.handshake_key, hello_nonce, self._temp_pk + self._base_nonce)
        self.outbox = bytearray(identity.public_key + hello_nonce + boxed)

    def receive(self, data: bytes) -> list[Packet]:
        if self.state is not ClientState.HANDSHAKING:
            return super().receive(data)
        self._reply += data
        if len(self._reply) < TCP_SERVER_HANDSHAKE_SIZE:
            return []
        reply = bytes(self._reply[:TCP_SERVER_HANDSHAKE_SIZE])
        rest = bytes(self._reply[TCP_SERVER_HANDSHAKE_SIZE:])
        self._reply.clear()
        try:  # the reply opens with the hello's handshake key (R-HS-4)
            plain = open_box(self._handshake_key, reply[:_NONCE], reply[_NONCE:])
        except CryptoError:
            raise HandshakeError("R-HS-2", "server reply does not open (wrong key?)") from None
        try:  # beforenm fails for a low-order temporary key such as all zeros
            session_key = beforenm(plain[:_PK], self._temp_sk)
        except CryptoError:
            raise HandshakeError("R-HS-5", "server temporary key unusable") from None
        self.channel = SecureChannel(
            session_key, send_base_nonce=self._base_nonce, recv_base_nonce=plain[_PK:]
        )
        self.state = ClientState.CONNECTED
        return super().receive(rest) if rest else []
