"""Encode and decode every packet type (tcp-relay-protocol.md §7, onion-over-tcp.md).

Encoders return plaintexts (the bytes inside one frame). Decoders check the
length rules and raise ProtocolViolation naming the rule, so the caller kills
the connection. ``decode_client_packet`` is what a server accepts from a
client; ``decode_server_packet`` is what a client accepts from a server.
"""

from collections.abc import Callable
from dataclasses import dataclass

from relaycore.constants import (
    CRYPTO_PUBLIC_KEY_SIZE,
    MAX_FORWARD_DATA_SIZE,
    NUM_RESERVED_PORTS,
    ONION_REQUEST_MIN_KILL,
    SERVER_PING_ID_SIZE,
    TCP_MAX_OOB_DATA_LENGTH,
    PacketId,
)
from relaycore.errors import ProtocolViolation

_PK = CRYPTO_PUBLIC_KEY_SIZE

# --------------------------------------------------------------------------
# Packet values
# --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RoutingRequest:
    public_key: bytes


@dataclass(frozen=True, slots=True)
class RoutingResponse:
    connection_id: int  # 0 = refused, else slot + 16
    public_key: bytes


@dataclass(frozen=True, slots=True)
class ConnectNotification:
    connection_id: int


@dataclass(frozen=True, slots=True)
class DisconnectNotification:
    connection_id: int


@dataclass(frozen=True, slots=True)
class Ping:
    ping_id: bytes  # 8 opaque bytes


@dataclass(frozen=True, slots=True)
class Pong:
    ping_id: bytes


@dataclass(frozen=True, slots=True)
class OobSend:
    destination: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class OobReceive:
    sender: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class OnionRequest:
    body: bytes  # everything after the id: nonce · ip_port · temp key · ciphertext


@dataclass(frozen=True, slots=True)
class OnionResponse:
    data: bytes


@dataclass(frozen=True, slots=True)
class ForwardRequest:
    address: bytes  # DHT packed form, 7 or 19 bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class Forwarding:
    data: bytes


@dataclass(frozen=True, slots=True)
class RoutedData:
    connection_id: int  # 16..255
    payload: bytes


Packet = (
    RoutingRequest
    | RoutingResponse
    | ConnectNotification
    | DisconnectNotification
    | Ping
    | Pong
    | OobSend
    | OobReceive
    | OnionRequest
    | OnionResponse
    | ForwardRequest
    | Forwarding
    | RoutedData
)

# --------------------------------------------------------------------------
# Encoders (plaintexts)
# --------------------------------------------------------------------------


def encode(packet: Packet) -> bytes:
    """Plaintext of any packet value."""
    match packet:
        case RoutingRequest(public_key):
            return b"\x00" + public_key
        case RoutingResponse(connection_id, public_key):
            return bytes((PacketId.ROUTING_RESPONSE, connection_id)) + public_key
        case ConnectNotification(connection_id):
            return bytes((PacketId.CONNECTION_NOTIFICATION, connection_id))
        case DisconnectNotification(connection_id):
            return bytes((PacketId.DISCONNECT_NOTIFICATION, connection_id))
        case Ping(ping_id):
            return b"\x04" + ping_id
        case Pong(ping_id):
            return b"\x05" + ping_id
        case OobSend(destination, data):
            return b"\x06" + destination + data
        case OobReceive(sender, data):
            return b"\x07" + sender + data
        case OnionRequest(body):
            return b"\x08" + body
        case OnionResponse(data):
            return b"\x09" + data
        case ForwardRequest(address, data):
            return b"\x0a" + address + data
        case Forwarding(data):
            return b"\x0b" + data
        case RoutedData(connection_id, payload):
            return bytes((connection_id,)) + payload
    raise TypeError(f"not a packet: {packet!r}")


# The server's packets as the relay sends them: plain functions of plain
# values (no packet object on the relay's paths). The one packet of the hot
# path, routed data, is the client's frame with its first byte rewritten
# (relay.py ``_handle_packet``).

_REFUSED = b"\x01\x00"  # a ROUTING_RESPONSE with connection id 0


def routing_response(slot: int | None, public_key: bytes) -> bytes:
    """ROUTING_RESPONSE for routing slot ``slot`` (None: refused, id 0)."""
    if slot is None:
        return _REFUSED + public_key
    return bytes((PacketId.ROUTING_RESPONSE, slot + NUM_RESERVED_PORTS)) + public_key


def connect_notification(slot: int) -> bytes:
    return bytes((PacketId.CONNECTION_NOTIFICATION, slot + NUM_RESERVED_PORTS))


def disconnect_notification(slot: int) -> bytes:
    return bytes((PacketId.DISCONNECT_NOTIFICATION, slot + NUM_RESERVED_PORTS))


def server_ping(ping_id: bytes) -> bytes:
    return b"\x04" + ping_id


def pong(ping_id: bytes) -> bytes:
    return b"\x05" + ping_id


def oob_receive(sender: bytes, data: bytes) -> bytes:
    return b"\x07" + sender + data


# --------------------------------------------------------------------------
# Decoders
# --------------------------------------------------------------------------


def _exact(plain: bytes, size: int, rule: str) -> None:
    if len(plain) != size:
        raise ProtocolViolation(rule, f"packet {plain[0]} has length {len(plain)}, not {size}")


