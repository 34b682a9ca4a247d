"""The host's own IP addresses, read once at start (Linux /proc; empty where
it cannot be read). The relay refuses them as onion / forward next hops
(``relaycore.nexthop``), so a client cannot reach UDP services on the relay's
own host through a public address of it."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
from collections.abc import Iterable

log = logging.getLogger("worker.addresses")

FIB_TRIE = "/proc/net/fib_trie"  # every local IPv4 address: "/32 host LOCAL"
IF_INET6 = "/proc/net/if_inet6"  # every IPv6 address, 32 hex digits first


def ipv4_local_addresses(fib_trie: str) -> set[str]:
    """The IPv4 addresses the kernel treats as this host's (``/32 host LOCAL``
    entries of the routing trie: every interface address, secondary ones too)."""
    addresses: set[str] = set()
    leaf = ""
    for line in fib_trie.splitlines():
        text = line.strip()
        if text.startswith("|--"):
            leaf = text.rsplit(" ", 1)[-1]
        elif text.startswith("/32 host LOCAL"):
            with contextlib.suppress(ValueError):
                addresses.add(str(ipaddress.IPv4Address(leaf)))
    return addresses


def ipv6_local_addresses(if_inet6: str) -> set[str]:
    addresses: set[str] = set()
    for line in if_inet6.splitlines():
        field = line.split(" ", 1)[0]
        if len(field) == 32:
            addresses.add(str(ipaddress.IPv6Address(bytes.fromhex(field))))
    return addresses


def host_addresses() -> set[str]:
    """Every address of this host that /proc lists (none where unreadable)."""
    addresses: set[str] = set()
    for path, parse in ((FIB_TRIE, ipv4_local_addresses), (IF_INET6, ipv6_local_addresses)):
        try:
            with open(path) as source:
                addresses |= parse(source.read())
        except (OSError, ValueError) as error:
            log.warning("cannot read the host's addresses from %s: %s", path, error)
    return addresses


def bound_addresses(sockets: Iterable[socket.socket]) -> set[str]:
    """The specific (not wildcard) addresses ``sockets`` are bound to."""
    addresses = set()
    for sock in sockets:
        host = sock.getsockname()[0]
        if not ipaddress.ip_address(host.split("%", 1)[0]).is_unspecified:
            addresses.add(host)
    return addresses
