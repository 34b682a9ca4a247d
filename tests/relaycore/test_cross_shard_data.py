"""Routed data between clients on two shards (R-DATA-4 over the peer bus):
the sender's read loop hands it to the bus, the receiver's
``CrossShard.receive_link`` re-seals it for its client with
``RelayServer.deliver_routed``, under the same rules as same-shard data:
R-OUT-2 (dropped, no nonce used, while the receiver is backed up) and only
the link's own two epochs (invariant 3)."""

from __future__ import annotations

from relaycore.packets import Ping, RoutedData, RoutingRequest
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
        PUBLIC_KEYS["bob"], receiver.epoch, b"alice#old",
    )  # fmt: skip
    receiving.cluster.receive_link(shard, message, cluster.now)
    assert receiving.stats["dropped.stale_link"] == 1
    message = (*message[:4], receiver.epoch + 1, *message[5:])
    receiving.cluster.receive_link(shard, message, cluster.now)
    assert receiving.stats["dropped.stale_epoch"] == 1
    assert receiver.outbox == []
