"""Two current toxcore clients (c-toxcore 0.2.23) become friends and use the new group
chats through one TCP relay (issue 11).

The clients are those of :mod:`testbed.friends` (UDP, IPv6 and LAN discovery
off, no TCP server of their own, one TCP relay, a private DHT for onion hops 2-3),
built on a 0.2.23 library loaded by path (:mod:`testbed.toxgroups`). One friend
connection serves three steps, each bounded:

a. friends: A's request, both connected, messages both ways (contents, order);
b. a **public** group that A creates and B joins by its chat id alone: B finds A
   through group announcements, which since 0.2.19 travel as onion packets 0x87
   (request) and 0x88 (response) -- through the relay's first hop for TCP-only
   clients (onion-over-tcp.md R-ORET-2, docs/protocol-changes.md R-ORET-2a). Then
   ``group_messages`` messages each way, contents and order checked;
c. a **private** group that A creates and invites B to over their friend connection;
   messages both ways.

"No other path": no UDP socket was opened, every TCP socket the clients opened leads
to the relay's ports on loopback (each group opens connections of its own), and the
relay sockets carried at least the group messages' bytes.
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from testbed.bootstrapd import DhtNode
from testbed.friends import (
    Driver,
    Peer,
    RelayEndpoint,
    ScenarioConfig,
    ScenarioError,
    SocketReport,
    exchange_messages,
    log_tail,
    own_udp_inodes,
    socket_reports,
)
from testbed.toxcore import own_socket_fds
from testbed.toxgroups import PRIVACY_PRIVATE, PRIVACY_PUBLIC, ToxGroupClient

#: 0.2.23 clients over TCP-only relays take ~39 s to see a friend connected (an
#: upstream timer, seen with tox-bootstrapd 0.2.23 as the relay too).
FRIEND_CONNECT_TIMEOUT_S = 75.0
GROUP_JOIN_TIMEOUT_S = 45.0
GROUP_MESSAGE_TIMEOUT_S = 15.0
TOTAL_TIMEOUT_S = 170.0


@dataclass
class GroupsConfig:
    friend_messages_each_way: int = 3
    group_messages: int = 20  # each way, public group
    private_messages: int = 5  # each way, private group
    friend_connect_timeout_s: float = FRIEND_CONNECT_TIMEOUT_S
    group_join_timeout_s: float = GROUP_JOIN_TIMEOUT_S
    message_timeout_s: float = GROUP_MESSAGE_TIMEOUT_S
    total_timeout_s: float = TOTAL_TIMEOUT_S


@dataclass
class GroupsResult:
    """Seconds from the clients' creation unless said otherwise."""

    friend_connected_s: float
    public_join_s: float  # tox_group_join -> both see each other in the public group
    private_join_s: float  # invite sent -> both see each other in the private group
    group_rtts: list[float]  # public group: A sends, B echoes, A receives
    sockets: list[SocketReport]
    new_udp_sockets: int
    log_tail: list[str] = field(default_factory=list)


class GroupPeer(Peer):
    """A :class:`Peer` on a :class:`ToxGroupClient`, with what its group callbacks saw."""

    def __init__(
        self, name: str, relay: RelayEndpoint, dht_nodes: Sequence[DhtNode], lib: ctypes.CDLL
    ) -> None:
        super().__init__(name, relay, dht_nodes, ToxGroupClient(lib))
        self.group_client: ToxGroupClient = self.client  # type: ignore[assignment]
        self.joined: set[int] = set()  # groups whose self-join callback fired
        self.peers: dict[int, set[int]] = {}  # group -> peer ids that joined
        self.join_failures: list[tuple[int, int]] = []
        self.group_messages: dict[int, list[tuple[bytes, float]]] = {}
        self.invites: list[tuple[int, bytes]] = []
        self.echo_group: int | None = None
        client = self.group_client
        client.on_group_self_join = self.joined.add
        client.on_group_peer_join = lambda g, p: self.peers.setdefault(g, set()).add(p)
        client.on_group_join_fail = lambda g, r: self.join_failures.append((g, r))
        client.on_group_message = self._group_message
        client.on_group_invite = lambda f, data: self.invites.append((f, data))

    def _group_message(self, group: int, _peer: int, text: bytes) -> None:
        self.group_messages.setdefault(group, []).append((text, time.perf_counter()))
        if group == self.echo_group:
            self.group_client.group_send_message(group, text)

    def sees_peer(self, group: int) -> bool:
        return bool(self.peers.get(group))


def _in_group(founder: GroupPeer, group_f: int, joiner: GroupPeer, group_j: int) -> bool:
    """The joiner has synced with the group (its self-join callback; toxcore calls it
    for joiners only) and the founder has seen it join."""
    return group_j in joiner.joined and founder.sees_peer(group_f)


