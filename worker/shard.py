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
from relaycore.errors import InvariantBroken
from relaycore.nexthop import NextHopPolicy
from relaycore.onion import Datagram, OnionSecrets, TokenBucket
from relaycore.options import RelayOptions
from relaycore.relay import ConnectionRefused, ConnectionState, RelayServer, ServerConnection
from relaycore.shardlink import EPOCH_RENEW_MARGIN
from worker.addresses import bound_addresses, host_addresses
from worker.faults import Faults, exit_broken

log = logging.getLogger("worker.shard")

TICK_INTERVAL = 1.0  # seconds; pings (30 s), ping timeouts (10 s), handshake timeouts
# Onion / forward datagrams are dropped (and counted) while the UDP transport
# holds more than this unsent: the kernel's buffer is full, the bound is ours.
UDP_BACKLOG_LIMIT = 256 * 1024
# A timer that failed this many times in a row means a wedged relay table.
MAX_TICK_FAILURES = 3

# Why a client's socket is not read (ClientProtocol._paused, a bit set):
_WRITING = 1  # it does not read what we send (pause_writing)
_WAITING = 2  # its routing request waits for another shard's answer
_BUDGET = 4  # this turn's share was taken (frames or bytes); more on a later turn
# A read that brought this much is one loop turn's share for that client: its
# socket is not read again before the next turn, whatever it holds (libuv
# reads a busy socket up to 32 times per turn; a stream of empty frames could
# take ~8 MB per turn without this).
READ_BYTES_PER_TURN = 64 * 1024
# A read that was mostly empty frames (00 00, R-FRAME-3: nothing for anyone)
# costs that client this long without reading: a stream of them gets at most
# one read (256 KB) per pause, ~25 MB/s, instead of a whole CPU. (The
# reference stops reading such a connection until its next tick, R-FRAME-3.)
EMPTY_FRAMES_PAUSE = 0.01  # seconds


class DatagramEndpoint(asyncio.DatagramProtocol):
    """Moves UDP datagrams (onion and forward replies) into the shard's core."""

    def __init__(self, shard: Shard) -> None:
        self.shard = shard

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        shard = self.shard
        try:
            if data[:1] == b"\xf0":
                shard.answer_info_request(data, addr)
                return
            shard.server.receive_datagram(data, shard.loop.time())
            shard.flush()
        except Exception:
            shard.faults.contained("datagram")
            shard.check_core()

    def error_received(self, exc: Exception) -> None:
        # ICMP errors for earlier datagrams (port unreachable, ...): counted only.
        self.shard.server.stats["udp.errors"] += 1


