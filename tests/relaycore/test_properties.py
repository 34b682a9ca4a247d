"""Property tests (hypothesis): framing under any split, fuzzing the server core,
and a stateful model of the relay table (slots, links, notifications)."""

from __future__ import annotations

import itertools
from collections import Counter

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from relaycore.constants import MAX_PLAINTEXT_SIZE
from relaycore.crypto import nonce_int, public_key_of
from relaycore.framing import SecureChannel
from relaycore.options import RelayOptions
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    OobReceive,
    OobSend,
    Ping,
    Pong,
    RoutedData,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import ConnectionState, SlotState
from tests.relaycore.harness import Network, Peer, secret_key_for

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# ----------------------------------------------------------------------
# (a) framing: any split of the stream gives the same plaintexts
# ----------------------------------------------------------------------

_plaintexts = st.lists(
    st.one_of(
        st.binary(min_size=1, max_size=200),
        st.binary(min_size=MAX_PLAINTEXT_SIZE - 4, max_size=MAX_PLAINTEXT_SIZE),
        st.none(),  # an L = 0 frame (R-FRAME-3)
    ),
    max_size=12,
)


@FAST
@given(
    items=_plaintexts,
    base_nonce=st.binary(min_size=24, max_size=24),
    cuts=st.lists(st.integers(min_value=0, max_value=30_000), max_size=25),
)
def test_any_split_of_a_frame_stream_yields_the_same_plaintexts(
    items: list[bytes | None], base_nonce: bytes, cuts: list[int]
) -> None:
    """R-FRAME-1/3/5/8: chunk boundaries never matter; L = 0 frames use no nonce."""
    key = bytes(range(32))
    sender = SecureChannel(key, base_nonce, bytes(24))
    receiver = SecureChannel(key, bytes(24), base_nonce)
    stream = b"".join(b"\x00\x00" if item is None else sender.encrypt(item) for item in items)
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    received: list[bytes] = []
    for start, end in itertools.pairwise(points):
        received.extend(receiver.receive(stream[start:end]))
    assert received == [item for item in items if item is not None]
    assert receiver.buffered == 0
    assert receiver.recv_nonce == sender.send_nonce
    frames = sum(item is not None for item in items)
    assert sender.send_nonce == (nonce_int(base_nonce) + frames) % (1 << 192)


# ----------------------------------------------------------------------
# (b) fuzz: nothing a client sends makes the core raise
# ----------------------------------------------------------------------


def _bystanders() -> tuple[Network, int, int]:
    """A network with two linked, healthy clients b and c."""
    net = Network()
    net.connect("b")
    net.connect("c")
    b_id, c_id = net.link("b", "c")
    return net, b_id, c_id


def _assert_bystanders_unaffected(net: Network, b_id: int, c_id: int) -> None:
    b, c = net["b"], net["c"]
    assert not b.closed and not c.closed
    b.take()  # OOB from the fuzzer may have arrived; nothing else can
    c.take()
    net.send("b", RoutedData(b_id, b"ok?"), Ping(b"bbbbbbbb"))
    assert c.take() == [RoutedData(c_id, b"ok?")]
    assert b.take() == [Pong(b"bbbbbbbb")]
    assert net.server.by_key[b.public_key] is b.connection
    assert net.server.by_key[c.public_key] is c.connection


def _assert_clean_close_or_alive(peer: Peer) -> None:
    connection = peer.connection
    if peer.closed:
        assert connection.state is ConnectionState.CLOSED
        assert connection.outbox == [] and connection.slots == [None] * 240
    else:
        assert connection.state is not ConnectionState.CLOSED


# Curve25519 points of small order: X25519 with them yields all zeros and
# libsodium's crypto_box_beforenm refuses them (nacl raises).
LOW_ORDER_POINTS = [
    bytes.fromhex(point)
    for point in (
        "00" * 32,
        "01" + "00" * 31,
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ec" + "ff" * 30 + "7f",
        "ed" + "ff" * 30 + "7f",
        "ee" + "ff" * 30 + "7f",
    )
]

_hello_streams = st.one_of(
    st.binary(max_size=600),
    st.builds(
        bytes.__add__,
        st.sampled_from(LOW_ORDER_POINTS),
        st.binary(min_size=96, max_size=400),
    ),
)


