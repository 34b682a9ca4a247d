"""Two real toxcore clients become friends through one TCP relay and talk.

The end-to-end scenario of the interop tests and of ``ops/bench/friends_compare.py``:
two libtoxcore 0.2.18 clients (public ``tox.h`` API, :mod:`testbed.toxcore`)
with UDP, IPv6 and LAN discovery off and no TCP server of their own. Each knows one
TCP relay -- the relay under test -- and a few DHT nodes of a private DHT on loopback
(``tox_bootstrap``). With UDP off a client never talks to the DHT nodes itself: it
builds onion paths whose first hop is its TCP relay (TCP packet types 8/9,
onion-over-tcp.md) and whose next hops are those UDP nodes. Friend discovery (onion
announce and search, the friend request, the DHT-key exchange) goes that way; the
friend connection itself is then routed by the relay (routing request, data).

Steps, each bounded by a deadline:

1. A sends a friend request to B's address; B accepts it on its callback.
2. Both wait until the friend is connected (``TOX_CONNECTION_TCP``).
3. Messages both ways (contents and order checked), then timed round trips: A sends,
   B's message callback echoes, A's callback stops the clock.
4. A sends B a file of random bytes; B checks every byte (and the SHA-256).
5. No other path: the process's TCP sockets all lead to the relay's ports, no UDP
   socket was opened, and the bytes on the sockets to the relay (``TCP_INFO``) cover
   the file in both directions.

Both clients live in the calling thread: :func:`run_friends_scenario` creates them,
iterates them in turns (waking early when one of their sockets becomes readable) and
kills them, so no toxcore instance is ever touched by two threads.
"""

from __future__ import annotations

import hashlib
import os
import select
import statistics
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from testbed.bootstrapd import DhtNode
from testbed.toxcore import (
    CONNECTION_NAMES,
    TOX_CONNECTION_NONE,
    TOX_FILE_CONTROL_RESUME,
    TOX_FILE_KIND_DATA,
    ToxClient,
    own_socket_fds,
    tcp_byte_counts,
)

#: Both clients announced through the onion (self status TCP); fails fast when the
#: relay does not carry onion packets (7-8 s with tox-bootstrapd as the relay: toxcore's
#: announce timers, not the relay, set this).
SELF_CONNECT_TIMEOUT_S = 25.0
FRIEND_CONNECT_TIMEOUT_S = 45.0
MESSAGE_TIMEOUT_S = 10.0
FILE_TIMEOUT_S = 30.0
TOTAL_TIMEOUT_S = 90.0
#: Longest sleep between two rounds of ``tox_iterate`` while nothing is readable.
#: toxcore does not always write at once what a callback sent (e.g. B's echo), so a
#: longer sleep shows up in the measured RTT: with 20 ms, the echo RTT through our
#: relay had p95 40-170 ms (median < 1 ms); with 1 ms, p95 < 6 ms. File speed did not
#: change (toxcore's own pacing limits it to ~0.5 MB/s here).
MAX_POLL_S = 0.001
_FD_REFRESH_S = 0.2


@dataclass(frozen=True)
class RelayEndpoint:
    """Where a client reaches the relay under test (a shared or a per-shard port)."""

    host: str
    port: int
    public_key: bytes


@dataclass
class ScenarioConfig:
    messages_each_way: int = 5
    rtt_rounds: int = 20
    file_size: int = 512 * 1024
    self_connect_timeout_s: float = SELF_CONNECT_TIMEOUT_S
    friend_connect_timeout_s: float = FRIEND_CONNECT_TIMEOUT_S
    message_timeout_s: float = MESSAGE_TIMEOUT_S
    file_timeout_s: float = FILE_TIMEOUT_S
    total_timeout_s: float = TOTAL_TIMEOUT_S  # caps the sum of all the steps


@dataclass
class SocketReport:
    """One TCP socket of this process at the end of the scenario."""

    local_port: int
    remote_host: str
    remote_port: int
    state: str
    bytes_sent: int | None
    bytes_received: int | None