def forward_address_length(family: int) -> int | None:
    """Length of a DHT packed address for the families type 10 accepts (R-FWD-1)."""
    if family == 2:
        return 7
    if family == 10:
        return 19
    return None


_PING_SIZE = 1 + SERVER_PING_ID_SIZE

# The packets of one exact length, per direction: id -> (length, the rule
# that kills when it differs, the value from the plaintext).
_FROM_CLIENT: dict[int, tuple[int, str, Callable[[bytes], Packet]]] = {
    PacketId.ROUTING_REQUEST: (1 + _PK, "R-ROUTE-1", lambda p: RoutingRequest(p[1:])),
    PacketId.CONNECTION_NOTIFICATION: (2, "R-NOTIF-1", lambda p: ConnectNotification(p[1])),
    PacketId.DISCONNECT_NOTIFICATION: (2, "R-DISC-1", lambda p: DisconnectNotification(p[1])),
    PacketId.PING: (_PING_SIZE, "R-PING-1", lambda p: Ping(p[1:])),
    PacketId.PONG: (_PING_SIZE, "R-PING-3", lambda p: Pong(p[1:])),
}
_FROM_SERVER: dict[int, tuple[int, str, Callable[[bytes], Packet]]] = {
    PacketId.ROUTING_RESPONSE: (2 + _PK, "R-ROUTE-5", lambda p: RoutingResponse(p[1], p[2:])),
    PacketId.CONNECTION_NOTIFICATION: (2, "R-ROUTE-6", lambda p: ConnectNotification(p[1])),
    PacketId.DISCONNECT_NOTIFICATION: (2, "R-DISC-3", lambda p: DisconnectNotification(p[1])),
    PacketId.PING: (_PING_SIZE, "R-PING-2", lambda p: Ping(p[1:])),
    PacketId.PONG: (_PING_SIZE, "R-PING-1", lambda p: Pong(p[1:])),
}


def _fixed_size(plain: bytes, size: int, rule: str, make: Callable[[bytes], Packet]) -> Packet:
    _exact(plain, size, rule)
    return make(plain)


def decode_client_packet(plain: bytes) -> Packet:
    """A plaintext a client sent to the server; kill rules of §8 as errors."""
    if not plain:
        raise ProtocolViolation("R-FRAME-4", "empty plaintext")
    packet_id = plain[0]
    if packet_id >= NUM_RESERVED_PORTS:
        return RoutedData(packet_id, plain[1:])  # R-DATA-1: any length
    fixed = _FROM_CLIENT.get(packet_id)
    if fixed is not None:
        return _fixed_size(plain, *fixed)
    if packet_id == PacketId.OOB_SEND:
        data_length = len(plain) - 1 - _PK
        if data_length <= 0 or data_length > TCP_MAX_OOB_DATA_LENGTH:
            raise ProtocolViolation("R-OOB-1", f"OOB data of {max(data_length, 0)} bytes")
        return OobSend(plain[1 : 1 + _PK], plain[1 + _PK :])
    if packet_id == PacketId.ONION_REQUEST:
        if len(plain) <= ONION_REQUEST_MIN_KILL:
            raise ProtocolViolation("R-PKT-8", f"onion request of {len(plain)} bytes <= 159")
        return OnionRequest(plain[1:])
    if packet_id == PacketId.FORWARD_REQUEST:
        address_length = forward_address_length(plain[1]) if len(plain) > 1 else None
        if address_length is None or len(plain) < 1 + address_length:
            raise ProtocolViolation("R-PKT-10", "forward request address does not parse")
        if len(plain) - 1 - address_length > MAX_FORWARD_DATA_SIZE:
            raise ProtocolViolation("R-PKT-10", "forward request data > 1792 bytes")
        return ForwardRequest(plain[1 : 1 + address_length], plain[1 + address_length :])
    if packet_id == PacketId.ONION_RESPONSE:
        raise ProtocolViolation("R-PKT-9", "onion response from a client")
    if packet_id == PacketId.FORWARDING:
        raise ProtocolViolation("R-PKT-11", "forwarding packet from a client")
    raise ProtocolViolation("R-RSV-1", f"packet id {packet_id} not allowed from a client")


def decode_server_packet(plain: bytes) -> Packet:
    """A plaintext the server sent to a client.

    Checks the lengths a toxcore client checks (tcp-relay-protocol.md §14)
    except that routed data of any length, including an empty payload, is
    reported rather than refused: callers decide what to do with it.
    """
    if not plain:
        raise ProtocolViolation("R-FRAME-4", "empty plaintext")
    packet_id = plain[0]
    if packet_id >= NUM_RESERVED_PORTS:
        return RoutedData(packet_id, plain[1:])
    fixed = _FROM_SERVER.get(packet_id)
    if fixed is not None:
        return _fixed_size(plain, *fixed)
    if packet_id == PacketId.OOB_RECV:
        if len(plain) <= 1 + _PK:
            raise ProtocolViolation("R-OOB-2", "OOB receive without data")
        return OobReceive(plain[1 : 1 + _PK], plain[1 + _PK :])
    if packet_id == PacketId.ONION_RESPONSE:
        return OnionResponse(plain[1:])
    if packet_id == PacketId.FORWARDING:
        return Forwarding(plain[1:])
    raise ProtocolViolation("R-RSV-1", f"packet id {packet_id} not sent by servers")
