"""Protocol constants with the names toxcore gives them (tcp-relay-protocol.md §1)."""

from enum import IntEnum

CRYPTO_PUBLIC_KEY_SIZE = 32
CRYPTO_NONCE_SIZE = 24
CRYPTO_MAC_SIZE = 16

TCP_HANDSHAKE_PLAIN_SIZE = CRYPTO_PUBLIC_KEY_SIZE + CRYPTO_NONCE_SIZE  # 56
TCP_SERVER_HANDSHAKE_SIZE = CRYPTO_NONCE_SIZE + TCP_HANDSHAKE_PLAIN_SIZE + CRYPTO_MAC_SIZE  # 96
TCP_CLIENT_HANDSHAKE_SIZE = CRYPTO_PUBLIC_KEY_SIZE + TCP_SERVER_HANDSHAKE_SIZE  # 128

MAX_PACKET_SIZE = 2048  # largest value of a frame's length field (ciphertext + MAC)
MAX_PLAINTEXT_SIZE = MAX_PACKET_SIZE - CRYPTO_MAC_SIZE  # 2032
TCP_MAX_OOB_DATA_LENGTH = 1024
NUM_RESERVED_PORTS = 16  # packet ids 0..15 are control packets
NUM_CLIENT_CONNECTIONS = 240  # routing slots per connection, ids 16..255

# Onion / forwarding length rules that the relay core checks (onion-over-tcp.md).
ONION_SEND_BASE = CRYPTO_PUBLIC_KEY_SIZE + 19 + CRYPTO_MAC_SIZE  # 67
ONION_REQUEST_MIN_KILL = 1 + CRYPTO_NONCE_SIZE + 2 * ONION_SEND_BASE  # 159: length <= this kills
MAX_FORWARD_DATA_SIZE = 1792

SERVER_PING_ID_SIZE = 8


class PacketId(IntEnum):
    """First plaintext byte of every frame (TCP_common.h TCP_PACKET_*)."""

    ROUTING_REQUEST = 0
    ROUTING_RESPONSE = 1
    CONNECTION_NOTIFICATION = 2
    DISCONNECT_NOTIFICATION = 3
    PING = 4
    PONG = 5
    OOB_SEND = 6
    OOB_RECV = 7
    ONION_REQUEST = 8
    ONION_RESPONSE = 9
    FORWARD_REQUEST = 10
    FORWARDING = 11
