"""The load generator's client: ``cluster.client.RelayClient`` with a fast receive path.

``LoadClient`` hands incoming packets straight from ``data_received`` to a
callback (the ``ops/bench/pair_compare.py`` idea: no task switch per packet,
so timings are not dominated by the event loop), and lets the callback queue
several frames and write them with one ``flush()``. Also: opening a
connection from a chosen source address, classifying why one failed, and
linking two clients (routing requests both ways, both notifications).
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable

from cluster.client import ConnectionClosed, RelayClient
from cluster.loadtest.identity import Identity, LoadCore
from relaycore.constants import NUM_RESERVED_PORTS
from relaycore.crypto import buffer_of
from relaycore.errors import ProtocolViolation
from relaycore.framing import PLAINTEXT
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    Ping,
    Pong,
    RoutingResponse,
    decode_server_packet,
    encode,
)

OOB_RECV = 7  # packet id of an OOB receive: sender key (32 bytes), then data (R-OOB-2)
OOB_DATA = 1 + 32
_PLAINTEXT_BYTES = buffer_of(PLAINTEXT)

# Failure causes, as reported.
REFUSED = "refused"
RESET = "reset"
TIMEOUT = "timeout"
BAD_REPLY = "bad reply"
NO_ADDRESS = "no source port"
OTHER = "other"


class LinkError(Exception):
    """A pair could not be linked; ``cause`` is one of the reported causes."""

    def __init__(self, cause: str) -> None:
        super().__init__(cause)
        self.cause = cause


class LoadClient(RelayClient):
    """The generator's client: ``RelayClient`` with its ``on_packets`` fast path
    (packets straight from ``data_received`` to the mode's callback; frames
    queued there leave in one write), and a faster one, ``on_frame``: each
    routed data and OOB receive frame (the traffic modes' frames) is handed
    over while its plaintext is in ``relaycore.framing.PLAINTEXT``, undecoded
    and uncopied -- the relay's own trick, so that the generator costs no more
    per frame than the relay. Every other packet still takes the
    ``on_packets`` path, in stream order, pings answered. ``on_frames_done``
    is called once per read that handed frames over."""

    on_frame: Callable[[int, float], None] | None = None  # (plaintext size, read time)
    on_frames_done: Callable[[float], None] | None = None

    def data_received(self, data: bytes) -> None:
        handler = self.on_frame
        core = self.core
        channel = core.channel
        if handler is None or channel is None or self.on_packets is None:
            super().data_received(data)
            return
        now = time.perf_counter()
        handed = False
        frames = channel.open_frames(data)
        try:
            for size in frames:
                kind = PLAINTEXT[0]
                if kind >= NUM_RESERVED_PORTS or (kind == OOB_RECV and size > OOB_DATA):
                    handler(size, now)
                    handed = True
                    continue
                packet = decode_server_packet(_PLAINTEXT_BYTES[:size])
                if isinstance(packet, Ping):
                    core.outbox += channel.encrypt(encode(Pong(packet.ping_id)))
                elif isinstance(packet, Pong) and packet.ping_id in self._pong_waiters:
                    waiter = self._pong_waiters.pop(packet.ping_id)
                    if not waiter.done():
                        waiter.set_result(None)
                    continue
                self.on_packets([packet])
        except ProtocolViolation as violation:
            self._fail(f"relay broke {violation.rule}: {violation.detail}")
            return
        finally:
            frames.close()
        if handed and self.on_frames_done is not None:
            self.on_frames_done(now)
        self._flush()

    def queue_plain(self, plain: bytes) -> None:
        """Frame a plaintext built by the caller, without writing it yet (``flush``)."""
        self.core.send_plain(plain)


def failure_cause(error: BaseException) -> str:
    """refused / reset / timeout / bad reply / no source port / other."""
    if isinstance(error, TimeoutError):
        return TIMEOUT
    if isinstance(error, ConnectionRefusedError):
        return REFUSED
    if isinstance(error, ConnectionResetError | ConnectionAbortedError | BrokenPipeError):
        return RESET
    if isinstance(error, ConnectionClosed):
        # "relay broke R-...": the reply (or a frame) was not what a relay may send.
        return BAD_REPLY if error.reason.startswith("relay broke") else RESET
    if isinstance(error, OSError) and error.errno == errno.EADDRNOTAVAIL:
        return NO_ADDRESS
    return OTHER


async def open_client(
    address: str,
    port: int,
    server_public_key: bytes,
    identity: Identity,
    source_address: str | None,
    timeout: float,
) -> LoadClient:
    """Handshake plus the confirming PING round trip (as toxcore); raises on failure."""
    client = await LoadClient.connect(
        address,
        port,
        server_public_key,
        local_addr=(source_address, 0) if source_address else None,
        timeout=timeout,
        core=LoadCore(identity, server_public_key),
    )
    assert isinstance(client, LoadClient)
    return client


async def await_link(client: LoadClient, peer_key: bytes) -> int:
    """Wait for the RoutingResponse for ``peer_key`` and its ConnectNotification; the id."""
    connection_id: int | None = None
    connected: set[int] = set()
    while connection_id is None or connection_id not in connected:
        try:
            event = await client.next_event(timeout=None)
        except ConnectionClosed:
            raise LinkError("closed while linking") from None
        if isinstance(event, RoutingResponse) and event.public_key == peer_key:
            if event.connection_id == 0:
                raise LinkError("routing refused")
            connection_id = event.connection_id
        elif isinstance(event, ConnectNotification):
            connected.add(event.connection_id)
        elif isinstance(event, DisconnectNotification):
            connected.discard(event.connection_id)
    return connection_id


async def link(a: LoadClient, b: LoadClient, timeout: float) -> tuple[int, int]:
    """Route a and b to each other; (a's id for b, b's id for a). LinkError on failure."""
    a.route_request(b.public_key)
    b.route_request(a.public_key)
    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            a_side = group.create_task(await_link(a, b.public_key))
            b_side = group.create_task(await_link(b, a.public_key))
    except TimeoutError:
        raise LinkError("link timeout") from None
    except ExceptionGroup as failed:  # one side failed; the TaskGroup cancelled the other
        first = failed.exceptions[0]
        if isinstance(first, LinkError):
            raise first from None
        raise
    return a_side.result(), b_side.result()


async def close_all(clients: list[LoadClient]) -> None:
    """Close every client (errors ignored)."""
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
