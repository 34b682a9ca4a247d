"""The onion and forwarding first hop for TCP clients (onion-over-tcp.md).

A client's type 8 (onion request) and type 10 (forward request) leave as UDP
datagrams (``take_datagrams``), each with a sealed return path naming the
shard and the connection (epoch) that asked; replies come back as UDP to any
shard's socket, are opened here (``open_reply``) and the relay delivers them
as type 9 / 11 (R-ORET-5, R-FWD-5), over the bus when another shard holds
the connection. What a client may make us send is rate limited per client,
per address and per worker; where datagrams may go is ``next_hops``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable

from relaycore.connection import ServerConnection
from relaycore.limits import AddressBuckets
from relaycore.nexthop import NextHopPolicy
from relaycore.onion import (
    MAX_DATAGRAM_SIZE,
    NET_PACKET_FORWARD_REPLY,
    NET_PACKET_ONION_RECV_1,
    ONION_RESPONSE_TYPES,
    Datagram,
    Dropped,
    OnionSecrets,
    Reply,
    ReturnPath,
    TokenBucket,
    forward_reply,
    forwarding,
    onion_recv_1,
    onion_send_1,
    return_period,
    seal_return_block,
)
from relaycore.options import RelayOptions
from relaycore.shardlink import ShardId

# The share of the worker's onion budget kept for addresses that have spent
# less than half of their own burst (onion_rate_per_worker).
ONION_WORKER_RESERVE = 0.25


class FirstHop:
    """The first hop of one relay process: its secrets, budgets and datagrams."""

    def __init__(
        self,
        options: RelayOptions,
        stats: Counter[str],
        random_bytes: Callable[[int], bytes],
        secrets: OnionSecrets | None,
        shard: ShardId,
    ) -> None:
        """``secrets``: the cluster's shared onion/forwarding keys (random when
        None: fine for a stand-alone relay); ``shard``: the id return paths
        name (0 stand-alone)."""
        self.options = options
        self.stats = stats
        self._random_bytes = random_bytes
        self.shard = shard
        self.onion_secrets = secrets or OnionSecrets(os.urandom(32))
        self._forward_key = self.onion_secrets.forward_key()
        self._return_keys_period = -1
        self._return_keys: list[bytes] = []
        # The onion response ids passed on to clients (R-ORET-2 / R-ORET-2a).
        self._response_types = ONION_RESPONSE_TYPES[options.compat]
        self._worker_budget = TokenBucket(
            options.onion_rate_per_worker, options.onion_rate_per_worker, 0.0
        )
        self._onion_by_address = AddressBuckets(
            options.onion_rate_per_ip, options.onion_burst_per_ip
        )
        # Where datagrams may go; the adapter replaces it with one that knows
        # the host's own addresses and the relay's UDP port.
        self.next_hops = NextHopPolicy(options.allow_private_next_hops)
        self.datagrams: list[Datagram] = []  # for the adapter: take_datagrams()

    def take_datagrams(self) -> list[Datagram]:
        """UDP datagrams produced since the last call, in order."""
        datagrams, self.datagrams = self.datagrams, []
        return datagrams

    def tick(self, now: float) -> None:
        self._onion_by_address.forget_refilled(now)

    def open_reply(self, data: bytes, now: float) -> Reply | None:
        """A UDP datagram that arrived on the relay's port (from anyone): the
        reply it carries and its return path, or None (counted) when it is
        none of ours."""
        stats = self.stats
        if len(data) > MAX_DATAGRAM_SIZE:
            stats["dropped.datagram_too_long"] += 1  # no valid reply is (R-FWD-6)
            return None
        kind = data[0] if data else -1
        try:
            if kind == NET_PACKET_ONION_RECV_1:
                return onion_recv_1(data, self.return_keys(now), self._response_types)
            if kind == NET_PACKET_FORWARD_REPLY:
                return forward_reply(data, self._forward_key, now)
        except Dropped as drop:
            stats[f"dropped.{drop.reason}"] += 1
            return None
        stats["udp.ignored"] += 1  # DHT and onion hops 2-3: not a relay's job
        return None

    def _onion_allowed(self, connection: ServerConnection, now: float) -> bool:
        """The per-client, per-address and per-worker rate limits on types 8
        and 10. The worker's bucket is shared fairly: its last
        ONION_WORKER_RESERVE is only for addresses whose own bucket is at
        least half full, so a flood (from however many connections of a few
        addresses) cannot starve everyone else."""
        budget = connection.onion_budget
        options = self.options
        if budget is None:
            budget = connection.onion_budget = TokenBucket(
                options.onion_rate_per_client, options.onion_burst_per_client, now
            )
        if not budget.take(now):
            self.stats["dropped.onion_rate_client"] += 1
            return False
        light = True
        if options.onion_rate_per_ip > 0:
            # Spent even when the worker refuses below: an address that keeps
            # trying empties its own bucket and stops counting as light.
            by_address = self._onion_by_address.bucket(connection.address, now)
            if not by_address.take(now):
                self.stats["dropped.onion_rate_ip"] += 1
                return False
            light = by_address.tokens >= by_address.burst / 2
        worker = self._worker_budget
        if worker.rate > 0:
            floor = 1.0 if light else 1.0 + worker.burst * ONION_WORKER_RESERVE
            if worker.level(now) < floor:
                self.stats["dropped.onion_rate_worker"] += 1
                return False
            worker.tokens -= 1
        return True

    def _return_path(self, connection: ServerConnection) -> ReturnPath:
        return ReturnPath(self.shard, connection.epoch)

    def return_keys(self, now: float) -> list[bytes]:
        """[Ks of this period, Ks of the previous one] (R-ONION-8)."""
        period = return_period(now)
        if period != self._return_keys_period:
            secrets = self.onion_secrets
            self._return_keys = [secrets.return_key(period), secrets.return_key(period - 1)]
            self._return_keys_period = period
        return self._return_keys

    def onion_request(self, connection: ServerConnection, body: bytes, now: float) -> None:
        """Type 8 -> UDP 0x81 to node 2 (R-ONION-2..5); failures are silent drops."""
        if not self._onion_allowed(connection, now):
            return
        try:
            block = seal_return_block(
                self.return_keys(now)[0],
                self._random_bytes(24),
                self._return_path(connection),
            )
            datagram = onion_send_1(body, block)
        except Dropped as drop:
            self.stats[f"dropped.{drop.reason}"] += 1
            return
        self._send(datagram, "onion.requests_sent")

    def forward_request(
        self, connection: ServerConnection, address: bytes, data: bytes, now: float
    ) -> None:
        """Type 10 -> UDP 0x91 (R-FWD-2..4); the kill rules were checked in decoding."""
        if not self._onion_allowed(connection, now):
            return
        try:
            datagram = forwarding(
                address, data, self._forward_key, self._return_path(connection), now
            )
        except Dropped as drop:
            self.stats[f"dropped.{drop.reason}"] += 1
            return
        self._send(datagram, "forward.requests_sent")

    def _send(self, datagram: Datagram, counter: str) -> None:
        """Queue ``datagram`` for the adapter unless its next hop is refused."""
        reason = self.next_hops.refusal(datagram.host, datagram.port)
        if reason is not None:
            self.stats[f"dropped.{reason}"] += 1
            return
        self.datagrams.append(datagram)
        self.stats[counter] += 1