class ClientProtocol(asyncio.Protocol):
    """Moves bytes between one client socket and the shard's RelayServer.

    An exception from the core in any callback kills this connection only
    (``Shard.contain``). Reading stops while the client does not read
    (_WRITING), while its routing request waits for another shard (_WAITING:
    TCP flow control then holds its input, not our memory) and between the
    turns that share out a long burst of frames (_BUDGET)."""

    __slots__ = ("connection", "shard", "transport", "_paused", "_reading_more")

    def __init__(self, shard: Shard) -> None:
        self.shard = shard
        self.transport: asyncio.Transport | None = None
        self.connection: ServerConnection | None = None
        self._paused = 0  # _WRITING | _WAITING | _BUDGET
        self._reading_more = False  # a _read_more is scheduled

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        shard = self.shard
        try:
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
            shard.flush()  # closes a handshake evicted to make room (max_unconfirmed)
        except Exception:
            shard.contain(self, "connection_made")

    def data_received(self, data: bytes) -> None:
        connection = self.connection
        if connection is None:
            return
        shard = self.shard
        try:
            channel = connection.channel
            empty_before = channel.empty_frames if channel is not None else 0
            shard.server.receive(connection, data, shard.loop.time())
            shard.flush()
            if len(data) < READ_BYTES_PER_TURN:
                self.after_input()
            else:
                channel = connection.channel
                empty = channel.empty_frames - empty_before if channel is not None else 0
                self.after_input(turn_taken=True, idle=2 * empty >= READ_BYTES_PER_TURN)
        except Exception:
            shard.contain(self, "data_received")

    def after_input(self, turn_taken: bool = False, idle: bool = False) -> None:
        """Stop or start reading as the core's state of this connection says;
        ``turn_taken``: this loop turn's share of reading was used up; ``idle``:
        by empty frames (reading waits EMPTY_FRAMES_PAUSE)."""
        connection, transport = self.connection, self.transport
        if connection is None or transport is None:
            return
        if connection.state is ConnectionState.CLOSED:
            return
        if connection.waiting_for is not None:
            self._pause(_WAITING)
            self.shard.waiting.add(self)  # flush() looks again when answers come
        else:
            self._resume(_WAITING)
        if connection.more_input or turn_taken:
            self._pause(_BUDGET)
            if not self._reading_more:
                self._reading_more = True
                if idle:
                    self.shard.loop.call_later(EMPTY_FRAMES_PAUSE, self._read_more)
                else:
                    self.shard.loop.call_soon(self._read_more)
        else:
            self._resume(_BUDGET)

    def _read_more(self) -> None:
        """A later turn: the next share of what the core has buffered
        (FRAMES_PER_RECEIVE), or reading from the socket again."""
        self._reading_more = False
        connection = self.connection
        if connection is None:
            return
        shard = self.shard
        try:
            if connection.more_input:
                shard.server.receive(connection, b"", shard.loop.time())
                shard.flush()
            self.after_input()
        except Exception:
            shard.contain(self, "data_received")

    def _pause(self, reason: int) -> None:
        if not self._paused:
            self.transport.pause_reading()  # type: ignore[union-attr]
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        transport = self.transport
        if not self._paused and transport is not None and not transport.is_closing():
            transport.resume_reading()

    def eof_received(self) -> bool:
        return False  # close our side too; connection_lost follows

    def connection_lost(self, exc: Exception | None) -> None:
        connection = self.connection
        if connection is None:
            return
        shard = self.shard
        try:
            if connection.state is not ConnectionState.CLOSED:
                shard.server.peer_closed(connection, shard.loop.time())  # R-KILL-4
                shard.flush()
        except Exception:
            shard.contain(self, "connection_lost")
        connection.handle = None
        self.connection = None

    def pause_writing(self) -> None:
        # The client is not reading: stop reading from it too, and let the core
        # see the backlog so it drops non-priority packets for it.
        if self._note_backlog():
            self._pause(_WRITING)

    def resume_writing(self) -> None:
        if self._note_backlog():
            self._resume(_WRITING)

    def _note_backlog(self) -> bool:
        """Tell the core what the transport still holds; False when closed."""
        transport, connection = self.transport, self.connection
        if transport is None or connection is None:
            return False
        connection.transport_backlog = transport.get_write_buffer_size()
        return True


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
        stand-alone relay); it is also the high 32 bits of its epochs."""
        self.loop = loop
        self.tick_interval = tick_interval
        self.options = options
        self.server = RelayServer(secret_key, options, shard=shard_id, onion_secrets=onion_secrets)
        self._udp: asyncio.DatagramTransport | None = None
        self._udp_is_v6 = False
        self._servers: list[asyncio.AbstractServer] = []
        self._timer: asyncio.TimerHandle | None = None
        self.refusals = 0
        self.after_flush: Callable[[], None] | None = None  # the cluster link's hook
        # Called once when the core's epochs run low: the process must be
        # replaced by a fresh worker (a new shard id) before they run out.
        self.on_epochs_low: Callable[[], None] | None = None
        self.loop_lag = 0.0
        self._tick_due = 0.0
        self._tick_failures = 0
        self.faults = Faults(self.server.stats)
        # Called when the relay table is broken; ends the process by default.
        self.on_broken: Callable[[str], None] = exit_broken
        self.waiting: set[ClientProtocol] = set()  # reading paused for an answer
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
        sockets = list(sockets)
        own = host_addresses() | bound_addresses(
            sockets + ([udp_socket] if udp_socket is not None else [])
        )
        self.server.first_hop.next_hops = NextHopPolicy(
            self.options.allow_private_next_hops,
            own,
            [udp_socket.getsockname()[1]] if udp_socket is not None else [],
        )
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
        """Write every connection's new output; close what the core killed;
        read again from connections whose routing request was answered."""
        server = self.server
        for connection in server.take_dirty():
            transport = connection.handle
            data = connection.data_to_send()
            if transport is None or not data:
                continue
            transport.write(data)  # type: ignore[attr-defined]
            connection.transport_backlog = transport.get_write_buffer_size()  # type: ignore[attr-defined]
        if server.first_hop.datagrams:
            self._send_datagrams(server.take_datagrams())
        if self.after_flush is not None:
            self.after_flush()
        for connection in server.take_closed():
            transport = connection.handle
            if transport is not None:
                # Written above: what the kernel took goes out; the rest of the
                # transport's buffer is the queued output R-KILL-1 discards.
                transport.abort()  # type: ignore[attr-defined]
        if self.waiting:
            self._read_answered()

    def _read_answered(self) -> None:
        for protocol in [p for p in self.waiting if _answered(p.connection)]:
            self.waiting.discard(protocol)
            protocol.after_input()

    def contain(self, protocol: ClientProtocol, where: str) -> None:
        """An exception escaped the core in one connection's callback: count
        it, kill that connection (its peers are told as for any kill), and
        check that the rest of the table is sound."""
        self.faults.contained(where)
        connection = protocol.connection
        try:
            if connection is not None and connection.state is not ConnectionState.CLOSED:
                self.server.kill(connection, "internal_error")
            self.flush()
        except Exception:
            self.faults.contained("kill")
        if protocol.transport is not None:
            protocol.transport.abort()  # (a no-op when flush closed it)
        self.check_core()

    def check_core(self) -> None:
        """End the process (``on_broken``) when the relay table is broken."""
        try:
            self.server.check_invariants()
        except InvariantBroken as broken:
            self.on_broken(str(broken))

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
        try:
            self.server.tick(now)
            self.flush()
            self._tick_failures = 0
        except Exception:
            self.faults.contained("tick")
            self._tick_failures += 1
        finally:
            self._schedule_tick()  # pings and timeouts must never stop
        if self._tick_failures >= MAX_TICK_FAILURES:
            self.on_broken(f"the timer failed {self._tick_failures} times in a row")
        self.check_core()
        if self.on_epochs_low is not None and self.server.cluster.epochs_left < EPOCH_RENEW_MARGIN:
            on_epochs_low, self.on_epochs_low = self.on_epochs_low, None
            on_epochs_low()

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


def _answered(connection: ServerConnection | None) -> bool:
    return connection is None or connection.waiting_for is None
