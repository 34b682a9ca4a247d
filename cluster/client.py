"""Asyncio Tox TCP relay client, a thin adapter over ``relaycore.client``.

    client = await RelayClient.connect("127.0.0.1", 33445, relay_public_key)
    client.route_request(friend_key)
    event = await client.next_event()      # RoutingResponse, ConnectNotification, ...
    client.send_data(16, b"payload")
    await client.close()

Server PINGs are answered by the core; incoming packets are queued as
events (bounded: when the queue is full the client stops reading, so TCP
flow control pushes back on the relay instead of memory growing).
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from relaycore.client import ClientConnection, ClientState
from relaycore.errors import ProtocolViolation
from relaycore.packets import (
    DisconnectNotification,
    OobSend,
    Packet,
    Ping,
    Pong,
    RoutedData,
    RoutingRequest,
)

EVENT_QUEUE_LIMIT = 10_000

PacketT = TypeVar("PacketT")


class ConnectionClosed(Exception):
    """The relay closed the connection (or it failed); ``reason`` says how."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RelayClient(asyncio.Protocol):
    """One connection to a relay, speaking the client role.

    Packets are queued as events (``next_event``), or, while ``on_packets`` is
    set, handed to it as they arrive, with no task switch per packet (what a
    load generator or a latency benchmark needs); frames it ``queue``s leave
    in one write when it returns.
    """

    on_packets: Callable[[list[Packet]], None] | None = None

    def __init__(self, core: ClientConnection) -> None:
        self.core = core
        self.transport: asyncio.Transport | None = None
        self._events: deque[Packet] = deque()
        self._event_waiter: asyncio.Future[None] | None = None
        self._handshake_done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pong_waiters: dict[bytes, asyncio.Future[None]] = {}
        self._reading_paused = False
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    @property
    def public_key(self) -> bytes:
        return self.core.public_key

    # -- connecting ----------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        server_public_key: bytes,
        *,
        secret_key: bytes | None = None,
        local_addr: tuple[str, int] | None = None,
        timeout: float = 10.0,
        confirm: bool = True,
        answer_pings: bool = True,
        core: ClientConnection | None = None,
    ) -> RelayClient:
        """Open a TCP connection and complete the handshake.

        With ``confirm`` (as toxcore does) a PING is sent as the first frame
        and its PONG awaited, so the relay has registered the key on return.
        ``core`` replaces the protocol core made from ``secret_key`` (the load
        generator passes one with its X25519 work done in advance).
        Raises ConnectionClosed or TimeoutError.
        """
        loop = asyncio.get_running_loop()
        if core is None:
            core = ClientConnection(
                secret_key if secret_key is not None else os.urandom(32),
                server_public_key,
                answer_pings=answer_pings,
            )
        async with asyncio.timeout(timeout):
            _, client = await loop.create_connection(
                lambda: cls(core), host, port, local_addr=local_addr
            )
            try:
                await client._handshake_done
                if confirm:
                    await client.ping()
            except BaseException:
                client.abort()
                raise
        return client

    # -- asyncio.Protocol ------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass
        transport.write(self.core.take_outbox())

    def data_received(self, data: bytes) -> None:
        try:
            packets = self.core.receive(data)
        except ProtocolViolation as violation:
            self._fail(f"relay broke {violation.rule}: {violation.detail}")
            return
        if self.core.state is ClientState.CONNECTED and not self._handshake_done.done():
            self._handshake_done.set_result(None)
        self._flush()
        events = []
        for packet in packets:
            if isinstance(packet, Pong):
                waiter = self._pong_waiters.pop(packet.ping_id, None)
                if waiter is not None:
                    if not waiter.done():
                        waiter.set_result(None)
                    continue
            events.append(packet)
        callback = self.on_packets
        if callback is not None:
            if events:
                callback(events)
                self._flush()
            return
        self._events.extend(events)
        if events and self._event_waiter is not None and not self._event_waiter.done():
            self._event_waiter.set_result(None)
        if len(self._events) >= EVENT_QUEUE_LIMIT and not self._reading_paused:
            self._reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc}" if exc else "closed by the relay")

    # -- sending ---------------------------------------------------------------

    def _flush(self) -> None:
        if self.core.outbox and self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.core.take_outbox())

    def send(self, packet: Packet) -> None:
        self.core.send(packet)
        self._flush()

    def queue(self, packet: Packet) -> None:
        """Frame ``packet`` without writing it yet (``flush`` writes)."""
        self.core.send(packet)

    def flush(self) -> None:
        """Write every queued frame in one transport write."""
        self._flush()

    def send_plain(self, plain: bytes) -> None:
        """Any plaintext in a valid frame (for tests of the relay's rules)."""
        self.core.send_plain(plain)
        self._flush()

    def send_raw(self, data: bytes) -> None:
        """Bytes straight onto the stream, bypassing framing."""
        assert self.transport is not None
        self.transport.write(data)

    def route_request(self, public_key: bytes) -> None:
        self.send(RoutingRequest(public_key))

    def disconnect(self, connection_id: int) -> None:
        self.send(DisconnectNotification(connection_id))

    def send_data(self, connection_id: int, payload: bytes) -> None:
        self.send(RoutedData(connection_id, payload))

    def send_oob(self, public_key: bytes, data: bytes) -> None:
        self.send(OobSend(public_key, data))

    async def ping(self, timeout: float = 10.0) -> float:
        """Round trip of one PING (seconds)."""
        loop = asyncio.get_running_loop()
        ping_id = os.urandom(8)
        waiter = loop.create_future()
        self._pong_waiters[ping_id] = waiter
        started = loop.time()
        self.send(Ping(ping_id))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.wait([waiter, self.closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._pong_waiters.pop(ping_id, None)
        if not waiter.done():
            raise ConnectionClosed(self.closed.result())
        return loop.time() - started

    # -- receiving -------------------------------------------------------------

    def pending_events(self) -> list[Packet]:
        """Every queued event, without waiting."""
        events = list(self._events)
        self._events.clear()
        self._resume_if_drained()
        return events

    async def next_event(self, timeout: float | None = 10.0) -> Packet:
        """The next packet from the relay; ConnectionClosed once closed and drained."""
        async with asyncio.timeout(timeout):
            while not self._events:
                if self.closed.done():
                    raise ConnectionClosed(self.closed.result())
                self._event_waiter = asyncio.get_running_loop().create_future()
                await asyncio.wait(
                    [self._event_waiter, self.closed], return_when=asyncio.FIRST_COMPLETED
                )
        event = self._events.popleft()
        self._resume_if_drained()
        return event

    async def expect(self, kind: type[PacketT], timeout: float = 10.0) -> PacketT:
        """The next event, which must be of ``kind`` (AssertionError otherwise)."""
        event = await self.next_event(timeout)
        if not isinstance(event, kind):
            raise AssertionError(f"expected {kind.__name__}, got {event!r}")
        return event

    def _resume_if_drained(self) -> None:
        if self._reading_paused and len(self._events) < EVENT_QUEUE_LIMIT // 2:
            self._reading_paused = False
            if self.transport is not None:
                self.transport.resume_reading()

    # -- closing ---------------------------------------------------------------

    def _fail(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        if not self._handshake_done.done():
            self._handshake_done.set_exception(ConnectionClosed(reason))
        if self._event_waiter is not None and not self._event_waiter.done():
            self._event_waiter.set_result(None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.abort()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    async def close(self) -> None:
        """Close our side and wait until the socket is gone."""
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        if not self.closed.done():
            try:
                async with asyncio.timeout(5):
                    await asyncio.shield(self.closed)
            except TimeoutError:
                self.abort()
