"""Which UDP next hops a client may make the relay send to (onion type 8,
forwarding type 10), sans-IO.

``onion.is_sendable`` already refuses what reaches more than one host or none.
On top of it, by default only *globally routable* addresses of *other* hosts
are next hops: a client must not reach UDP services on the relay's own host
(loopback, the host's own addresses) or on its private network (RFC 1918,
link-local, CGNAT 100.64/10, unique-local fc00::/7, ...). IPv4 addresses
embedded in IPv6 (IPv4-mapped, IPv4-compatible, 6to4, NAT64) are judged as
the IPv4 address they reach. ``allow_private_next_hops`` lets tests on
loopback and LAN-only deployments send to private addresses and to the host
itself; the relay's own UDP endpoint stays refused either way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Not globally routable, whatever a Python version's ``is_global`` says.
_NON_GLOBAL = tuple(
    ipaddress.ip_network(network)
    for network in (
        "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
        "172.16.0.0/12", "192.0.0.0/24", "192.0.2.0/24", "192.168.0.0/16", "198.18.0.0/15",
        "198.51.100.0/24", "203.0.113.0/24", "224.0.0.0/3",
        "::/8", "64:ff9b:1::/48", "100::/64", "2001:db8::/32", "fc00::/7", "fe80::/10",
        "fec0::/10", "ff00::/8",
    )
)  # fmt: skip
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

# Next-hop hosts whose verdict a policy remembers (NextHopPolicy._verdicts).
VERDICTS_CACHED = 4096

# Stats reasons (dropped.<reason>).
PRIVATE = "next_hop_private"
OWN_ADDRESS = "next_hop_own_address"
SELF = "next_hop_self"


def reached_address(host: str) -> IPAddress:
    """The address a datagram to ``host`` really reaches: the IPv4 address of
    an IPv4-mapped, IPv4-compatible, 6to4 or NAT64 IPv6 address."""
    address = ipaddress.ip_address(host.split("%", 1)[0])
    if address.version == 4:
        return address
    mapped = address.ipv4_mapped or address.sixtofour
    if mapped is not None:
        return mapped
    if address in _NAT64:
        return ipaddress.IPv4Address(address.packed[-4:])
    if address.packed[:12] == bytes(12) and int(address) > 1:  # ::a.b.c.d (deprecated)
        return ipaddress.IPv4Address(address.packed[-4:])
    return address


def is_global(address: IPAddress) -> bool:
    return address.is_global and not any(
        address.version == network.version and address in network for network in _NON_GLOBAL
    )


class NextHopPolicy:
    """Decides, per datagram, whether a next hop is refused and why."""

    __slots__ = ("allow_private", "own_addresses", "own_ports", "_verdicts")

    def __init__(
        self,
        allow_private: bool = False,
        own_addresses: Iterable[str] = (),
        own_ports: Iterable[int] = (),
    ) -> None:
        """``own_addresses``: the host's addresses (its interfaces, the
        listening address); ``own_ports``: the relay's UDP port(s)."""
        self.allow_private = allow_private
        self.own_addresses = frozenset(reached_address(a) for a in own_addresses)
        self.own_ports = frozenset(own_ports)
        # host -> (own, global): ~9 us of ipaddress work per datagram uncached;
        # next hops repeat. Bounded: emptied when it reaches VERDICTS_CACHED.
        self._verdicts: dict[str, tuple[bool, bool]] = {}

    def is_own(self, address: IPAddress) -> bool:
        return address in self.own_addresses or address.is_loopback

    def refusal(self, host: str, port: int) -> str | None:
        """None when ``host:port`` may be sent to, else the stats reason."""
        verdict = self._verdicts.get(host)
        if verdict is None:
            address = reached_address(host)
            verdict = (self.is_own(address), is_global(address))
            if len(self._verdicts) >= VERDICTS_CACHED:
                self._verdicts.clear()
            self._verdicts[host] = verdict
        own, global_ = verdict
        if own and port in self.own_ports:
            return SELF  # the relay's own UDP socket: a loop, never useful
        if self.allow_private:
            return None
        if own:
            return OWN_ADDRESS
        if not global_:
            return PRIVATE
        return None
