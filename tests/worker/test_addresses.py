"""The host's own addresses, as the relay reads them from /proc at start
(they are refused as onion / forward next hops, issue 10 #5)."""

from __future__ import annotations

import socket

from worker.addresses import bound_addresses, ipv4_local_addresses, ipv6_local_addresses

FIB_TRIE = """Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 127.0.0.0/8 2 0 2
           |-- 127.0.0.1
              /32 host LOCAL
        |-- 127.255.255.255
           /32 link BROADCAST
     +-- 203.0.113.0/24 2 0 2
           |-- 203.0.113.0
              /24 link UNICAST
           |-- 203.0.113.7
              /24 link UNICAST
              /32 host LOCAL
"""

IF_INET6 = """00000000000000000000000000000001 01 80 10 80       lo
20010db8000000000000000000000007 02 40 00 80     eth0
fe8000000000000000fc00fffe000001 02 40 20 80     eth0
"""


def test_local_ipv4_addresses_are_the_host_local_leaves() -> None:
    assert ipv4_local_addresses(FIB_TRIE) == {"127.0.0.1", "203.0.113.7"}


def test_ipv6_addresses_of_every_interface() -> None:
    assert ipv6_local_addresses(IF_INET6) == {"::1", "2001:db8::7", "fe80::fc:ff:fe00:1"}


def test_bound_addresses_leave_out_wildcards() -> None:
    specific = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    wildcard = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        specific.bind(("127.0.0.1", 0))
        wildcard.bind(("0.0.0.0", 0))
        assert bound_addresses([specific, wildcard]) == {"127.0.0.1"}
    finally:
        specific.close()
        wildcard.close()
