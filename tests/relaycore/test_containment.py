"""Issue 10 findings 2-4 in the core: kills at output_hard_limit wait for the
end of the call that caused them, one call handles a bounded number of frames,
input held while a routing request waits is bounded, and the table's
invariants can be checked."""

from __future__ import annotations

import pytest

from relaycore.crypto import public_key_of
from relaycore.errors import InvariantBroken
from relaycore.options import RelayOptions
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    Ping,
    Pong,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import FRAMES_PER_RECEIVE, MAX_HELD_INPUT, ConnectionState
from relaycore.shardlink import Link, MapUpdate
from tests.relaycore.harness import Network, secret_key_for

HARD = 64 * 1024
REMOTE_KEY = public_key_of(secret_key_for("remote"))
OLD, NEW = 2 << 32 | 1, 2 << 32 | 2  # two epochs of REMOTE_KEY on shard 2


def _linked_to_remote() -> tuple[Network, object]:
    """Shard 1 with client a linked to REMOTE_KEY's connection OLD on shard 2."""
    net = Network(RelayOptions(output_soft_limit=16 * 1024, output_hard_limit=HARD), shard=1)
    net.server.cluster.set_peer_shards([2], net.now)
    a = net.connect("a")
    net.server.cluster.apply_map_update((MapUpdate.SET, REMOTE_KEY, 2, OLD, None, None), net.now)
    net.send("a", RoutingRequest(REMOTE_KEY))
    epoch = a.connection.epoch
    assert net.server.cluster.take_bus(net.now)[-1] == (
        2,
        (Link.WANT, a.public_key, epoch, REMOTE_KEY, OLD),
    )
    net.server.cluster.receive_link(2, (Link.LINKED, REMOTE_KEY, OLD, a.public_key, epoch), net.now)
    net.pump()
    assert a.take() == [RoutingResponse(16, REMOTE_KEY), ConnectNotification(16)]
    net.server.cluster.take_bus(net.now)
    return net, a


def test_a_hard_limit_kill_in_the_middle_of_a_relink_leaves_nothing_linked() -> None:
    """Issue 10 finding 2: a WANT from REMOTE_KEY's newer connection ends a's
    link to the old one (03 for a) and links the new one. When that 03 passed
    output_hard_limit, a was killed in the middle: the new link was then made
    on the closed connection, LINKED was sent for it, and the next UNLINK
    raised KeyError. Now a is killed when the call ends, like any kill."""
    net, a = _linked_to_remote()
    epoch = a.connection.epoch
    a.connection.transport_backlog = HARD - 1  # the 2-byte 03 passes the limit
    net.server.cluster.receive_link(2, (Link.WANT, REMOTE_KEY, NEW, a.public_key, epoch), net.now)
    net.pump()
    assert a.closed and a.close_reason == "output_hard_limit"
    assert net.server.cluster._remote_links == {}
    bus = [message for _, message in net.server.cluster.take_bus(net.now)]
    assert bus[-1] == (Link.UNLINK, a.public_key, epoch, REMOTE_KEY, NEW)  # its end is told
    # The UNLINK its peer sends meanwhile finds nothing (it raised KeyError).
    net.server.cluster.receive_link(2, (Link.UNLINK, REMOTE_KEY, NEW, a.public_key, epoch), net.now)
    net.server.check_invariants()


def test_a_hard_limit_kill_waits_for_the_end_of_the_call_and_sends_nothing_more() -> None:
    net = Network(RelayOptions(output_soft_limit=16 * 1024, output_hard_limit=HARD))
    a = net.connect("a")
    a.connection.transport_backlog = HARD - 9
    nonce = a.connection.channel.send_nonce  # type: ignore[union-attr]
    net.send("a", Ping(b"12345678"), Ping(b"abcdefgh"), Ping(b"12345678"))
    assert a.take() == []  # its output is discarded with it (as before)
    assert a.connection.channel.send_nonce == nonce + 1  # type: ignore[union-attr]
    assert a.closed and a.close_reason == "output_hard_limit"
    net.server.check_invariants()


def test_one_receive_handles_at_most_frames_per_receive_frames() -> None:
    """Issue 10 finding 4: the rest waits for a later call (the adapter's next
    loop turn); ``more_input`` says there is some."""
    net = Network()
    a = net.connect("a")
    for index in range(FRAMES_PER_RECEIVE * 2 + 10):
        a.client.send(Ping(index.to_bytes(8, "big")))
    server, connection = net.server, a.connection
    stream = a.client.take_outbox()
    before = server.stats["frames_in"]
    server.receive(connection, stream, net.now)
    assert server.stats["frames_in"] - before == FRAMES_PER_RECEIVE
    assert connection.more_input
    server.receive(connection, b"", net.now)
    assert connection.more_input
    server.receive(connection, b"", net.now)
    assert server.stats["frames_in"] - before == FRAMES_PER_RECEIVE * 2 + 10
    assert not connection.more_input
    net.pump()
    pongs = a.take()
    assert pongs == [Pong(index.to_bytes(8, "big")) for index in range(len(pongs))]
    assert len(pongs) == FRAMES_PER_RECEIVE * 2 + 10


