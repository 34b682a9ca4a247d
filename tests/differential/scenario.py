"""A small framework for differential scenarios (tox-bootstrapd 0.2.18 vs our relay).

A *scenario* is an ``async def run(endpoint, rec)``. It opens named clients through the
:class:`Recorder`, performs steps and, after each step, calls ``await rec.settle(label)``.
Settling waits until no client has received anything for :data:`QUIET_S` (capped at
:data:`SETTLE_CAP_S`, tox-bootstrapd-reference.md §6; on a loaded machine it first waits,
within the cap, for the number of events the step expects) and then appends a
:class:`StepRecord` to the transcript: per client, in name order, the packets received
during the step (server PINGs left out) and whether the relay has closed the connection.

Public keys inside packets are replaced by *identity names*, so transcripts from two runs
(fresh random keys each) compare equal. Each client has a name and an identity; several
clients may share an identity (same long-term key, R-CONF-3) and keys that never connect
are identities too (``rec.key("X")``). Routing-response ids, notification ids, ping ids
and data payloads are kept exactly.

Events are kept per connection, so the relative order of events on *different*
connections within a step does not matter (tcp-relay-protocol.md R-ORDER-4), while the
order on one connection does.

``settle`` also takes the expected outcome of the step (``expect=`` events per client
name, ``closed=`` the set of clients the relay must have closed by then). Expectations
are stored next to the record, are not part of the comparison, and are checked by
:func:`expectation_failures`, so a test can assert the key outcomes explicitly for our
relay and cannot pass when both relays are equally wrong.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from cluster.client import RelayClient
from relaycore.client import ClientConnection
from relaycore.crypto import public_key_of
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    Forwarding,
    OnionResponse,
    OobReceive,
    Packet,
    Ping,
    Pong,
    RoutedData,
    RoutingResponse,
)

#: A step is over once no client has received anything for this long (spec: >= 250 ms).
QUIET_S = 0.25
#: ... or after this long in any case.
SETTLE_CAP_S = 1.5
CONNECT_TIMEOUT_S = 5.0
SCENARIO_TIMEOUT_S = 25.0


# ---------------------------------------------------------------------------
# Endpoints and events
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Endpoint:
    """Where a relay listens and its long-term public key."""

    host: str
    port: int
    server_pk: bytes


class Blob(bytes):
    """Bytes that compare exactly but print short (long payloads in failure messages)."""

    def __repr__(self) -> str:
        if len(self) <= 24:
            return bytes.__repr__(bytes(self))
        digest = hashlib.sha256(self).hexdigest()[:12]
        return f"<{len(self)} bytes {bytes(self[:8]).hex()}.. sha256 {digest}>"


Event = tuple[object, ...]


def route(connection_id: int, name: str) -> Event:
    """ROUTING_RESPONSE ``01 rpid pk`` (pk given as identity name)."""
    return ("route", connection_id, name)


def connected(connection_id: int) -> Event:
    """CONNECTION_NOTIFICATION ``02 id``."""
    return ("connect", connection_id)


def disconnected(connection_id: int) -> Event:
    """DISCONNECT_NOTIFICATION ``03 id``."""
    return ("disconnect", connection_id)


def pong(ping_id: bytes) -> Event:
    """PONG ``05 ping_id``."""
    return ("pong", Blob(ping_id))


def oob(sender: str, data: bytes) -> Event:
    """OOB_RECV ``07 sender_pk data``."""
    return ("oob", sender, Blob(data))


def data(connection_id: int, payload: bytes) -> Event:
    """Routed data ``id payload``."""
    return ("data", connection_id, Blob(payload))


def onion(response: bytes) -> Event:
    """ONION_RESPONSE ``09 response`` (onion-over-tcp.md R-ORET-6)."""
    return ("onion", Blob(response))


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientRecord:
    """What one client saw during one step.

    ``handshake``: "none" (no byte from the relay yet), "partial" (some bytes, reply
    incomplete) or "done". ``closed``: False, True (the relay closed the socket) or
    ``"violation: ..."`` (the relay sent something no relay may send).
    """

    name: str
    events: tuple[Event, ...]
    closed: bool | str
    handshake: str = "done"


@dataclass(frozen=True)
class StepRecord:
    label: str
    clients: tuple[ClientRecord, ...]
    # Expectations: not part of the comparison between relays.
    expect: Mapping[str, Sequence[Event]] | None = field(default=None, compare=False)
    expect_closed: frozenset[str] | None = field(default=None, compare=False)
    expect_handshake: Mapping[str, str] | None = field(default=None, compare=False)

    def __getitem__(self, name: str) -> ClientRecord:
        for record in self.clients:
            if record.name == name:
                return record
        raise KeyError(name)

    def names(self) -> list[str]:
        return [record.name for record in self.clients]


Transcript = list[StepRecord]


def expectation_failures(transcript: Transcript) -> list[str]:
    """Every step whose record does not meet the expectations given to ``settle``."""
    failures = []
    for step in transcript:
        if step.expect is not None:
            for name, expected in step.expect.items():
                try:
                    got = step[name].events
                except KeyError:
                    failures.append(f"[{step.label}] no client named {name!r}")
                    continue
                if tuple(expected) != got:
                    failures.append(
                        f"[{step.label}] {name}: expected {list(expected)!r}, got {list(got)!r}"
                    )
        if step.expect_closed is not None:
            for record in step.clients:
                should = record.name in step.expect_closed
                if bool(record.closed) != should or isinstance(record.closed, str):
                    failures.append(
                        f"[{step.label}] {record.name}: expected "
                        f"{'closed' if should else 'open'}, got closed={record.closed!r}"
                    )
            for name in step.expect_closed - set(step.names()):
                failures.append(f"[{step.label}] no client named {name!r}")
        for name, state in (step.expect_handshake or {}).items():
            got_state = step[name].handshake if name in step.names() else "absent"
            if got_state != state:
                failures.append(
                    f"[{step.label}] {name}: handshake {got_state!r}, expected {state!r}"
                )
    return failures


def format_record(record: ClientRecord) -> str:
    hs = "" if record.handshake == "done" else f" handshake={record.handshake}"
    return f"{record.name}: closed={record.closed!r}{hs} events={list(record.events)!r}"


def transcript_diff(left_name: str, left: Transcript, right_name: str, right: Transcript) -> str:
    """Human-readable differences between two transcripts ('' when equal)."""
    lines = []
    for index in range(max(len(left), len(right))):
        a = left[index] if index < len(left) else None
        b = right[index] if index < len(right) else None
        if a == b:
            continue
        label = (a or b).label  # type: ignore[union-attr]
        lines.append(f"step {index} [{label}]:")
        if a is None or b is None:
            lines.append(f"  only {left_name if b is None else right_name} has this step")
            continue
        if a.label != b.label:
            lines.append(f"  labels differ: {a.label!r} / {b.label!r}")
        for name in sorted(set(a.names()) | set(b.names())):
            ra = a[name] if name in a.names() else None
            rb = b[name] if name in b.names() else None
            if ra != rb:
                lines.append(f"  {left_name:>14}: {format_record(ra) if ra else name + ' absent'}")
                lines.append(f"  {right_name:>14}: {format_record(rb) if rb else name + ' absent'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# Clients
# ---------------------------------------------------------------------------


class ScenarioClient(RelayClient):
    """``RelayClient`` that notes when it last heard from the relay.

    With ``send_hello=False`` nothing is written on connect; the 128-byte hello is left
    in :attr:`hello` for the scenario to write itself (in pieces, corrupted, ...).
    """

    def __init__(self, core: ClientConnection, *, send_hello: bool = True) -> None:
        super().__init__(core)
        self.name = ""
        self.send_hello = send_hello
        self.hello = b""
        self.rx_bytes = 0
        self.last_activity = asyncio.get_running_loop().time()

    def _touch(self) -> None:
        self.last_activity = asyncio.get_running_loop().time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.send_hello:
            super().connection_made(transport)
        else:
            self.transport = transport  # type: ignore[assignment]
            self.hello = self.core.take_outbox()

    def data_received(self, data: bytes) -> None:
        self.rx_bytes += len(data)
        self._touch()
        super().data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._touch()
        super().connection_lost(exc)

    # -- sending helpers --------------------------------------------------------

    def frame(self, plain: bytes) -> bytes:
        """One encrypted frame of ``plain`` (uses the next nonce), not sent."""
        if self.core.channel is None:
            raise RuntimeError(f"{self.name}: no session yet")
        return self.core.channel.encrypt(plain)

    def send_frames(self, *plains: bytes) -> None:
        """Several plaintexts as frames in ONE write."""
        self.send_raw(b"".join(self.frame(plain) for plain in plains))

    async def wait_handshake(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout):
            await asyncio.shield(self._handshake_done)

    @property
    def handshake_state(self) -> str:
        if self.core.channel is not None:
            return "done"
        return "partial" if self.rx_bytes else "none"

    def closed_state(self) -> bool | str:
        if not self.closed.done():
            return False
        reason = self.closed.result()
        if reason.startswith("relay broke"):
            return f"violation: {reason}"
        return True


# ---------------------------------------------------------------------------
# Recorder
# ---------------------------------------------------------------------------


class Recorder:
    """Clients, identities and the transcript of one scenario run on one relay."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.clients: dict[str, ScenarioClient] = {}
        self.transcript: Transcript = []
        self._secrets: dict[str, bytes] = {}
        self._names_by_key: dict[bytes, str] = {}

    # -- identities ---------------------------------------------------------------

    def secret(self, identity: str) -> bytes:
        """Secret key of ``identity`` (fresh random, created on first use)."""
        if identity not in self._secrets:
            secret = os.urandom(32)
            self._secrets[identity] = secret
            self._names_by_key[public_key_of(secret)] = identity
        return self._secrets[identity]

    def key(self, identity: str) -> bytes:
        """Public key of ``identity`` (connected or not)."""
        return public_key_of(self.secret(identity))

    def name_of(self, public_key: bytes) -> str:
        return self._names_by_key.get(public_key, f"unknown-key:{public_key.hex()}")

    # -- clients ------------------------------------------------------------------

    def __getitem__(self, name: str) -> ScenarioClient:
        return self.clients[name]

    def _register(self, name: str, client: ScenarioClient) -> ScenarioClient:
        if name in self.clients:
            raise ValueError(f"client {name!r} exists already")
        client.name = name
        self.clients[name] = client
        return client

    async def connect(
        self, name: str, *, identity: str | None = None, confirm: bool = True
    ) -> ScenarioClient:
        """Handshake as ``identity`` (default: ``name``); ``confirm`` sends a PING first."""
        ep = self.endpoint
        client = await ScenarioClient.connect(
            ep.host,
            ep.port,
            ep.server_pk,
            secret_key=self.secret(identity or name),
            timeout=CONNECT_TIMEOUT_S,
            confirm=confirm,
        )
        assert isinstance(client, ScenarioClient)
        return self._register(name, client)

    async def connect_all(self, *names: str, confirm: bool = True) -> list[ScenarioClient]:
        """Several clients (each its own identity), concurrently."""
        return list(await asyncio.gather(*(self.connect(n, confirm=confirm) for n in names)))

    async def open_raw(
        self, name: str, *, identity: str | None = None, server_pk: bytes | None = None
    ) -> ScenarioClient:
        """A TCP connection on which nothing was written; its hello is in ``.hello``.

        ``server_pk`` overrides the key the hello is encrypted to (wrong-key hellos).
        """
        ep = self.endpoint
        core = ClientConnection(self.secret(identity or name), server_pk or ep.server_pk)
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(CONNECT_TIMEOUT_S):
            _, client = await loop.create_connection(
                lambda: ScenarioClient(core, send_hello=False), ep.host, ep.port
            )
        return self._register(name, client)

    # -- steps ----------------------------------------------------------------------

    async def settle(
        self,
        label: str,
        expect: Mapping[str, Sequence[Event]] | None = None,
        closed: Iterable[str] | None = None,
        handshake: Mapping[str, str] | None = None,
    ) -> StepRecord:
        """Wait for quiet, then record what every client received during the step.

        ``expect``: exact events per client name (clients not named are not checked);
        ``closed``: the clients that must be closed by now (all others must be open);
        ``handshake``: expected handshake state per client name;
        ``None`` leaves that part unchecked.
        """
        closed = frozenset(closed) if closed is not None else None
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline = start + SETTLE_CAP_S
        # Phase 1 (robustness on a loaded machine only): wait until the expected number
        # of events and closes has arrived. It never decides what is recorded.
        while not self._reached(expect, closed) and loop.time() < deadline:
            await asyncio.sleep(0.01)
        # Phase 2: quiet for QUIET_S since the step began or the last activity.
        deadline = max(deadline, loop.time() + QUIET_S)
        while True:
            now = loop.time()
            last = max([start, *(c.last_activity for c in self.clients.values())])
            quiet_left = QUIET_S - (now - last)
            cap_left = deadline - now
            if quiet_left <= 0 or cap_left <= 0:
                break
            await asyncio.sleep(min(quiet_left, cap_left) + 0.005)
        records = []
        for name in sorted(self.clients):
            client = self.clients[name]
            events = tuple(
                self._render(packet)
                for packet in client.pending_events()
                if not isinstance(packet, Ping)
            )
            records.append(
                ClientRecord(name, events, client.closed_state(), client.handshake_state)
            )
        step = StepRecord(
            label,
            tuple(records),
            expect=dict(expect) if expect is not None else None,
            expect_closed=closed,
            expect_handshake=dict(handshake) if handshake is not None else None,
        )
        self.transcript.append(step)
        return step

    def _reached(
        self, expect: Mapping[str, Sequence[Event]] | None, closed: Iterable[str] | None
    ) -> bool:
        for name, events in (expect or {}).items():
            client = self.clients.get(name)
            if client is not None and not client.closed.done():
                queued = sum(1 for p in client._events if not isinstance(p, Ping))
                if queued < len(events):
                    return False
        for name in closed or ():
            client = self.clients.get(name)
            if client is not None and not client.closed.done():
                return False
        return True

    def _render(self, packet: Packet) -> Event:
        match packet:
            case RoutingResponse(connection_id, public_key):
                return route(connection_id, self.name_of(public_key))
            case ConnectNotification(connection_id):
                return connected(connection_id)
            case DisconnectNotification(connection_id):
                return disconnected(connection_id)
            case Pong(ping_id):
                return pong(ping_id)
            case OobReceive(sender, payload):
                return oob(self.name_of(sender), payload)
            case RoutedData(connection_id, payload):
                return data(connection_id, payload)
            case OnionResponse(payload):
                return onion(payload)
            case Forwarding(payload):
                return ("forwarding", Blob(payload))
        return ("other", repr(packet))

    async def close_all(self) -> None:
        """Abort every client socket (the relays' reaction is not part of any step)."""
        for client in self.clients.values():
            client.abort()
        await asyncio.sleep(0)
        for client in self.clients.values():
            future = client._handshake_done
            if future.done() and not future.cancelled():
                future.exception()  # mark retrieved: no "never retrieved" warnings


