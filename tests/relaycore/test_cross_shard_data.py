"""Routed data between clients on two shards (R-DATA-4 over the peer bus):
the sender's read loop hands it to the bus, where the frames of one link
with nothing queued after them share one DATA message; the receiver's
``CrossShard.receive_link`` re-seals each for its client with
``RelayServer.deliver_routed``, under the same rules as same-shard data:
R-OUT-2 (dropped, no nonce used, while the receiver is backed up) and only
the link's own two epochs (invariant 3)."""

from __future__ import annotations

from relaycore.crossshard import DATA_MESSAGE_BYTES
from relaycore.packets import OobSend, Packet, Ping, RoutedData, RoutingRequest
from relaycore.shardlink import Link
from tests.cluster_model.simulation import PUBLIC_KEYS, ClientRecord, SimulatedCluster


def _linked_across() -> tuple[SimulatedCluster, int, int, int, int]:
    """alice on the first shard, bob on the second, linked; (cluster, alice's
    index, bob's index, alice's id for bob, bob's id for alice)."""
    cluster = SimulatedCluster(2)
    alice = cluster.connect("alice", 0)
    bob = cluster.connect("bob", 1)
    cluster.quiesce()
    cluster.send(alice.index, RoutingRequest(PUBLIC_KEYS["bob"]))
    cluster.send(bob.index, RoutingRequest(PUBLIC_KEYS["alice"]))
    cluster.quiesce()
    return cluster, alice.index, bob.index, _connected_id(alice), _connected_id(bob)


def _connected_id(record: ClientRecord) -> int:
    (connection_id,) = [event[1] for _, event in record.events if event[0] == "connect"]
    return connection_id


def _received(cluster: SimulatedCluster, index: int) -> list[tuple[int, bytes]]:
    """(connection id, payload) of each data packet the client decoded."""
    events = cluster.clients[index].events
    return [(event[1], event[2]) for _, event in events if event[0] == "data"]


def test_data_crosses_and_is_counted_on_the_receiving_shard() -> None:
    cluster, alice, bob, alice_id, bob_id = _linked_across()
    receiving = cluster.clients[bob].server
    before = receiving.stats["relayed"], receiving.stats["relayed_bytes"]
    cluster.send(alice, RoutedData(alice_id, b"alice#1"))
    cluster.send(alice, RoutedData(alice_id, b"alice#2"))
    cluster.quiesce()
    assert _received(cluster, bob) == [(bob_id, b"alice#1"), (bob_id, b"alice#2")]
    assert receiving.stats["relayed"] - before[0] == 2
    assert receiving.stats["relayed_bytes"] - before[1] == 2 * (1 + 7)
    assert cluster.clients[bob].violations == []


def test_r_out_2_cross_shard_data_dropped_without_a_nonce_while_backed_up() -> None:
    cluster, alice, bob, alice_id, bob_id = _linked_across()
    receiver = cluster.clients[bob].connection
    receiving = cluster.clients[bob].server
    send_nonce = receiver.channel.send_nonce  # type: ignore[union-attr]
    receiver.transport_backlog = receiving.options.output_soft_limit + 1
    cluster.send(alice, RoutedData(alice_id, b"alice#dropped"))
    cluster.quiesce()
    assert receiver.channel.send_nonce == send_nonce  # type: ignore[union-attr]
    assert receiving.stats["dropped.backpressure"] == 1
    receiver.transport_backlog = 0
    cluster.send(alice, RoutedData(alice_id, b"alice#after"))
    cluster.send(bob, Ping(b"still ok"))
    cluster.quiesce()
    assert _received(cluster, bob) == [(bob_id, b"alice#after")]  # decrypts: nonces in step


def test_data_naming_another_epoch_is_dropped_as_stale() -> None:
    """Invariant 3: a DATA message whose sender epoch is not the one the
    slot is linked to is not delivered (a message from an older session)."""
    cluster, alice, bob, _, _ = _linked_across()
    sender = cluster.clients[alice].connection
    receiving = cluster.clients[bob].server
    receiver = cluster.clients[bob].connection
    shard = cluster.clients[alice].server.shard
    message = (
        Link.DATA, PUBLIC_KEYS["alice"], sender.epoch + 1,
        PUBLIC_KEYS["bob"], receiver.epoch, [b"alice#old"],
    )  # fmt: skip
    receiving.cluster.receive_link(shard, message, cluster.now)
    assert receiving.stats["dropped.stale_link"] == 1
    message = (*message[:4], receiver.epoch + 1, *message[5:])
    receiving.cluster.receive_link(shard, message, cluster.now)
    assert receiving.stats["dropped.stale_epoch"] == 1
    assert receiver.outbox == []


def _one_read(cluster: SimulatedCluster, index: int, *packets: Packet) -> None:
    """Every packet framed first, then all of them read in one receive."""
    record = cluster.clients[index]
    for packet in packets:
        record.client.send(packet)
        record.sent(packet)
    cluster._pump(record.server)


def _bus_messages(cluster: SimulatedCluster) -> list[tuple]:
    return [message for queue in cluster.bus.values() for message in queue]


