"""OOB from another shard for a connection that was replaced (R-CONF-3)
while the sender's replica still maps the key to it (issue 12): delivered to
the key's current connection, as one process would (R-OOB-2)."""

from __future__ import annotations

from relaycore.packets import OobReceive
from relaycore.shardlink import Link, MapUpdate
from tests.relaycore.harness import Network, secret_key_for

SHARD = 1
SENDER = bytes(range(32))


def test_oob_for_a_replaced_epoch_reaches_the_newer_local_connection() -> None:
    net = Network(shard=SHARD)
    old = net.connect("a")
    old_epoch = old.connection.epoch
    new = net.connect("a2", secret_key_for("a"))  # R-CONF-3: old is closed
    assert old.closed
    net.server.cluster.receive_link(
        2, (Link.OOB, SENDER, new.public_key, old_epoch, b"hi"), net.now
    )
    net.pump()
    assert new.take() == [OobReceive(SENDER, b"hi")]
    assert net.server.stats["oob_redirected"] == 1


def test_oob_for_a_replaced_epoch_is_forwarded_once_to_the_current_shard() -> None:
    net = Network(shard=SHARD)
    old = net.connect("a")
    old_epoch = old.connection.epoch
    new_epoch = (3 << 32) | 7
    net.server.cluster.apply_map_update(
        (MapUpdate.SET, old.public_key, 3, new_epoch, SHARD, old_epoch), net.now
    )
    net.pump()
    assert old.closed  # replaced on shard 3
    net.server.cluster.take_bus(net.now)
    net.server.cluster.receive_link(
        2, (Link.OOB, SENDER, old.public_key, old_epoch, b"hi"), net.now
    )
    assert net.server.cluster.take_bus(net.now) == [
        (3, (Link.OOB_FORWARDED, SENDER, old.public_key, new_epoch, b"hi"))
    ]
    # A forwarded copy that finds a stale epoch again stops here (no ping-pong).
    forwarded = (Link.OOB_FORWARDED, SENDER, old.public_key, old_epoch, b"hi")
    net.server.cluster.receive_link(3, forwarded, net.now)
    assert net.server.cluster.take_bus(net.now) == []
    assert net.server.stats["dropped.stale_epoch"] == 1
    assert net.server.stats["oob_forwarded"] == 1


def test_oob_for_an_ended_key_is_dropped() -> None:
    net = Network(shard=SHARD)
    old = net.connect("a")
    old_epoch = old.connection.epoch
    net.peer_eof("a")
    net.server.cluster.receive_link(
        2, (Link.OOB, SENDER, old.public_key, old_epoch, b"hi"), net.now
    )
    assert net.server.cluster.take_bus(net.now) == []
    assert net.server.stats["dropped.stale_epoch"] == 1