@dataclass
class FriendsResult:
    """What one run measured (seconds unless said otherwise)."""

    self_connected_s: float  # clients created -> both report TOX_CONNECTION_TCP for themselves
    friend_request_s: float  # clients created -> B got A's friend request
    friend_connected_s: float  # clients created -> both see the friend as connected
    connection_a: str  # A's friend connection at the end: "TCP" (UDP is off)
    connection_b: str
    rtts: list[float]
    file_size: int
    file_s: float  # tox_file_send -> B has the last byte
    sockets: list[SocketReport]
    new_udp_sockets: int
    log_tail: list[str] = field(default_factory=list)

    @property
    def rtt_median(self) -> float:
        return statistics.median(self.rtts)

    @property
    def rtt_p95(self) -> float:
        return percentile(self.rtts, 95)

    @property
    def file_mb_per_s(self) -> float:
        return self.file_size / self.file_s / 1e6


class ScenarioError(AssertionError):
    """A step did not happen in time or carried wrong data; the message says which."""


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation; p95 of 20 samples is the 19th)."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values")
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


class Peer:
    """One client and what its callbacks saw."""

    def __init__(
        self,
        name: str,
        relay: RelayEndpoint,
        dht_nodes: Sequence[DhtNode],
        client: ToxClient | None = None,
    ) -> None:
        self.name = name
        self.client = client or ToxClient()
        self.client.add_tcp_relay(relay.host, relay.port, relay.public_key)
        for node in dht_nodes:
            self.client.bootstrap(node.host, node.port, node.public_key)
        self.self_connected_at: float | None = None
        self.friend: int | None = None
        self.friend_status = TOX_CONNECTION_NONE
        self.friend_status_at: float | None = None
        self.requests: list[tuple[bytes, bytes, float]] = []
        self.messages: list[tuple[bytes, float]] = []
        self.echo = False
        self.incoming_file: bytearray | None = None
        self.incoming_received = 0
        self.incoming_done_at: float | None = None
        self.outgoing_file: bytes = b""
        self.chunk_requests: deque[tuple[int, int, int]] = deque()
        self.client.on_self_connection_status = self._self_status
        self.client.on_friend_connection_status = self._friend_status
        self.client.on_friend_message = self._message
        self.client.on_file_chunk_request = self._chunk_request
        self.client.on_file_recv = self._file_recv
        self.client.on_file_recv_chunk = self._file_chunk

    def _self_status(self, status: int) -> None:
        if status != TOX_CONNECTION_NONE and self.self_connected_at is None:
            self.self_connected_at = time.monotonic()

    def _friend_status(self, friend: int, status: int) -> None:
        if friend == self.friend:
            self.friend_status = status
            if status != TOX_CONNECTION_NONE and self.friend_status_at is None:
                self.friend_status_at = time.monotonic()

    def _message(self, friend: int, _kind: int, message: bytes) -> None:
        self.messages.append((message, time.perf_counter()))
        if self.echo and friend == self.friend:
            self.client.send_message(friend, message)

    def _chunk_request(self, friend: int, file: int, position: int, length: int) -> None:
        if length:
            self.chunk_requests.append((file, position, length))

    def send_requested_chunks(self) -> None:
        """Send asked-for chunks in order; stop at a full queue and retry later."""
        assert self.friend is not None or not self.chunk_requests
        while self.chunk_requests:
            file, position, length = self.chunk_requests[0]
            data = self.outgoing_file[position : position + length]
            if not self.client.file_send_chunk(self.friend, file, position, data):
                return
            self.chunk_requests.popleft()

    def _file_recv(self, friend: int, file: int, kind: int, size: int, _name: bytes) -> None:
        if kind != TOX_FILE_KIND_DATA:
            return  # avatars: not part of this scenario (toxcore sends none here)
        self.incoming_file = bytearray(size)
        self.incoming_received = 0
        self.client.file_control(friend, file, TOX_FILE_CONTROL_RESUME)

    def _file_chunk(self, _friend: int, _file: int, position: int, data: bytes) -> None:
        if self.incoming_file is None:
            raise ScenarioError(f"{self.name}: file chunk before a file was offered")
        if not data:
            self.incoming_done_at = time.perf_counter()
            return
        if position + len(data) > len(self.incoming_file):
            raise ScenarioError(f"{self.name}: chunk at {position}+{len(data)} beyond the file")
        self.incoming_file[position : position + len(data)] = data
        self.incoming_received += len(data)