def test_a_reads_frames_for_one_link_travel_in_one_message() -> None:
    cluster, alice, bob, alice_id, bob_id = _linked_across()
    payloads = [b"alice#%d" % n for n in range(5)]
    _one_read(cluster, alice, *(RoutedData(alice_id, payload) for payload in payloads))
    (message,) = _bus_messages(cluster)
    assert message[0] == Link.DATA and list(message[-1]) == payloads
    cluster.quiesce()
    assert _received(cluster, bob) == [(bob_id, payload) for payload in payloads]
    assert cluster.clients[bob].server.stats["relayed"] == 5


def test_a_message_between_frames_closes_the_open_data_message() -> None:
    """Order per shard pair: data, then an OOB to the same shard, then data
    are three messages in that order, never the data merged past the OOB."""
    cluster, alice, bob, alice_id, _ = _linked_across()
    cluster.connect("carol", 1)
    cluster.quiesce()
    _one_read(
        cluster,
        alice,
        RoutedData(alice_id, b"alice#1"),
        RoutedData(alice_id, b"alice#2"),
        OobSend(PUBLIC_KEYS["carol"], b"oob"),
        RoutedData(alice_id, b"alice#3"),
    )
    kinds = [(message[0], message[-1]) for message in _bus_messages(cluster)]
    assert kinds == [
        (Link.DATA, [b"alice#1", b"alice#2"]),
        (Link.OOB, b"oob"),
        (Link.DATA, [b"alice#3"]),
    ]
    cluster.quiesce()
    assert [payload for _, payload in _received(cluster, bob)] == [
        b"alice#1", b"alice#2", b"alice#3",
    ]  # fmt: skip


def test_one_data_message_carries_at_most_data_message_bytes() -> None:
    cluster, alice, bob, alice_id, _ = _linked_across()
    payload = bytes(1000)
    count = DATA_MESSAGE_BYTES // 1000 * 2 + 3
    _one_read(cluster, alice, *(RoutedData(alice_id, payload) for _ in range(count)))
    messages = _bus_messages(cluster)
    assert len(messages) == 3
    assert all(sum(map(len, message[-1])) <= DATA_MESSAGE_BYTES for message in messages)
    assert sum(len(message[-1]) for message in messages) == count
    cluster.quiesce()
    assert len(_received(cluster, bob)) == count


def test_stale_data_is_counted_per_frame() -> None:
    cluster, alice, bob, _, _ = _linked_across()
    sender = cluster.clients[alice].connection
    receiving = cluster.clients[bob].server
    receiver = cluster.clients[bob].connection
    message = (
        Link.DATA, PUBLIC_KEYS["alice"], sender.epoch + 1,
        PUBLIC_KEYS["bob"], receiver.epoch, (b"alice#a", b"alice#b", b"alice#c"),
    )  # fmt: skip
    shard = cluster.clients[alice].server.shard
    receiving.cluster.receive_link(shard, message, cluster.now)
    assert receiving.stats["dropped.stale_link"] == 3
    message = (*message[:4], receiver.epoch + 1, message[5])
    receiving.cluster.receive_link(shard, message, cluster.now)
    assert receiving.stats["dropped.stale_epoch"] == 3
    assert receiver.outbox == []


def test_a_payload_too_long_for_a_frame_is_dropped_and_counted() -> None:
    """R-FRAME-6: a bus message is not a frame, and another worker (a bug, a
    newer version) may send a payload no frame can hold; it is dropped and
    counted, the rest of the message still delivered, no nonce used."""
    cluster, alice, bob, _, bob_id = _linked_across()
    sender = cluster.clients[alice].connection
    receiving = cluster.clients[bob].server
    receiver = cluster.clients[bob].connection
    message = (
        Link.DATA, PUBLIC_KEYS["alice"], sender.epoch,
        PUBLIC_KEYS["bob"], receiver.epoch, (b"alice#1", bytes(2100), b"alice#2"),
    )  # fmt: skip
    receiving.cluster.receive_link(cluster.clients[alice].server.shard, message, cluster.now)
    assert receiving.stats["dropped.data_too_long"] == 1
    cluster._pump(receiving)  # what the worker's flush does after a batch
    assert _received(cluster, bob) == [(bob_id, b"alice#1"), (bob_id, b"alice#2")]


def test_frames_before_a_bad_one_reach_the_bus_before_the_kill_unlinks() -> None:
    """R-FRAME-5 / R-KILL-1 across shards: the read's data for the other
    shard is queued before the UNLINK that the sender's kill sends, so the
    peer gets the data, then its 03 (the UNLINK first would make the data
    stale and lose it)."""
    cluster, alice, bob, alice_id, bob_id = _linked_across()
    record = cluster.clients[alice]
    for payload in (b"alice#1", b"alice#2"):
        record.client.send(RoutedData(alice_id, payload))
    record.client.outbox += (40).to_bytes(2, "big") + bytes(40)  # its MAC fails
    cluster._pump(record.server)
    assert [message[0] for message in _bus_messages(cluster)] == [Link.DATA, Link.UNLINK]
    cluster.quiesce()
    assert record.connection.close_reason == "R-FRAME-4"
    events = [event for _, event in cluster.clients[bob].events]
    assert events[-3:] == [
        ("data", bob_id, b"alice#1"), ("data", bob_id, b"alice#2"), ("disconnect", bob_id),
    ]  # fmt: skip
