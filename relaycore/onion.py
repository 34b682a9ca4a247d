"""The relay's first-hop role for onion (types 8/9) and forwarding (types 10/11)
packets: address codecs, return blocks, timed auth and rate limits, all sans-IO
(onion-over-tcp.md). ``relaycore.relay`` decides *when*; this module says
*what bytes*.

A return path names one connection instance, never a reusable slot: the shard
that holds it and its cluster-unique epoch (R-ONION-9). In the v0.2.18 layouts
the shard takes the place of ``con_id`` and the epoch that of ``identifier``,
so a capture of ours has the same shape as one of tox-bootstrapd.

Every shard of a cluster derives the same keys from one master secret that the
supervisor makes at start and hands to its workers on a pipe (never written to
disk): a reply to a request that left through one worker may come back to any
worker's UDP socket. The return key rotates every ``KEY_REFRESH_INTERVAL``
seconds of the shared monotonic clock (R-ONION-8); a block made under the key
of the previous period still opens, so a reply in flight across a rotation is
not lost (docs/differences.md).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import struct
from dataclasses import dataclass
from typing import NamedTuple

from nacl.bindings import crypto_secretbox, crypto_secretbox_open
from nacl.exceptions import CryptoError

from relaycore.constants import CRYPTO_MAC_SIZE, CRYPTO_NONCE_SIZE, MAX_PACKET_SIZE

# onion-over-tcp.md §1
SIZE_IPPORT = 19
ONION_MAX_PACKET_SIZE = 1400
ONION_RETURN_1 = CRYPTO_NONCE_SIZE + SIZE_IPPORT + CRYPTO_MAC_SIZE  # 59
KEY_REFRESH_INTERVAL = 7200.0  # seconds (R-ONION-8)
SENDBACK_TIMEOUT = 3600.0  # seconds per timed-auth bucket (R-FWD-3)
MAX_SENDBACK_SIZE = 254
TIMED_AUTH_SIZE = 32

NET_PACKET_ONION_SEND_1 = 0x81
NET_PACKET_ONION_RECV_1 = 0x8E
NET_PACKET_FORWARDING = 0x91
NET_PACKET_FORWARD_REPLY = 0x92
ANNOUNCE_RESPONSE_OLD = 0x84
ONION_DATA_RESPONSE = 0x86
ANNOUNCE_RESPONSE = 0x88  # group announce response, c-toxcore >= 0.2.19

# Onion responses a first hop hands back to its TCP client, by the reference version
# followed (RelayOptions.compat): R-ORET-2 (0.2.18), R-ORET-2a (0.2.19 and later).
ONION_RESPONSE_TYPES = {
    "0.2.18": frozenset((ANNOUNCE_RESPONSE_OLD, ONION_DATA_RESPONSE)),
    "0.2.23": frozenset((ANNOUNCE_RESPONSE_OLD, ONION_DATA_RESPONSE, ANNOUNCE_RESPONSE)),
}

FAMILY_INET = 2
FAMILY_INET6 = 10
TCP_CLIENT_FAMILY = 11  # the family byte of a TCP client's return address (R-ONION-7)
SENDBACK_TCP = 2  # first byte of a TCP client's forwarding sendback (R-FWD-2)

# Type 8 body (after the id): nonce, node-2 address, node-2 temporary key and box.
_ONION_BODY_MIN = 19 + 2 * 67 + 1  # len(P) > 153 (R-ONION-3)
_ONION_BODY_MAX = ONION_MAX_PACKET_SIZE + SIZE_IPPORT - (1 + CRYPTO_NONCE_SIZE + ONION_RETURN_1)
_SENDBACK_TCP_SIZE = 13
_FORWARD_SENDBACK_SIZE = TIMED_AUTH_SIZE + _SENDBACK_TCP_SIZE  # 45 (R-FWD-7)
# R-FWD-6: type 11 data fits one frame: 2048 - 2 - 45 = 2001 bytes. A reply
# with more (any remote node can send one for a sendback it was given) would
# make a plaintext no frame can carry; it is dropped here, at the first hop.
MAX_FORWARD_REPLY_DATA = MAX_PACKET_SIZE - 2 - _FORWARD_SENDBACK_SIZE
# No valid onion or forwarding datagram is longer than a TCP frame may be.
MAX_DATAGRAM_SIZE = MAX_PACKET_SIZE


class ReturnPath(NamedTuple):
    """Which connection instance a UDP reply belongs to."""

    shard: int
    epoch: int


class Datagram(NamedTuple):
    """One UDP datagram for the adapter to send: host, port, bytes."""

    host: str
    port: int
    data: bytes


class Reply(NamedTuple):
    """A UDP reply decoded to the TCP packet (type 9 or 11) for one connection."""

    path: ReturnPath
    plain: bytes


class Dropped(Exception):
    """A packet the first hop drops silently; ``reason`` is its stats name."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ----------------------------------------------------------------------
