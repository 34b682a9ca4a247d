"""Client role of the protocol, sans-IO (TCP_client.c behaviour).

``ClientConnection`` makes the hello, opens the server's reply, frames
outgoing packets and decodes incoming ones. It answers server PINGs by
itself (R-TIME-3) by putting a PONG into ``outbox``. The asyncio client
library (``cluster.client``) and the load tester are thin adapters over it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum

from relaycore.constants import (
    CRYPTO_NONCE_SIZE,
    TCP_SERVER_HANDSHAKE_SIZE,
)
from relaycore.crypto import CryptoError, beforenm, generate_keypair, public_key_of
from relaycore.errors import HandshakeError, ProtocolViolation
from relaycore.framing import SecureChannel
from relaycore.handshake import make_client_hello, open_server_reply
from relaycore.packets import Packet, Ping, Pong, decode_server_packet, encode


class ClientState(Enum):
    HANDSHAKING = "handshaking"  # hello sent, waiting for the 96-byte reply
    CONNECTED = "connected"  # session keys known; frames flow
    CLOSED = "closed"


class ClientConnection:
    """One client's session with one relay."""

    def __init__(
        self,
        secret_key: bytes,
        server_public_key: bytes,
        *,
        answer_pings: bool = True,
        random_bytes: Callable[[int], bytes] = os.urandom,
        keypair: Callable[[], tuple[bytes, bytes]] = generate_keypair,
    ) -> None:
        self.secret_key = secret_key
        self.public_key = public_key_of(secret_key)
        self.server_public_key = server_public_key
        self.answer_pings = answer_pings
        self.state = ClientState.HANDSHAKING
        self.channel: SecureChannel | None = None
        self.outbox = bytearray()  # bytes to write to the socket
        self._reply = bytearray()
        self._temp_pk, self._temp_sk = keypair()
        self._base_nonce = random_bytes(CRYPTO_NONCE_SIZE)
        self.outbox += make_client_hello(
            self.public_key,
            secret_key,
            server_public_key,
            self._temp_pk,
            self._base_nonce,
            random_bytes(CRYPTO_NONCE_SIZE),
        )

    def take_outbox(self) -> bytes:
        data = bytes(self.outbox)
        self.outbox.clear()
        return data

    def receive(self, data: bytes) -> list[Packet]:
        """Feed bytes from the server; returns the packets they completed.

        Raises ProtocolViolation (HandshakeError for a bad reply) when the
        server sent something no relay may send; the caller closes.
        """
        if self.state is ClientState.HANDSHAKING:
            self._reply += data
            if len(self._reply) < TCP_SERVER_HANDSHAKE_SIZE:
                return []
            reply = bytes(self._reply[:TCP_SERVER_HANDSHAKE_SIZE])
            data = bytes(self._reply[TCP_SERVER_HANDSHAKE_SIZE:])
            self._reply.clear()
            server_half = open_server_reply(reply, self.secret_key, self.server_public_key)
            try:  # beforenm fails for a low-order T_s such as all zeros
                session_key = beforenm(server_half.temp_public_key, self._temp_sk)
            except CryptoError:
                raise HandshakeError("R-HS-5", "server temporary key unusable") from None
            self.channel = SecureChannel(
                session_key,
                send_base_nonce=self._base_nonce,
                recv_base_nonce=server_half.base_nonce,
            )
            self.state = ClientState.CONNECTED
            if not data:
                return []
        if self.channel is None:
            return []
        packets = []
        for plain in self.channel.receive(data):
            packet = decode_server_packet(plain)
            if self.answer_pings and isinstance(packet, Ping):
                self.outbox += self.channel.encrypt(encode(Pong(packet.ping_id)))
            packets.append(packet)
        return packets

    def send(self, packet: Packet) -> None:
        self.send_plain(encode(packet))

    def send_plain(self, plain: bytes) -> None:
        """Frame any plaintext (tests use this to send what no client should)."""
        if self.channel is None:
            raise ProtocolViolation("R-HS-5", "no session yet: the handshake is not done")
        self.outbox += self.channel.encrypt(plain)
