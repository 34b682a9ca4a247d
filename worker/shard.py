"""One relay shard: the asyncio (uvloop) adapter around ``relaycore.relay``.

Owns the listening sockets (SO_REUSEPORT, so several shards can share the
ports), one ``asyncio.Protocol`` per client connection, the one coarse timer
of the process, and moving the core's output to the transports. It holds no
protocol logic: every decision is the core's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterable

from relaycore.bootstrap_info import format_uptime, info_response, is_info_request, render_motd
from relaycore.onion import Datagram, OnionSecrets, TokenBucket
from relaycore.options import RelayOptions
from relaycore.relay import ConnectionRefused, ConnectionState, RelayServer, ServerConnection

log = logging.getLogger("worker.shard")

TICK_INTERVAL = 1.0  # seconds; pings (30 s), ping timeouts (10 s), handshake timeouts
# Onion / forward datagrams are dropped (and counted) while the UDP transport
# holds more than this unsent: the kernel's buffer is full, the bound is ours.
UDP_BACKLOG_LIMIT = 256 * 1024


def bind_reuseport(host: str, port: int, kind: int) -> socket.socket:
    """A socket of ``kind`` (SOCK_STREAM / SOCK_DGRAM) bound to ``host:port``
    with SO_REUSEADDR and SO_REUSEPORT, so every shard can bind the same port;
    "::" is dual-stack. Closed again if anything fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def open_listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP listener with SO_REUSEADDR and SO_REUSEPORT set, not yet serving."""
    sock = bind_reuseport(host, port, socket.SOCK_STREAM)
    try:
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_udp_socket(host: str, port: int) -> socket.socket:
    """The onion / forwarding UDP socket, SO_REUSEPORT so every shard binds the
    same port and a reply may arrive at any of them."""
    try:
        sock = bind_reuseport(host, port, socket.SOCK_DGRAM)
    except OSError as error:
        raise OSError(
            error.errno, f"cannot bind UDP port {port} on {host}: {error.strerror}"
        ) from None
    sock.setblocking(False)
    return sock


class DatagramEndpoint(asyncio.DatagramProtocol):
    """Moves UDP datagrams (onion and forward replies) into the shard's core."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        shard = self.shard
        if data[:1] == b"\xf0":
            shard.answer_info_request(data, addr)
            return
        shard.server.receive_datagram(data, shard.loop.time())
        shard.flush()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier datagrams (port unreachable, ...): counted only.
        self.shard.server.stats["udp.errors"] += 1


class ClientProtocol(asyncio.Protocol):
    """Moves bytes between one client socket and the shard's RelayServer."""

    __slots__ = ("connection", "shard", "transport")

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.transport: asyncio.Transport | None = None
        self.connection: ServerConnection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        shard = self.shard
        peer = transport.get_extra_info("peername")
        peer_ip = peer[0] if peer else "?"
        try:
            self.connection = shard.server.open_connection(peer_ip, shard.loop.time())
        except ConnectionRefused as refusal:
            shard.note_refusal(refusal.reason, peer_ip)
            transport.abort()
            return
        self.connection.handle = transport
        # High-water mark = the soft limit: pause_writing tells the core when
        # non-priority packets start being dropped (R-OUT-2).
        transport.set_write_buffer_limits(high=shard.options.output_soft_limit)

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        if connection is None:
            return
        shard = self.shard
        shard.server.receive(connection, data, shard.loop.time())
        shard.flush()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        connection = self.connection
        if connection is None:
            return
        shard = self.shard
        if connection.state is not ConnectionState.CLOSED:
            shard.server.peer_closed(connection, shard.loop.time())  # R-KILL-4
            shard.flush()
        connection.handle = None
        self.connection = None

    def pause_writing(self) -> None:
        # The client is not reading: stop reading from it too, and let the core
        # see the backlog so it drops non-priority packets for it.
        transport, connection = self.transport, self.connection
        if transport is None or connection is None:
            return
        connection.transport_backlog = transport.get_write_buffer_size()
        transport.pause_reading()

    def resume_writing(self) -> None:
        transport, connection = self.transport, self.connection
        if transport is None or connection is None:
            return
        connection.transport_backlog = transport.get_write_buffer_size()
        if not transport.is_closing():
            transport.resume_reading()