# ---------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------

ScenarioFn = Callable[[Endpoint, Recorder], Awaitable[None]]


async def run_scenario(scenario: ScenarioFn, endpoint: Endpoint) -> Transcript:
    """One run of ``scenario`` against one relay."""
    rec = Recorder(endpoint)
    try:
        async with asyncio.timeout(SCENARIO_TIMEOUT_S):
            await scenario(endpoint, rec)
    finally:
        with contextlib.suppress(Exception):
            await rec.close_all()
    return rec.transcript


class ScenarioError(Exception):
    """A scenario raised on one of the relays (the message names which)."""


async def run_on_all(
    scenario: ScenarioFn, endpoints: Mapping[str, Endpoint]
) -> dict[str, Transcript]:
    """Run ``scenario`` against every endpoint concurrently; transcripts by endpoint name."""
    names = list(endpoints)
    results = await asyncio.gather(
        *(run_scenario(scenario, endpoints[n]) for n in names), return_exceptions=True
    )
    errors = [(n, r) for n, r in zip(names, results, strict=True) if isinstance(r, BaseException)]
    if errors:
        name, error = errors[0]
        others = ", ".join(n for n, _ in errors[1:])
        raise ScenarioError(
            f"scenario raised on {name}: {error!r}" + (f" (also on {others})" if others else "")
        ) from error
    return {n: r for n, r in zip(names, results, strict=True)}  # type: ignore[misc]
