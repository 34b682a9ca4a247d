"""Limits per source address, sans-IO: what one address (one IPv4 address, one
IPv6 /64) may hold or spend, whatever number of connections it opens.

A client that opens a new connection must not bring a fresh allowance with
it: the half-open cap (``max_unconfirmed_per_ip``), the onion budget and the
OOB broadcast budget are all counted per *address key* (``address_key``).
"""

from __future__ import annotations

import functools
import ipaddress

from relaycore.onion import TokenBucket

# Buckets remembered at most; past this the one looked at longest ago is
# forgotten (with that many busy addresses, one may get a fresh burst).
MAX_ADDRESS_BUCKETS = 65536
# Buckets looked at per forget_refilled call (one per tick of a worker).
FORGET_PER_CALL = 2048
# Peer addresses whose key address_key remembers (least recently used go).
ADDRESS_KEY_CACHE = 4096


@functools.lru_cache(maxsize=ADDRESS_KEY_CACHE)
def address_key(peer_ip: str) -> str:
    """The unit a limit counts: an IPv4 address (IPv4-mapped IPv6 included) or
    the /64 of an IPv6 address, which one subscriber usually holds whole.
    Anything that is not an IP address (a unix socket, "?") is its own key.
    Cached (bounded): parsing costs ~3% of a connection's CPU, and clients
    reconnect from the same addresses."""
    try:
        address = ipaddress.ip_address(peer_ip.split("%", 1)[0])
    except ValueError:
        return peer_ip
    if address.version == 6:
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


class AddressBuckets:
    """One token bucket per address key, made full at first use.

    A bucket outlives the address's connections until it has refilled, so
    closing and reopening connections never resets an address's budget; the
    number of buckets is bounded (``MAX_ADDRESS_BUCKETS``)."""

    __slots__ = ("rate", "burst", "buckets", "limit")

    def __init__(self, rate: float, burst: float, limit: int = MAX_ADDRESS_BUCKETS) -> None:
        self.rate = rate
        self.burst = burst
        self.limit = limit
        self.buckets: dict[str, TokenBucket] = {}

    def bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self.buckets.get(key)
        if bucket is None:
            if len(self.buckets) >= self.limit:  # the one looked at longest ago goes
                del self.buckets[next(iter(self.buckets))]
            bucket = self.buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket

    def take(self, key: str, now: float) -> bool:
        """Spend one token of ``key``'s bucket; False when it has none."""
        if self.rate <= 0:
            return True  # 0 = unlimited
        return self.bucket(key, now).take(now)

    def forget_refilled(self, now: float, limit: int = FORGET_PER_CALL) -> None:
        """Drop the buckets that are full again (forgetting a full bucket
        changes nothing: a new one starts full). Looks at ``limit`` of them
        per call, oldest first, and moves those still spent to the back, so a
        call never takes long however many addresses there are."""
        buckets, rate, burst = self.buckets, self.rate, self.burst
        for _ in range(min(limit, len(buckets))):
            key = next(iter(buckets))
            bucket = buckets.pop(key)
            if bucket.tokens + (now - bucket.updated) * rate < burst:
                buckets[key] = bucket  # still spent: looked at again later


class PendingByAddress:
    """The connections still in their handshake, grouped by address key, oldest
    first, with the key that holds the most found in O(1) (half-open floods:
    at the global cap the oldest of that key is evicted)."""

    __slots__ = ("by_key", "_keys_with", "_most", "size")

    def __init__(self) -> None:
        self.by_key: dict[str, dict[object, None]] = {}  # key -> connections, oldest first
        self._keys_with: dict[int, set[str]] = {}  # count -> keys holding that many
        self._most = 0
        self.size = 0  # connections held, all keys together

    def count(self, key: str) -> int:
        held = self.by_key.get(key)
        return len(held) if held else 0

    def _move(self, key: str, before: int, after: int) -> None:
        if before:
            keys = self._keys_with[before]
            keys.discard(key)
            if not keys:
                del self._keys_with[before]
        if after:
            self._keys_with.setdefault(after, set()).add(key)
        if after > self._most:
            self._most = after
        while self._most and self._most not in self._keys_with:
            self._most -= 1

    def add(self, key: str, connection: object) -> None:
        held = self.by_key.setdefault(key, {})
        before = len(held)
        held[connection] = None
        if len(held) != before:
            self.size += 1
            self._move(key, before, before + 1)

    def remove(self, key: str, connection: object) -> None:
        held = self.by_key.get(key)
        if held is None or connection not in held:
            return
        before = len(held)
        del held[connection]
        self.size -= 1
        if not held:
            del self.by_key[key]
        self._move(key, before, before - 1)

    def oldest_of_busiest(self) -> object | None:
        """The oldest pending connection of the key that holds the most."""
        if not self._most:
            return None
        key = next(iter(self._keys_with[self._most]))
        return next(iter(self.by_key[key]))