@FAST
@given(stream=_hello_streams, cuts=st.lists(st.integers(0, 600), max_size=4))
def test_fuzz_raw_bytes_before_the_handshake(stream: bytes, cuts: list[int]) -> None:
    """Any bytes as a hello (incl. low-order keys), in any chunks, never raise
    out of the core; the connection is killed without a reply or stays INCOMING."""
    net, b_id, c_id = _bystanders()
    fuzzer = net.open("fuzzer")
    fuzzer.client.take_outbox()
    points = sorted({cut % (len(stream) + 1) for cut in cuts} | {0, len(stream)})
    for start, end in itertools.pairwise(points):
        net.server.receive(fuzzer.connection, stream[start:end], net.now)
        net.pump()
    assert fuzzer.connection.outbox == [] and fuzzer.received == []
    if len(stream) >= 128:
        assert fuzzer.closed and fuzzer.close_reason == "R-HS-2"
    else:
        assert fuzzer.connection.state is ConnectionState.INCOMING
    _assert_clean_close_or_alive(fuzzer)
    assert net.server.stats["confirmed"] == 2
    _assert_bystanders_unaffected(net, b_id, c_id)


@FAST
@given(data=st.binary(max_size=3000))
def test_fuzz_raw_bytes_after_the_handshake(data: bytes) -> None:
    net, b_id, c_id = _bystanders()
    fuzzer = net.connect("fuzzer")
    net.send_raw("fuzzer", data)
    _assert_clean_close_or_alive(fuzzer)
    _assert_bystanders_unaffected(net, b_id, c_id)


_control_plaintexts = st.builds(
    lambda packet_id, body: bytes([packet_id]) + body,
    st.integers(min_value=0, max_value=20),
    st.one_of(
        st.binary(max_size=40),
        st.binary(min_size=150, max_size=200),
        st.binary(min_size=1000, max_size=1100),
        st.binary(min_size=1790, max_size=MAX_PLAINTEXT_SIZE - 1),
    ),
)


@FAST
@given(
    plains=st.lists(
        st.one_of(st.binary(min_size=1, max_size=MAX_PLAINTEXT_SIZE), _control_plaintexts),
        min_size=1,
        max_size=8,
    ),
    confirm_first=st.booleans(),
)
def test_fuzz_arbitrary_plaintexts(plains: list[bytes], confirm_first: bool) -> None:
    """Any sequence of well-encrypted plaintexts either works or kills only the
    sender; linked bystanders keep working."""
    net, b_id, c_id = _bystanders()
    fuzzer = net.connect("fuzzer") if confirm_first else net.handshake("fuzzer")
    net.send("fuzzer", RoutingRequest(net["b"].public_key))
    for plain in plains:
        if fuzzer.closed:
            break
        net.send_plain("fuzzer", plain)
    _assert_clean_close_or_alive(fuzzer)
    net.tick(30.0)
    net.tick(45.0)
    _assert_bystanders_unaffected(net, b_id, c_id)


# ----------------------------------------------------------------------
# (c) stateful relay table
# ----------------------------------------------------------------------

NAMES = ("a", "b", "c")
names = st.sampled_from(NAMES)
SOFT_LIMIT = 1000
HARD_LIMIT = 2000


def _key(name: str) -> bytes:
    return public_key_of(secret_key_for(name))