# Addresses (onion-over-tcp.md §2)
# ----------------------------------------------------------------------


# Next hops repeat (a client's paths use a few node-2 addresses): the address
# work below is cached per address, bounded; a miss costs what it did uncached.
ADDRESS_CACHE = 4096


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def _host_of(family: int, raw: bytes) -> str:
    if family == FAMILY_INET:
        return str(ipaddress.IPv4Address(raw[:4]))
    return str(ipaddress.IPv6Address(raw[:16]))


def unpack_onion_address(field: bytes) -> tuple[str, int]:
    """Form A (19 bytes) with the family check of R-ONION-4."""
    family = field[0]
    if family not in (FAMILY_INET, FAMILY_INET6):
        raise Dropped("onion_bad_family")
    return _host_of(family, field[1:17]), int.from_bytes(field[17:19], "big")


def unpack_forward_address(field: bytes) -> tuple[str, int]:
    """Form B (7 or 19 bytes; ``relaycore.packets`` has checked the length)."""
    family = field[0]
    size = 4 if family == FAMILY_INET else 16
    return _host_of(family, field[1 : 1 + size]), int.from_bytes(field[1 + size : 3 + size], "big")


def is_sendable(host: str, port: int) -> bool:
    """Whether the relay should send a client's datagram there at all.

    The reference sends anywhere; we refuse port 0 and addresses that reach
    more than one host or none (broadcast, multicast, unspecified). Private
    and own addresses are refused on top of this by ``relaycore.nexthop``
    (docs/differences.md row 9 says exactly what is refused).
    """
    return port != 0 and _reaches_one_host(host)


@functools.lru_cache(maxsize=ADDRESS_CACHE)
def _reaches_one_host(host: str) -> bool:
    address = ipaddress.ip_address(host)
    if address.is_multicast or address.is_unspecified:
        return False
    return not (address.version == 4 and address == ipaddress.IPv4Address("255.255.255.255"))


# ----------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OnionSecrets:
    """The keys of every shard, derived from one 32-byte master secret."""

    master: bytes

    def __post_init__(self) -> None:
        if len(self.master) != 32:
            raise ValueError("the onion master secret must be 32 bytes")

    def return_key(self, period: int) -> bytes:
        """``Ks`` of one rotation period (R-ONION-6/8)."""
        return hashlib.blake2b(
            struct.pack(">q", period), key=self.master, person=b"tox-onion-ret", digest_size=32
        ).digest()

    def forward_key(self) -> bytes:
        """The forwarding HMAC key (R-FWD-3); never rotated, as in the reference."""
        return hashlib.blake2b(b"", key=self.master, person=b"tox-forward", digest_size=32).digest()