class Driver:
    """Iterates both clients in the calling thread until a condition holds."""

    def __init__(self, peers: Sequence[Peer], deadline: float) -> None:
        self.peers = list(peers)
        self.deadline = deadline  # time.monotonic() by which the whole scenario must end
        self._fds: list[int] = []
        self._fds_at = 0.0

    def _socket_fds(self) -> list[int]:
        now = time.monotonic()
        if now - self._fds_at > _FD_REFRESH_S:
            self._fds = _own_tcp_fds()
            self._fds_at = now
        return self._fds

    def step(self) -> None:
        for peer in self.peers:
            peer.client.iterate()
            peer.send_requested_chunks()
        wait = min(MAX_POLL_S, *(peer.client.iteration_interval() for peer in self.peers))
        fds = self._socket_fds()
        try:
            select.select(fds, [], [], wait)
        except (OSError, ValueError):
            self._fds_at = 0.0  # a descriptor went away: list them again next time

    def run_until(self, done: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = min(time.monotonic() + timeout, self.deadline)
        while not done():
            if time.monotonic() > deadline:
                limit = (
                    "the scenario's total time" if deadline == self.deadline else f"{timeout:.0f} s"
                )
                raise ScenarioError(f"timed out ({limit}) waiting for {what}")
            self.step()


def run_friends_scenario(
    relay_a: RelayEndpoint,
    relay_b: RelayEndpoint,
    dht_nodes: Sequence[DhtNode],
    config: ScenarioConfig | None = None,
) -> FriendsResult:
    """Run the whole scenario (module docstring) in this thread; raises
    :class:`ScenarioError` with the clients' log tail when a step fails."""
    config = config or ScenarioConfig()
    relay_ports = {relay_a.port, relay_b.port}
    udp_before = own_udp_inodes()
    # Sockets that other code of this process (earlier tests) still holds are
    # not the clients': only what is opened from here on is judged.
    tcp_before = set(own_socket_fds())
    peers: list[Peer] = []
    try:
        started = time.monotonic()
        a = Peer("A", relay_a, dht_nodes)
        peers.append(a)
        b = Peer("B", relay_b, dht_nodes)
        peers.append(b)
        driver = Driver(peers, started + config.total_timeout_s)

        def accept(public_key: bytes, message: bytes) -> None:
            b.requests.append((public_key, message, time.monotonic()))
            if b.friend is None:
                b.friend = b.client.friend_add_norequest(public_key)

        b.client.on_friend_request = accept
        request_text = b"friend request from A"
        a.friend = a.client.friend_add(b.client.address, request_text)

        driver.run_until(
            lambda: a.self_connected_at is not None and b.self_connected_at is not None,
            config.self_connect_timeout_s,
            "both clients to be online through the onion (self connection status TCP)",
        )
        assert a.self_connected_at is not None and b.self_connected_at is not None
        self_connected_at = max(a.self_connected_at, b.self_connected_at)
        driver.run_until(
            lambda: bool(b.requests),
            config.friend_connect_timeout_s - (time.monotonic() - started),
            "B to get A's friend request",
        )
        public_key, message, request_at = b.requests[0]
        if public_key != a.client.public_key or message != request_text:
            raise ScenarioError(f"friend request garbled: {public_key.hex()} {message!r}")
        driver.run_until(
            lambda: a.friend_status_at is not None and b.friend_status_at is not None,
            config.friend_connect_timeout_s - (time.monotonic() - started),
            "both friends connected",
        )
        assert a.friend_status_at is not None and b.friend_status_at is not None
        connected_at = max(a.friend_status_at, b.friend_status_at)

        exchange_messages(driver, a, b, config)
        rtts = _measure_rtts(driver, a, b, config)
        file_s = _send_file(driver, a, b, config)
        sockets = socket_reports(exclude=tcp_before)
        new_udp = len(own_udp_inodes() - udp_before)
        result = FriendsResult(
            self_connected_s=self_connected_at - started,
            friend_request_s=request_at - started,
            friend_connected_s=connected_at - started,
            connection_a=CONNECTION_NAMES[a.friend_status],
            connection_b=CONNECTION_NAMES[b.friend_status],
            rtts=rtts,
            file_size=config.file_size,
            file_s=file_s,
            sockets=sockets,
            new_udp_sockets=new_udp,
            log_tail=log_tail(peers),
        )
        _check_no_other_path(result, relay_ports, config.file_size)
        return result
    except ScenarioError as exc:
        raise ScenarioError(f"{exc}\n" + "\n".join(log_tail(peers))) from None
    finally:
        for peer in peers:
            peer.client.kill()


def exchange_messages(driver: Driver, a: Peer, b: Peer, config: ScenarioConfig) -> None:
    assert a.friend is not None and b.friend is not None
    for sender, receiver in ((a, b), (b, a)):
        assert sender.friend is not None
        expected = [
            f"{sender.name}->{receiver.name} #{i} ".encode()
            + os.urandom(8).hex().encode() * (i + 1)
            for i in range(config.messages_each_way)
        ]
        receiver.messages.clear()
        for text in expected:
            sender.client.send_message(sender.friend, text)
        count = len(expected)
        driver.run_until(
            lambda r=receiver, n=count: len(r.messages) >= n,
            config.message_timeout_s,
            f"{count} messages {sender.name}->{receiver.name}",
        )
        got = [text for text, _ in receiver.messages]
        if got != expected:
            raise ScenarioError(f"messages {sender.name}->{receiver.name}: {got!r} != {expected!r}")


def _measure_rtts(driver: Driver, a: Peer, b: Peer, config: ScenarioConfig) -> list[float]:
    assert a.friend is not None
    b.echo = True
    rtts = []
    try:
        for i in range(config.rtt_rounds):
            text = f"rtt {i} ".encode() + os.urandom(16).hex().encode()
            a.messages.clear()
            sent_at = time.perf_counter()
            a.client.send_message(a.friend, text)
            driver.run_until(lambda: bool(a.messages), config.message_timeout_s, f"echo #{i}")
            echoed, received_at = a.messages[0]
            if echoed != text:
                raise ScenarioError(f"echo #{i}: {echoed!r} != {text!r}")
            rtts.append(received_at - sent_at)
    finally:
        b.echo = False
    return rtts


def _send_file(driver: Driver, a: Peer, b: Peer, config: ScenarioConfig) -> float:
    assert a.friend is not None
    a.outgoing_file = os.urandom(config.file_size)
    sent_at = time.perf_counter()
    a.client.file_send(a.friend, config.file_size, b"random.bin")
    driver.run_until(
        lambda: (
            b.incoming_done_at is not None
            or (b.incoming_file is not None and b.incoming_received >= config.file_size)
        ),
        config.file_timeout_s,
        f"B to receive {config.file_size} bytes",
    )
    # toxcore reports the end with a zero-length chunk; give it a moment to arrive.
    if b.incoming_done_at is None:
        driver.run_until(lambda: b.incoming_done_at is not None, 2.0, "end of file")
    assert b.incoming_file is not None and b.incoming_done_at is not None
    if bytes(b.incoming_file) != a.outgoing_file:
        raise ScenarioError(
            "file corrupted: sha256 "
            f"{hashlib.sha256(b.incoming_file).hexdigest()} != "
            f"{hashlib.sha256(a.outgoing_file).hexdigest()}"
        )
    return b.incoming_done_at - sent_at


def _check_no_other_path(result: FriendsResult, relay_ports: set[int], file_size: int) -> None:
    problems = []
    toxcore_sockets = [s for s in result.sockets if s.state != "LISTEN"]
    others = [s for s in toxcore_sockets if s.remote_port not in relay_ports]
    if others:
        problems.append(f"TCP connections to other ports: {others}")
    if any(not s.remote_host.startswith("127.") for s in toxcore_sockets):
        problems.append("a TCP connection left loopback")
    if result.new_udp_sockets:
        problems.append(f"{result.new_udp_sockets} UDP socket(s) opened although UDP is off")
    to_relay = [s for s in toxcore_sockets if s.remote_port in relay_ports]
    sent = sum(s.bytes_sent or 0 for s in to_relay)
    received = sum(s.bytes_received or 0 for s in to_relay)
    if sent < file_size or received < file_size:
        problems.append(
            f"relay sockets carried {sent} bytes out / {received} in, less than the file"
            f" ({file_size}): {to_relay}"
        )
    if result.connection_a != "TCP" or result.connection_b != "TCP":
        problems.append(f"friend connection {result.connection_a}/{result.connection_b}, not TCP")
    if problems:
        raise ScenarioError("; ".join(problems))


def log_tail(peers: Sequence[Peer], lines: int = 15) -> list[str]:
    tail = []
    for peer in peers:
        tail += [f"[{peer.name}] {line}" for line in peer.client.log_lines()[-lines:]]
    return tail


# --- this process's sockets, from /proc ---------------------------------------------


def _proc_rows(table: str) -> list[list[str]]:
    try:
        return [
            line.split() for line in Path(f"/proc/self/net/{table}").read_text().splitlines()[1:]
        ]
    except OSError:
        return []


def _own_tcp_fds() -> list[int]:
    fds = own_socket_fds()
    return [
        fds[int(cols[9])] for cols in _proc_rows("tcp") if len(cols) > 9 and int(cols[9]) in fds
    ]


def own_udp_inodes() -> set[int]:
    fds = own_socket_fds()
    return {
        int(cols[9])
        for table in ("udp", "udp6")
        for cols in _proc_rows(table)
        if len(cols) > 9 and int(cols[9]) in fds
    }


_TCP_STATE_NAMES = {"01": "ESTABLISHED", "02": "SYN_SENT", "06": "TIME_WAIT", "0A": "LISTEN"}


def socket_reports(exclude: set[int] = frozenset()) -> list[SocketReport]:  # type: ignore[assignment]
    """Every TCP socket (IPv4 and IPv6) this process owns, with TCP_INFO byte
    counts, except those whose inode is in ``exclude``."""
    fds = {inode: fd for inode, fd in own_socket_fds().items() if inode not in exclude}
    reports = []
    for table in ("tcp", "tcp6"):
        for cols in _proc_rows(table):
            if len(cols) <= 9 or int(cols[9]) not in fds:
                continue
            remote_hex, _, remote_port = cols[2].rpartition(":")
            counts = tcp_byte_counts(int(cols[9]))
            reports.append(
                SocketReport(
                    local_port=int(cols[1].rpartition(":")[2], 16),
                    remote_host=_hex_ip(remote_hex),
                    remote_port=int(remote_port, 16),
                    state=_TCP_STATE_NAMES.get(cols[3], cols[3]),
                    bytes_sent=counts[0] if counts else None,
                    bytes_received=counts[1] if counts else None,
                )
            )
    return reports


def _hex_ip(text: str) -> str:
    """/proc/net/tcp's address (host byte order hex) as dotted IPv4, or the hex for IPv6."""
    if len(text) == 8:
        return ".".join(str(b) for b in reversed(bytes.fromhex(text)))
    return text