def test_the_budget_leaves_no_flag_when_only_a_partial_frame_is_left() -> None:
    net = Network()
    a = net.connect("a")
    for _ in range(FRAMES_PER_RECEIVE + 1):
        a.client.send(Ping(b"abcdefgh"))
    stream = a.client.take_outbox()
    net.server.receive(a.connection, stream[:-1], net.now)
    assert not a.connection.more_input  # the last frame is not whole yet


def test_a_megabyte_of_empty_frames_then_a_ping() -> None:
    net = Network()
    a = net.connect("a")
    nonce = a.connection.channel.recv_nonce  # type: ignore[union-attr]
    net.send_raw("a", bytes(1 << 20))
    assert not a.closed and a.connection.channel.recv_nonce == nonce  # type: ignore[union-attr]
    net.send("a", Ping(b"abcdefgh"))
    assert a.take() == [Pong(b"abcdefgh")]


def test_input_held_while_a_routing_request_waits_is_bounded() -> None:
    """Issue 10 finding 3: what a client sends while its routing request waits
    for another shard is kept (the adapter stops reading meanwhile); more
    than MAX_HELD_INPUT kills it."""
    net = Network(shard=1)
    net.server.cluster.set_peer_shards([2], net.now)
    a = net.connect("a")
    net.server.cluster.apply_map_update((MapUpdate.SET, REMOTE_KEY, 2, OLD, None, None), net.now)
    net.send("a", RoutingRequest(REMOTE_KEY))
    assert a.connection.waiting_for is not None
    server = net.server
    server.receive(a.connection, bytes(MAX_HELD_INPUT // 2), net.now)
    server.receive(a.connection, bytes(MAX_HELD_INPUT // 2), net.now)
    assert a.connection.state is ConnectionState.CONFIRMED
    server.receive(a.connection, b"\x00\x00", net.now)
    assert a.connection.state is ConnectionState.CLOSED
    assert a.connection.close_reason == "hold_limit"
    assert server.stats["closed.hold_limit"] == 1
    server.check_invariants()


def test_held_input_is_read_when_the_answer_arrives() -> None:
    net = Network(shard=1)
    net.server.cluster.set_peer_shards([2], net.now)
    a = net.connect("a")
    net.server.cluster.apply_map_update((MapUpdate.SET, REMOTE_KEY, 2, OLD, None, None), net.now)
    a.client.send(RoutingRequest(REMOTE_KEY))
    a.client.send(Ping(b"after-it"))
    net.pump()
    assert a.take() == [RoutingResponse(16, REMOTE_KEY)]  # the PING waits
    epoch = a.connection.epoch
    net.server.cluster.receive_link(2, (Link.NOLINK, REMOTE_KEY, OLD, a.public_key, epoch), net.now)
    net.pump()
    assert a.take() == [Pong(b"after-it")]


@pytest.mark.parametrize(
    "damage",
    [
        lambda s, c: setattr(s, "connection_count", s.connection_count + 1),
        lambda s, c: s.by_epoch.pop(c.epoch),
        lambda s, c: s.connections_per_ip.update({"10.0.0.9": 1}),
        lambda s, c: s.cluster._waiting.add(c),
        lambda s, c: s._over_limit.append(c),
    ],
    ids=["count", "epochs", "per-ip", "waiting", "over-limit"],
)
def test_check_invariants_finds_a_broken_table(damage) -> None:  # type: ignore[no-untyped-def]
    net = Network(shard=1)
    a = net.connect("a")
    net.connect("b")
    net.server.check_invariants()
    damage(net.server, a.connection)
    with pytest.raises(InvariantBroken):
        net.server.check_invariants()


def test_kills_and_links_keep_the_invariants() -> None:
    net = Network()
    net.connect("a")
    b = net.connect("b")
    net.link("a", "b")
    net.peer_eof("a")
    assert b.take() == [DisconnectNotification(16)]
    net.server.check_invariants()


def test_frames_held_while_waiting_are_shared_out_after_the_answer() -> None:
    """The answer reads what waited, FRAMES_PER_RECEIVE at a time
    (``more_input`` for the adapter), in order."""
    net = Network(shard=1)
    net.server.cluster.set_peer_shards([2], net.now)
    a = net.connect("a")
    net.server.cluster.apply_map_update((MapUpdate.SET, REMOTE_KEY, 2, OLD, None, None), net.now)
    a.client.send(RoutingRequest(REMOTE_KEY))
    count = FRAMES_PER_RECEIVE + 44
    for index in range(count):
        a.client.send(Ping(index.to_bytes(8, "big")))
    net.pump()
    assert a.take() == [RoutingResponse(16, REMOTE_KEY)]
    epoch = a.connection.epoch
    net.server.cluster.receive_link(2, (Link.NOLINK, REMOTE_KEY, OLD, a.public_key, epoch), net.now)
    assert a.connection.more_input
    net.pump()
    assert a.take() == [Pong(index.to_bytes(8, "big")) for index in range(count)]