def return_period(now: float) -> int:
    return int(now // KEY_REFRESH_INTERVAL)


def auth_bucket(now: float) -> int:
    return int(now // SENDBACK_TIMEOUT)


# ----------------------------------------------------------------------
# Onion: type 8 -> UDP 0x81, UDP 0x8e -> type 9
# ----------------------------------------------------------------------


def pack_return_plain(path: ReturnPath) -> bytes:
    """``R`` in the v0.2.18 layout (R-ONION-7): family 11, con_id (our shard)
    and identifier (our epoch) little-endian, port 0."""
    return struct.pack("<BI4xQ2x", TCP_CLIENT_FAMILY, path.shard, path.epoch)


def unpack_return_plain(plain: bytes) -> ReturnPath:
    family, shard, epoch = struct.unpack("<BI4xQ2x", plain)
    if family != TCP_CLIENT_FAMILY:
        # 2/10 would be a UDP client's return address; we only make TCP ones.
        raise Dropped("onion_not_ours")
    return ReturnPath(shard, epoch)


def seal_return_block(key: bytes, nonce: bytes, path: ReturnPath) -> bytes:
    """``Nr || seal(Ks, Nr, R)``, 59 bytes (R-ONION-6)."""
    return nonce + crypto_secretbox(pack_return_plain(path), nonce, key)


def open_return_block(keys: list[bytes], block: bytes) -> ReturnPath:
    nonce, boxed = block[:CRYPTO_NONCE_SIZE], block[CRYPTO_NONCE_SIZE:ONION_RETURN_1]
    for key in keys:
        try:
            return unpack_return_plain(crypto_secretbox_open(boxed, nonce, key))
        except CryptoError:
            continue
    raise Dropped("onion_bad_return")  # R-ORET-3 (or made under an expired key)


def onion_send_1(body: bytes, return_block: bytes) -> Datagram:
    """The UDP datagram for a type 8 ``body`` (the plaintext after its id byte),
    R-ONION-3..5. Raises Dropped for what the reference drops silently."""
    nonce = body[:CRYPTO_NONCE_SIZE]
    onion = body[CRYPTO_NONCE_SIZE:]  # P: node-2 address, temp key, box
    if not _ONION_BODY_MIN <= len(onion) <= _ONION_BODY_MAX:
        raise Dropped("onion_bad_length")
    host, port = unpack_onion_address(onion[:SIZE_IPPORT])
    if not is_sendable(host, port):
        raise Dropped("onion_bad_address")
    data = bytes((NET_PACKET_ONION_SEND_1,)) + nonce + onion[SIZE_IPPORT:] + return_block
    return Datagram(host, port, data)


def onion_recv_1(
    datagram: bytes,
    keys: list[bytes],
    response_types: frozenset[int] = ONION_RESPONSE_TYPES["0.2.23"],
) -> Reply:
    """A UDP 0x8e reply to the TCP packet ``09 || response`` (R-ORET-1..6); the
    response's id must be one of ``response_types`` (R-ORET-2 / R-ORET-2a)."""
    if not 1 + ONION_RETURN_1 < len(datagram) <= ONION_MAX_PACKET_SIZE:
        raise Dropped("onion_reply_bad_length")
    response = datagram[1 + ONION_RETURN_1 :]
    if response[0] not in response_types:
        raise Dropped("onion_reply_bad_type")  # R-ORET-2 / R-ORET-2a
    path = open_return_block(keys, datagram[1 : 1 + ONION_RETURN_1])
    return Reply(path, b"\x09" + response)


# ----------------------------------------------------------------------
# Forwarding: type 10 -> UDP 0x91, UDP 0x92 -> type 11
# ----------------------------------------------------------------------


def timed_auth(key: bytes, bucket: int, data: bytes) -> bytes:
    """HMAC-SHA-512-256 over ``bucket (u64, little-endian) || data`` (R-FWD-3)."""
    message = struct.pack("<Q", bucket % (1 << 64)) + data
    return hmac.new(key, message, hashlib.sha512).digest()[:TIMED_AUTH_SIZE]


def pack_sendback(path: ReturnPath) -> bytes:
    """``S`` (R-FWD-2): 02, con_id (our shard) u32 and identifier (our epoch)
    u64, both big-endian."""
    return struct.pack(">BIQ", SENDBACK_TCP, path.shard, path.epoch)


def forwarding(address: bytes, data: bytes, key: bytes, path: ReturnPath, now: float) -> Datagram:
    """The UDP 0x91 datagram for a type 10 packet (R-FWD-2..4)."""
    host, port = unpack_forward_address(address)
    if not is_sendable(host, port):
        raise Dropped("forward_bad_address")
    sendback = pack_sendback(path)
    auth = timed_auth(key, auth_bucket(now), sendback)
    header = bytes((NET_PACKET_FORWARDING, _FORWARD_SENDBACK_SIZE))
    return Datagram(host, port, header + auth + sendback + data)


def forward_reply(datagram: bytes, key: bytes, now: float) -> Reply:
    """A UDP 0x92 reply to the TCP packet ``0b || data`` (R-FWD-5, R-FWD-6)."""
    if len(datagram) < 2 + TIMED_AUTH_SIZE:
        raise Dropped("forward_reply_bad_length")
    size = datagram[1]
    if not TIMED_AUTH_SIZE < size <= MAX_SENDBACK_SIZE or len(datagram) < 2 + size:
        raise Dropped("forward_reply_bad_length")
    if len(datagram) - 2 - size > MAX_FORWARD_REPLY_DATA:
        raise Dropped("forward_reply_too_long")  # R-FWD-6: could not be framed
    auth = datagram[2 : 2 + TIMED_AUTH_SIZE]
    sendback = datagram[2 + TIMED_AUTH_SIZE : 2 + size]
    bucket = auth_bucket(now)
    if not any(
        hmac.compare_digest(auth, timed_auth(key, b, sendback)) for b in (bucket, bucket - 1)
    ):
        raise Dropped("forward_reply_bad_auth")
    if len(sendback) != _SENDBACK_TCP_SIZE or sendback[0] != SENDBACK_TCP:
        raise Dropped("forward_reply_not_ours")  # UDP / chain sendbacks: we make none
    _, shard, epoch = struct.unpack(">BIQ", sendback)
    return Reply(ReturnPath(shard, epoch), b"\x0b" + datagram[2 + size :])


# ----------------------------------------------------------------------
# Rate limits
# ----------------------------------------------------------------------


class TokenBucket:
    """``rate`` events per second on average, up to ``burst`` at once."""

    __slots__ = ("rate", "burst", "tokens", "updated")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def level(self, now: float) -> float:
        """The tokens there are at ``now`` (refilled up to then)."""
        elapsed = now - self.updated
        if elapsed > 0:
            self.tokens = min(self.burst, self.tokens + elapsed * self.rate)
            self.updated = now
        return self.tokens

    def take(self, now: float) -> bool:
        """Spend one token; False (and nothing spent) when there is none."""
        if self.rate <= 0:
            return True  # 0 = unlimited
        if self.level(now) < 1:
            return False
        self.tokens -= 1
        return True