def run_groups_scenario(
    relay_a: RelayEndpoint,
    relay_b: RelayEndpoint,
    dht_nodes: Sequence[DhtNode],
    lib: ctypes.CDLL,
    config: GroupsConfig | None = None,
) -> GroupsResult:
    """Steps a-c of the module docstring in this thread; :class:`ScenarioError`
    (with the clients' log tail) when one fails."""
    config = config or GroupsConfig()
    relay_ports = {relay_a.port, relay_b.port}
    udp_before = own_udp_inodes()
    tcp_before = set(own_socket_fds())
    peers: list[GroupPeer] = []
    try:
        started = time.monotonic()
        a = GroupPeer("A", relay_a, dht_nodes, lib)
        peers.append(a)
        b = GroupPeer("B", relay_b, dht_nodes, lib)
        peers.append(b)
        driver = Driver(peers, started + config.total_timeout_s)

        # a. friends
        def accept(public_key: bytes, _message: bytes) -> None:
            b.requests.append((public_key, _message, time.monotonic()))
            if b.friend is None:
                b.friend = b.client.friend_add_norequest(public_key)

        b.client.on_friend_request = accept
        a.friend = a.client.friend_add(b.client.address, b"group test")
        driver.run_until(
            lambda: a.friend_status_at is not None and b.friend_status_at is not None,
            config.friend_connect_timeout_s,
            "both friends connected",
        )
        assert a.friend_status_at is not None and b.friend_status_at is not None
        friend_connected_s = max(a.friend_status_at, b.friend_status_at) - started
        exchange_messages(
            driver, a, b, ScenarioConfig(messages_each_way=config.friend_messages_each_way)
        )

        # b. public group, joined by chat id
        public_a = a.group_client.group_new(PRIVACY_PUBLIC, b"public test group", b"A")
        chat_id = a.group_client.group_chat_id(public_a)
        join_started = time.monotonic()
        public_b = b.group_client.group_join(chat_id, b"B")
        driver.run_until(
            lambda: _in_group(a, public_a, b, public_b),
            config.group_join_timeout_s,
            f"B to join A's public group by chat id {chat_id.hex()} "
            f"(B join failures {b.join_failures})",
        )
        public_join_s = time.monotonic() - join_started
        _exchange_group_messages(driver, a, public_a, b, public_b, config.group_messages, config)
        group_rtts = _group_rtts(driver, a, public_a, b, public_b, config)

        # c. private group, by invite over the friend connection
        private_a = a.group_client.group_new(PRIVACY_PRIVATE, b"private test group", b"A")
        invite_started = time.monotonic()
        a.group_client.group_invite_friend(private_a, a.friend)
        driver.run_until(lambda: bool(b.invites), config.message_timeout_s, "B to get the invite")
        friend, invite = b.invites[0]
        private_b = b.group_client.group_invite_accept(friend, invite, b"B")
        driver.run_until(
            lambda: _in_group(a, private_a, b, private_b),
            config.group_join_timeout_s,
            f"B to join A's private group (B join failures {b.join_failures})",
        )
        private_join_s = time.monotonic() - invite_started
        _exchange_group_messages(
            driver, a, private_a, b, private_b, config.private_messages, config
        )

        result = GroupsResult(
            friend_connected_s=friend_connected_s,
            public_join_s=public_join_s,
            private_join_s=private_join_s,
            group_rtts=group_rtts,
            sockets=socket_reports(exclude=tcp_before),
            new_udp_sockets=len(own_udp_inodes() - udp_before),
            log_tail=log_tail(peers),
        )
        _check_no_other_path(result, relay_ports)
        return result
    except ScenarioError as exc:
        raise ScenarioError(f"{exc}\n" + "\n".join(log_tail(peers))) from None
    finally:
        for peer in peers:
            peer.client.kill()


def _exchange_group_messages(
    driver: Driver,
    a: GroupPeer,
    group_a: int,
    b: GroupPeer,
    group_b: int,
    count: int,
    config: GroupsConfig,
) -> None:
    """``count`` messages A->B, then B->A, in one group; contents and order checked."""
    for sender, sent_in, receiver, received_in in (
        (a, group_a, b, group_b),
        (b, group_b, a, group_a),
    ):
        expected = [
            f"{sender.name}->{receiver.name} group {sent_in} #{i} ".encode()
            + os.urandom(8).hex().encode()
            for i in range(count)
        ]
        receiver.group_messages[received_in] = []
        for text in expected:
            sender.group_client.group_send_message(sent_in, text)
        driver.run_until(
            lambda r=receiver, g=received_in: len(r.group_messages[g]) >= count,
            config.message_timeout_s,
            f"{count} group messages {sender.name}->{receiver.name}",
        )
        got = [text for text, _ in receiver.group_messages[received_in]]
        if got != expected:
            raise ScenarioError(
                f"group messages {sender.name}->{receiver.name}: {got!r} != {expected!r}"
            )


def _group_rtts(
    driver: Driver, a: GroupPeer, group_a: int, b: GroupPeer, group_b: int, config: GroupsConfig
) -> list[float]:
    """Five echo round trips A -> B -> A in one group."""
    b.echo_group = group_b
    rtts = []
    try:
        for i in range(5):
            text = f"rtt {i} ".encode() + os.urandom(8).hex().encode()
            a.group_messages[group_a] = []
            sent_at = time.perf_counter()
            a.group_client.group_send_message(group_a, text)
            driver.run_until(
                lambda: bool(a.group_messages[group_a]),
                config.message_timeout_s,
                f"group echo #{i}",
            )
            echoed, received_at = a.group_messages[group_a][0]
            if echoed != text:
                raise ScenarioError(f"group echo #{i}: {echoed!r} != {text!r}")
            rtts.append(received_at - sent_at)
    finally:
        b.echo_group = None
    return rtts


def _check_no_other_path(result: GroupsResult, relay_ports: set[int]) -> None:
    problems = []
    sockets = [s for s in result.sockets if s.state != "LISTEN"]
    if others := [s for s in sockets if s.remote_port not in relay_ports]:
        problems.append(f"TCP connections to other ports: {others}")
    if any(not s.remote_host.startswith("127.") for s in sockets):
        problems.append("a TCP connection left loopback")
    if result.new_udp_sockets:
        problems.append(f"{result.new_udp_sockets} UDP socket(s) opened although UDP is off")
    if not any(s.state == "ESTABLISHED" for s in sockets):
        problems.append(f"no connection to the relay is open: {sockets}")
    if problems:
        raise ScenarioError("; ".join(problems))
