"""``throughput`` and ``oob``: pairs of clients echoing windows of packets.

Each pair is linked (throughput: routing requests both ways, both connect
notifications) or just connected (oob: OOB packets go to a public key). From
t0 both clients of a pair keep ``window`` originals of ``size`` bytes in
flight to the other, which echoes each one back at once; every echo lets the
sender send the next original and gives one round-trip sample. Frames are
counted when received, so "relayed frames" is what the relay delivered.
After warm-up and the measured window no new originals are sent; the echoes
still missing after ``drain`` seconds are the lost packets.
"""

from __future__ import annotations

import asyncio
import math
import time

from cluster.loadtest.clients import (
    LinkError,
    LoadClient,
    close_all,
    failure_cause,
    link,
)
from cluster.loadtest.identity import Identity
from cluster.loadtest.modes.base import ModeRunner, in_lanes, sleep_until
from cluster.loadtest.payload import (
    ECHO,
    HEADER,
    HEADER_SIZE,
    ORIGINAL,
    SEQUENCE_MODULUS,
    original,
)
from cluster.loadtest.spec import WorkerSpec
from relaycore.crypto import buffer_of
from relaycore.framing import PLAINTEXT
from relaycore.packets import (
    DisconnectNotification,
    OobSend,
    Packet,
    Ping,
    Pong,
    RoutedData,
    encode,
)

INTERRUPTED_DRAIN_S = 1.0  # at most this long waiting for echoes after Ctrl-C
DRAIN_POLL_S = 0.01
_HALF_SEQUENCE = SEQUENCE_MODULUS // 2
OOB_RECV = 7  # packet id (tcp-relay-protocol.md); its data follows the sender's key
OOB_DATA = 1 + 32
_PLAINTEXT_BYTES = buffer_of(PLAINTEXT)
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack_into


def data_on(connection_id: int) -> bytes:
    """The plaintext prefix of routed data on ``connection_id`` (the payload follows).

    Endpoints build plaintexts as prefix + payload and frame them directly
    (``LoadClient.queue_plain``): no packet object and no ``encode`` per frame,
    the same bytes as ``encode(RoutedData(connection_id, payload))``."""
    return encode(RoutedData(connection_id, b""))


def oob_to(public_key: bytes) -> bytes:
    """The plaintext prefix of an OOB packet to ``public_key`` (see ``data_on``)."""
    return encode(OobSend(public_key, b""))


class Endpoint:
    """One client of a pair: originates, echoes, and times its echoes."""

    __slots__ = (
        "run",
        "client",
        "wrap",
        "wrap_id",
        "offset",
        "peer",
        "sent",
        "echoed",
        "next_echo",
        "next_original",
        "frames",
    )

    def __init__(
        self,
        run: TrafficRunner,
        client: LoadClient,
        wrap: bytes,
        peer: int | bytes,
    ) -> None:
        self.run = run
        self.client = client
        self.wrap = wrap  # plaintext prefix of the packet that carries a payload to the partner
        self.wrap_id = wrap[0]  # its packet id (our connection id, or OOB_SEND)
        self.offset = len(wrap)  # where the payload starts, in our packets and the partner's
        self.peer = peer  # connection id (data) or public key (OOB) the partner's packets carry
        self.sent = 0
        self.echoed = 0
        self.next_echo = 0
        self.next_original = 0
        self.frames = 0  # handed over by on_frame since the last on_frames_done

    @property
    def in_flight(self) -> int:
        return self.sent - self.echoed

    def originate(self, count: int) -> None:
        """Queue ``count`` new originals (written by the caller's flush)."""
        filler = self.run.filler
        for _ in range(count):
            self.client.queue_plain(self.wrap + original(self.sent, time.perf_counter(), filler))
            self.sent += 1

    def on_packets(self, packets: list[Packet]) -> None:
        """Control packets the client decoded. Routed data and OOB receive
        frames never come here: ``LoadClient`` hands them to ``on_frame``."""
        errors = self.run.result.errors
        for packet in packets:
            kind = type(packet)
            if kind is Ping or kind is Pong:
                continue  # server pings are answered by the protocol core
            if kind is DisconnectNotification:
                errors["disconnected"] += 1
            else:
                errors["unexpected packet"] += 1

    def on_frame(self, size: int, now: float) -> None:
        """One routed data / OOB receive frame, its plaintext in PLAINTEXT
        (``LoadClient``'s fast path; same checks as ``on_packets``). An
        original is echoed from PLAINTEXT itself: the echo is the same bytes
        but the packet id (routed data: our id; OOB: OOB_SEND, the sender's
        key becoming the destination) and the kind byte -- one seal, no copy.
        An echo makes room for the next original, written over it the same
        way (the filler is this process's, the one our original carried)."""
        run = self.run
        offset = self.offset
        if size - offset != run.size:
            run.result.errors["bad payload"] += 1
            return
        if run.oob:
            if PLAINTEXT[0] != OOB_RECV:
                run.result.errors["unexpected packet"] += 1
                return
            if _PLAINTEXT_BYTES[1:OOB_DATA] != self.peer:
                run.result.errors["misdelivered"] += 1
                return
        elif PLAINTEXT[0] != self.peer:
            run.result.errors["misdelivered"] += 1
            return
        flag, sequence, sent_at = _unpack_header(_PLAINTEXT_BYTES, offset)
        self.frames += 1
        core = self.client.core
        if flag == ORIGINAL:
            if (sequence - self.next_original) % SEQUENCE_MODULUS >= _HALF_SEQUENCE:
                run.result.errors["out of order"] += 1
            self.next_original = (sequence + 1) % SEQUENCE_MODULUS
            PLAINTEXT[0] = self.wrap_id
            PLAINTEXT[offset] = ECHO
            core.outbox += core.channel.seal_frame(size)  # type: ignore[union-attr]
            return
        self.echoed += 1
        if (sequence - self.next_echo) % SEQUENCE_MODULUS >= _HALF_SEQUENCE:
            run.result.errors["out of order"] += 1
        self.next_echo = (sequence + 1) % SEQUENCE_MODULUS
        if run.measure_from <= now < run.measure_until:
            run.result.latency.add(now - sent_at)
        if run.originating and self.sent - self.echoed < run.window:
            # The next original in place of the echo: same size, same filler
            # (this process's), our packet id, a new header.
            PLAINTEXT[0] = self.wrap_id
            _pack_header(
                _PLAINTEXT_BYTES,
                offset,
                ORIGINAL,
                self.sent % SEQUENCE_MODULUS,
                time.perf_counter(),
            )
            core.outbox += core.channel.seal_frame(size)  # type: ignore[union-attr]
            self.sent += 1

    def on_frames_done(self, now: float) -> None:
        """The end of a read that brought frames: count them once."""
        if self.frames:
            self.run.count_frames(now, self.frames)
            self.frames = 0