class RelayTable(RuleBasedStateMachine):
    """A few clients request routes, disconnect, send data, die and reconnect.

    Model: ``wants[name]`` is the set of names the *current* connection of
    ``name`` has asked for (and not disconnected). Two live connections are
    linked exactly when each wants the other. Each client's own view
    (``believed``), built only from the CONNECTION / DISCONNECT notifications it
    received, must equal the server's LINKED slots of its connection: so every
    link end produces exactly one connect and, when it ends, exactly one
    disconnect notification.
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = Network(
            RelayOptions(
                handshake_timeout=0, output_soft_limit=SOFT_LIMIT, output_hard_limit=HARD_LIMIT
            )
        )
        self.generation: Counter[str] = Counter()
        self.current: dict[str, Peer] = {}
        self.wants: dict[str, set[str]] = {}
        self.believed: dict[Peer, set[int]] = {}

    # -- helpers -------------------------------------------------------

    def _live(self, name: str) -> Peer | None:
        peer = self.current.get(name)
        return peer if peer is not None and not peer.closed else None

    def _absorb(self) -> None:
        """Fold every packet received into the clients' views."""
        for peer, ids in self.believed.items():
            for packet in peer.take():
                match packet:
                    case ConnectNotification(connection_id):
                        assert connection_id not in ids, (peer.name, packet)
                        ids.add(connection_id)
                    case DisconnectNotification(connection_id):
                        assert connection_id in ids, (peer.name, packet)
                        ids.discard(connection_id)
                    case RoutedData(connection_id, _):
                        assert connection_id in ids, (peer.name, packet)
                    case RoutingResponse() | OobReceive() | Ping() | Pong():
                        pass
                    case _:
                        raise AssertionError(f"{peer.name} got {packet!r}")
        for name in NAMES:
            if name in self.current and self._live(name) is None:
                self.wants[name] = set()

    # -- rules ---------------------------------------------------------

    def _live_names(self) -> list[str]:
        return [name for name in NAMES if self._live(name) is not None]

    def _draw_live(self, data: st.DataObject, label: str) -> tuple[str, Peer]:
        name = data.draw(st.sampled_from(self._live_names()), label=label)
        peer = self._live(name)
        assert peer is not None
        return name, peer

    def _connect(self, name: str, answer_pings: bool) -> None:
        """New connection with ``name``'s key (R-CONF-3 replaces an old one)."""
        self.generation[name] += 1
        peer = self.net.connect(
            f"{name}#{self.generation[name]}", secret_key_for(name), answer_pings=answer_pings
        )
        previous = self.current.get(name)
        if previous is not None:
            assert previous.closed
        self.current[name] = peer
        self.wants[name] = set()
        self.believed[peer] = set()
        self._absorb()

    @initialize(silent=st.sampled_from((None, *NAMES)))
    def connect_everyone(self, silent: str | None) -> None:
        """Everybody starts online; ``silent`` does not answer pings."""
        for name in NAMES:
            self._connect(name, answer_pings=name != silent)

    @rule(name=names, answer_pings=st.booleans())
    def connect(self, name: str, answer_pings: bool) -> None:
        self._connect(name, answer_pings)

    @precondition(lambda self: self._live_names())
    @rule(destination=names, data=st.data())
    def route_request(self, destination: str, data: st.DataObject) -> None:
        source, peer = self._draw_live(data, "source")
        self.net.send(peer.name, RoutingRequest(_key(destination)))
        if peer.closed:  # its own reply passed output_hard_limit
            assert peer.close_reason == "output_hard_limit"
            self._absorb()
            return
        (response,) = [p for p in peer.received if isinstance(p, RoutingResponse)]
        if source == destination:
            assert response.connection_id == 0  # R-ROUTE-2
        else:
            assert response.connection_id >= 16
            self.wants[source].add(destination)
        self._absorb()

    @precondition(lambda self: self._live_names())
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        source, peer = self._draw_live(data, "source")
        used = sorted(i + 16 for i, slot in enumerate(peer.connection.slots) if slot is not None)
        connection_id = data.draw(
            st.sampled_from(used) if used else st.integers(16, 20), label="id"
        )
        slot = peer.connection.slots[connection_id - 16]
        self.net.send(peer.name, DisconnectNotification(connection_id))
        self.believed[peer].discard(connection_id)  # the sender is told nothing (R-DISC-3)
        if slot is None:
            assert peer.closed and peer.close_reason == "R-DISC-2"
        else:
            assert not peer.closed
            target = next(n for n in NAMES if _key(n) == slot.public_key)
            self.wants[source].discard(target)
        self._absorb()

    @precondition(lambda self: self._live_names())
    @rule(payload=st.binary(max_size=40), data=st.data())
    def send_data(self, payload: bytes, data: st.DataObject) -> None:
        _, peer = self._draw_live(data, "source")
        used = [i for i, slot in enumerate(peer.connection.slots) if slot is not None]
        if not used:
            return
        index = data.draw(st.sampled_from(used), label="slot")
        slot = peer.connection.slots[index]
        assert slot is not None
        receiver = next((p for p in self.believed if p.connection is slot.peer), None)
        self.net.send(peer.name, RoutedData(index + 16, payload))
        if slot.state is SlotState.LINKED:
            assert receiver is not None
            if receiver.connection.transport_backlog > SOFT_LIMIT:  # R-OUT-2
                assert receiver.received == []
            else:
                assert receiver.received == [RoutedData(slot.peer_slot + 16, payload)]
        assert not peer.closed
        self._absorb()

    @precondition(lambda self: self._live_names())
    @rule(destination=names, payload=st.binary(min_size=1, max_size=20), data=st.data())
    def oob(self, destination: str, payload: bytes, data: st.DataObject) -> None:
        source, peer = self._draw_live(data, "source")
        self.net.send(peer.name, OobSend(_key(destination), payload))
        receiver = self._live(destination)
        if receiver is not None:
            delivered = receiver.connection.transport_backlog <= SOFT_LIMIT  # R-OUT-2
            expected = [OobReceive(_key(source), payload)] if delivered else []
            assert receiver.received == expected
        self._absorb()

    @precondition(lambda self: self._live_names())
    @rule(data=st.data(), how=st.sampled_from(["kill", "eof"]))
    def close(self, data: st.DataObject, how: str) -> None:
        """The server kills a connection, or its client goes away (R-KILL-4)."""
        _, peer = self._draw_live(data, "name")
        if how == "kill":
            self.net.server.kill(peer.connection, "test")
            self.net.pump()
        else:
            self.net.peer_eof(peer.name)
        assert peer.closed
        self._absorb()

    @precondition(lambda self: self._live_names())
    @rule(
        data=st.data(),
        backlog=st.sampled_from([0, SOFT_LIMIT + 1, HARD_LIMIT - 40, HARD_LIMIT - 1, HARD_LIMIT]),
    )
    def slow_reader(self, data: st.DataObject, backlog: int) -> None:
        """The adapter reports unsent bytes: over the soft limit data is dropped
        (R-OUT-2); the next priority packet past the hard limit kills."""
        _, peer = self._draw_live(data, "name")
        peer.connection.transport_backlog = backlog

    @rule(seconds=st.sampled_from([1.0, 9.0, 10.0, 20.0, 30.0]))
    def tick(self, seconds: float) -> None:
        """Time passes; clients that do not answer pings die (R-PING-4)."""
        self.net.tick(self.net.now + seconds)
        self._absorb()

    # -- invariants ----------------------------------------------------

    @invariant()
    def index_holds_confirmed_connections_only(self) -> None:
        server = self.net.server
        for key, connection in server.by_key.items():
            assert connection.state is ConnectionState.CONFIRMED
            assert connection.public_key == key
        for name in NAMES:
            peer = self._live(name)
            if peer is not None:
                assert server.by_key.get(_key(name)) is peer.connection
            elif name in self.current:
                assert _key(name) not in server.by_key
        live = sum(not peer.closed for peer in self.believed)
        assert server.connection_count == live
        assert all(c.state is not ConnectionState.CONFIRMED for c in server.pending)

    @invariant()
    def slots_are_symmetric_and_point_at_live_connections(self) -> None:
        for peer in self.believed:
            connection = peer.connection
            if peer.closed:
                assert connection.slots == [None] * 240 and connection.slot_of_key == {}
                continue
            used = {i: slot for i, slot in enumerate(connection.slots) if slot is not None}
            assert {slot.public_key: i for i, slot in used.items()} == connection.slot_of_key
            for index, slot in used.items():
                if slot.state is SlotState.LINKED:
                    other = slot.peer
                    assert other is not None
                    assert other.state is ConnectionState.CONFIRMED
                    assert self.net.server.by_key[slot.public_key] is other
                    back = other.slots[slot.peer_slot]
                    assert back is not None and back.state is SlotState.LINKED
                    assert back.peer is connection and back.peer_slot == index
                    assert back.public_key == connection.public_key
                else:
                    assert slot.peer is None and slot.peer_slot == -1

    @invariant()
    def links_match_the_model(self) -> None:
        for name in NAMES:
            peer = self._live(name)
            if peer is None:
                continue
            slots = peer.connection.slots
            assert {n for n in NAMES if _key(n) in peer.connection.slot_of_key} == self.wants[name]
            for other in self.wants[name]:
                slot = slots[peer.connection.slot_of_key[_key(other)]]
                assert slot is not None
                mutual = self._live(other) is not None and name in self.wants[other]
                assert (slot.state is SlotState.LINKED) == mutual, (name, other)

    @invariant()
    def clients_saw_exactly_the_server_links(self) -> None:
        for peer, ids in self.believed.items():
            if peer.closed:
                continue
            linked = {
                i + 16
                for i, slot in enumerate(peer.connection.slots)
                if slot is not None and slot.state is SlotState.LINKED
            }
            assert ids == linked, peer.name


RelayTable.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestRelayTable = RelayTable.TestCase