class Shard:
    """The relay core, its listeners and its timer, on one event loop."""

    def __init__(
        self,
        secret_key: bytes,
        options: RelayOptions,
        loop: asyncio.AbstractEventLoop,
        tick_interval: float = TICK_INTERVAL,
        shard_id: int | None = None,
        onion_secrets: OnionSecrets | None = None,
    ) -> None:
        """``shard_id``: cluster-unique id of this worker process (None = a
        stand-alone relay); it is also the incarnation part of its epochs."""
        self.loop = loop
        self.tick_interval = tick_interval
        self.options = options
        self.server = RelayServer(
            secret_key,
            options,
            shard=shard_id,
            incarnation=shard_id or 0,
            onion_secrets=onion_secrets,
        )
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_is_v6 = False
        self._servers: list[asyncio.AbstractServer] = []
        self._timer: asyncio.TimerHandle | None = None
        self.refusals = 0
        self.after_flush: Callable[[], None] | None = None  # the cluster link's hook
        self.loop_lag = 0.0
        self._tick_due = 0.0
        self._started_at = loop.time()
        self._info_budget = TokenBucket(
            options.info_rate_per_worker, max(1.0, options.info_rate_per_worker), 0.0
        )

    async def serve(
        self,
        sockets: Iterable[socket.socket],
        backlog: int = 1024,
        udp_socket: socket.socket | None = None,
    ) -> None:
        """Accept on ``sockets``; without ``udp_socket`` onion and forward
        requests are dropped and counted (``dropped.udp_off``)."""
        if udp_socket is not None:
            self._udp_is_v6 = udp_socket.family == socket.AF_INET6
            self._udp, _ = await self.loop.create_datagram_endpoint(
                lambda: DatagramEndpoint(self), sock=udp_socket
            )
        for sock in sockets:
            # create_server listens again on the socket: without backlog= it
            # would quietly shrink the configured backlog to asyncio's 100.
            server = await self.loop.create_server(
                lambda: ClientProtocol(self), sock=sock, backlog=backlog
            )
            self._servers.append(server)
        self._schedule_tick()

    def flush(self) -> None:
        """Write every connection's new output; close what the core killed."""
        server = self.server
        for connection in server.take_dirty():
            transport = connection.handle
            outbox = connection.outbox
            if transport is None or not outbox:
                continue
            transport.write(outbox[0] if len(outbox) == 1 else b"".join(outbox))  # type: ignore[attr-defined]
            outbox.clear()
            connection.outbox_size = 0
            connection.transport_backlog = transport.get_write_buffer_size()  # type: ignore[attr-defined]
        if server.datagrams:
            self._send_datagrams(server.take_datagrams())
        if self.after_flush is not None:
            self.after_flush()
        for connection in server.take_closed():
            transport = connection.handle
            if transport is not None:
                # Written above: what the kernel took goes out; the rest of the
                # transport's buffer is the queued output R-KILL-1 discards.
                transport.abort()  # type: ignore[attr-defined]

    def answer_info_request(self, request: bytes, addr: tuple) -> None:
        """A bootstrap-info request (0xF0): version and MOTD back to the sender,
        as tox-bootstrapd answers status pages (relaycore.bootstrap_info)."""
        stats = self.server.stats
        transport = self._udp
        options = self.options
        if not options.motd or transport is None or not is_info_request(request):
            stats["udp.ignored"] += 1  # off, or not 78 bytes: the reference ignores it too
            return
        now = self.loop.time()
        if not self._info_budget.take(now):
            stats["dropped.info_rate"] += 1
            return
        if transport.get_write_buffer_size() > UDP_BACKLOG_LIMIT:
            stats["dropped.udp_backlog"] += 1
            return
        values = {
            "worker_uptime": format_uptime(now - self._started_at),
            "worker_connections": self.server.connection_count,
            "worker_relayed": stats["relayed"],
        }
        answer = info_response(options.info_version, render_motd(options.motd, values))
        try:
            transport.sendto(answer, addr)
        except OSError:
            stats["udp.errors"] += 1
        else:
            stats["udp.info_answered"] += 1

    def _send_datagrams(self, datagrams: list[Datagram]) -> None:
        stats = self.server.stats
        transport = self._udp
        if transport is None:
            stats["dropped.udp_off"] += len(datagrams)
            return
        for host, port, data in datagrams:
            if transport.get_write_buffer_size() > UDP_BACKLOG_LIMIT:
                stats["dropped.udp_backlog"] += 1
                continue
            if ":" in host:
                if not self._udp_is_v6:
                    stats["dropped.udp_unreachable"] += 1  # IPv6 hop, IPv4-only relay
                    continue
            elif self._udp_is_v6:
                host = "::ffff:" + host  # a dual-stack socket reaches IPv4 mapped
            try:
                transport.sendto(data, (host, port))
            except OSError:
                stats["dropped.udp_unreachable"] += 1
            else:
                stats["udp.sent"] += 1

    def _tick(self) -> None:
        now = self.loop.time()
        self.loop_lag = max(0.0, now - self._tick_due)  # how late this timer fired
        self.server.tick(now)
        self.flush()
        self._schedule_tick()

    def _schedule_tick(self) -> None:
        self._tick_due = self.loop.time() + self.tick_interval
        self._timer = self.loop.call_later(self.tick_interval, self._tick)

    def note_refusal(self, reason: str, peer_ip: str) -> None:
        self.refusals += 1
        if self.refusals == 1 or self.refusals % 1000 == 0:
            log.warning(
                "refusing connections: %s (from %s; %d refused so far)",
                reason,
                peer_ip,
                self.refusals,
            )

    async def stop(self) -> None:
        """Stop accepting, close every connection, cancel the timer."""
        if self._timer is not None:
            self._timer.cancel()
        for server in self._servers:
            server.close()
        if self._udp is not None:
            self._udp.close()
        server = self.server
        for connection in [*server.by_key.values(), *server.pending]:
            server.kill(connection, "shutdown")
        self.flush()
        for server_ in self._servers:
            await server_.wait_closed()