class TrafficRunner(ModeRunner):
    """Routed data (``throughput``) or OOB (``oob``) echo traffic between pairs."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.oob = self.options.mode == "oob"
        self.size = self.options.size
        self.window = self.options.window
        self.filler = self.random.bytes(self.size - HEADER_SIZE)
        self.endpoints: list[Endpoint] = []
        self.originating = False
        self.measure_from = math.inf
        self.measure_until = -math.inf
        self.frames_total = 0

    # -- setup ---------------------------------------------------------------

    async def setup(self) -> None:
        keys = [(self.identity(), self.identity()) for _ in range(self.spec.units)]

        async def open_pair(i: int) -> None:
            await self._open_pair(2 * i, *keys[i])

        await in_lanes(len(keys), self.spec.concurrency, open_pair)
        self.result.counts["pairs"] = self.ready_units

    async def _open_pair(self, n: int, a_key: Identity, b_key: Identity) -> None:
        opened = await asyncio.gather(
            self.connect(a_key, n),
            self.connect(b_key, n + 1, self.options.partner_port),
            return_exceptions=True,
        )
        clients = [c for c in opened if isinstance(c, LoadClient)]
        failures = [e for e in opened if not isinstance(e, LoadClient)]
        for failure in failures:
            if isinstance(failure, asyncio.CancelledError):
                raise failure
            self.result.errors[f"connect: {failure_cause(failure)}"] += 1
        if failures:
            await close_all(clients)
            return
        a, b = clients
        if self.oob:
            a_peer: int | bytes = b.public_key
            b_peer: int | bytes = a.public_key
            a_wrap, b_wrap = oob_to(b.public_key), oob_to(a.public_key)
        else:
            try:
                a_id, b_id = await link(a, b, self.options.link_timeout)
            except LinkError as error:
                self.result.errors[f"link: {error.cause}"] += 1
                await close_all([a, b])
                return
            a_peer, b_peer = a_id, b_id
            a_wrap, b_wrap = data_on(a_id), data_on(b_id)
        for client, wrap, peer in ((a, a_wrap, a_peer), (b, b_wrap, b_peer)):
            endpoint = Endpoint(self, client, wrap, peer)
            client.pending_events()  # leftovers of the link phase
            client.on_packets = endpoint.on_packets
            client.on_frame = endpoint.on_frame
            client.on_frames_done = endpoint.on_frames_done
            self.endpoints.append(endpoint)
            self.keep(client)
        self.ready_units += 1

    # -- run -----------------------------------------------------------------

    def events(self) -> int:
        return self.frames_total

    def count_frames(self, now: float, frames: int) -> None:
        self.frames_total += frames
        assert self.t0 is not None
        self.result.timeline.add(now - self.t0, frames)
        if self.measure_from <= now < self.measure_until:
            counts = self.result.counts
            counts["frames"] += frames
            counts["payload bytes"] += frames * self.size

    async def run(self, t0: float, stop: asyncio.Event) -> None:
        options = self.options
        self.t0 = t0
        self.measure_from = t0 + options.warmup
        self.measure_until = self.measure_from + options.duration
        self.result.window_start = self.measure_from
        self.result.window_end = self.measure_until
        if not await sleep_until(t0, stop):
            self.originating = True
            for endpoint in self.endpoints:
                endpoint.originate(self.window)
                endpoint.client.flush()
            await sleep_until(self.measure_until, stop)
        now = time.perf_counter()
        if now < self.measure_until:  # stopped early: the window ends here
            self.measure_until = self.result.window_end = now
        self.originating = False
        drain = min(options.drain, INTERRUPTED_DRAIN_S) if stop.is_set() else options.drain
        drain_until = time.perf_counter() + drain
        while time.perf_counter() < drain_until and any(e.in_flight for e in self.endpoints):
            await asyncio.sleep(DRAIN_POLL_S)
        self.result.timeline.add(time.perf_counter() - t0, 0)  # spans the run
        counts = self.result.counts
        counts["sent"] = sum(e.sent for e in self.endpoints)
        counts["echoed"] = sum(e.echoed for e in self.endpoints)
        counts["frames total"] = self.frames_total
