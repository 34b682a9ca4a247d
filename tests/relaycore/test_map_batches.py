"""Map updates applied in batches, and the dead epochs they note (issue 13,
the replica term: every connection's SET and DEL reach every other shard)."""

from __future__ import annotations

import os
import time

import pytest

import relaycore.shardmap as shardmap
from relaycore.crossshard import CrossShard
from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    RoutingRequest,
    RoutingResponse,
)
from relaycore.relay import RelayServer
from relaycore.shardlink import Link, MapUpdate, RemotePeer
from relaycore.shardmap import DEAD_EPOCH_MEMORY, UNLINK_GRACE
from tests.relaycore.harness import Network, Peer

REMOTE = bytes([9]) * 32
REMOTE_EPOCH = 2 << 32 | 5


def _links() -> CrossShard:
    links = RelayServer(os.urandom(32), shard=1).cluster
    assert isinstance(links, CrossShard)
    return links


def _key(n: int) -> bytes:
    return n.to_bytes(32, "big")


def _set(n: int, shard: int = 2, replaced: tuple[int, int] | None = None) -> tuple:
    replaced_shard, replaced_epoch = replaced if replaced is not None else (None, None)
    return (MapUpdate.SET, _key(n), shard, shard << 32 | n, replaced_shard, replaced_epoch)


def _del(n: int, shard: int = 2) -> tuple:
    return (MapUpdate.DEL, _key(n), shard, shard << 32 | n)


def _state(links: CrossShard) -> tuple:
    return (
        dict(links.directory),
        set(links._dead),
        set(links._mapped),
        set(links._dropped_shards),
        set(links.peer_shards),
    )


def test_a_batch_does_what_the_same_updates_do_one_by_one() -> None:
    updates = [
        _set(1),
        _set(2),
        _set(3, shard=1),  # one of ours
        _del(1),
        _set(2, shard=3, replaced=(2, 2 << 32 | 2)),  # R-CONF-3 across shards
        _set(4, shard=4),
        (MapUpdate.DROP_SHARD, 4, True),
        _del(3, shard=1),
        _set(5),
    ]
    one_by_one, batched = _links(), _links()
    for update in updates:
        one_by_one.apply_map_update(update, 1.0)
    batched.apply_map_updates([list(update) for update in updates], 1.0)  # (msgpack: lists)
    assert _state(batched) == _state(one_by_one)
    assert RemotePeer(2, _key(1), 2 << 32 | 1) in batched._dead  # DEL
    assert RemotePeer(2, _key(2), 2 << 32 | 2) in batched._dead  # replaced
    assert RemotePeer(4, _key(4), 4 << 32 | 4) in batched._dead  # its shard dropped
    assert batched.directory[_key(2)] == RemotePeer(3, _key(2), 3 << 32 | 2)


def test_dead_epochs_are_remembered_for_their_memory_then_forgotten() -> None:
    links = _links()
    links.apply_map_updates([_set(1), _set(2)], 0.0)
    links.apply_map_updates([_del(1)], 1.0)
    links.apply_map_updates([_del(2)], 2.0)
    first, second = RemotePeer(2, _key(1), 2 << 32 | 1), RemotePeer(2, _key(2), 2 << 32 | 2)
    links.forget_dead(1.0 + DEAD_EPOCH_MEMORY - 0.01)
    links.tick(1.0 + DEAD_EPOCH_MEMORY - 0.01)
    assert first in links._dead and second in links._dead
    links.forget_dead(1.0 + DEAD_EPOCH_MEMORY)
    assert first not in links._dead and second in links._dead
    links.set_peer_shards([1, 2], 2.0 + DEAD_EPOCH_MEMORY)  # the coordinator's heartbeat
    assert not links._dead


def test_a_remote_noted_again_keeps_its_later_deadline_and_a_set_revives_one() -> None:
    links = _links()
    replaced = RemotePeer(2, _key(1), 2 << 32 | 1)
    links.apply_map_updates([_set(1), _set(1, shard=3, replaced=(2, replaced.epoch))], 0.0)
    links.apply_map_updates([_del(1)], 5.0)  # its DEL, read late: noted again
    links.forget_dead(DEAD_EPOCH_MEMORY + 1.0)
    assert replaced in links._dead  # (until 5 + DEAD_EPOCH_MEMORY)
    links.forget_dead(DEAD_EPOCH_MEMORY + 5.0)
    assert replaced not in links._dead
    links.apply_map_updates([_del(7)], 20.0)
    links.apply_map_updates([_set(7)], 20.5)  # registered again (after a drop): alive
    assert RemotePeer(2, _key(7), 2 << 32 | 7) not in links._dead
    links.forget_dead(40.0)
    assert not links._dead and not links._dead_order


def test_dead_epochs_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shardmap, "MAX_DEAD_EPOCHS", 100)
    links = _links()
    links.apply_map_updates([_del(n) for n in range(250)], 0.0)
    assert len(links._dead) == 100
    assert RemotePeer(2, _key(249), 2 << 32 | 249) in links._dead  # the newest kept
    assert RemotePeer(2, _key(149), 2 << 32 | 149) not in links._dead


def _forget_ms(count: int) -> float:
    """CPU ms for the publication and the tick after ``count`` dead epochs
    (a second of DELs) expired together."""
    links = _links()
    for n in range(count):
        links.apply_map_update(_del(n), n / count)
    now = 1.0 + DEAD_EPOCH_MEMORY + 0.5
    start = time.process_time()
    links.apply_map_update(_set(count + 1), now)  # the next publication
    links.set_peer_shards([1, 2], now)  # the next coordinator heartbeat
    links.tick(now)
    spent = time.process_time() - start
    assert len(links._dead) == 0
    return spent * 1000


def test_forgetting_dead_epochs_costs_linear_time() -> None:
    """CrossShard.tick found the oldest dead epochs by iterating the dict,
    and CPython keeps a hole per deleted entry: forgetting n at once cost
    O(n^2) (30 000: 265 ms; 22% of a peer worker's CPU under `cluster
    loadtest handshake`). Four times the entries must cost about four times
    as much, not sixteen."""
    small = min(_forget_ms(8_000) for _ in range(3))
    large = min(_forget_ms(32_000) for _ in range(3))
    assert large < 8 * small + 5, f"{small:.1f} ms -> {large:.1f} ms"


def _linked_across(net: Network) -> tuple[Peer, int]:
    """Client "a" here, linked to REMOTE's connection on shard 2; its slot id."""
    links = net.server.cluster
    a = net.connect("a")
    links.apply_map_updates([[MapUpdate.SET, REMOTE, 2, REMOTE_EPOCH, None, None]], net.now)
    net.send("a", RoutingRequest(REMOTE))
    (response,) = a.take()
    assert isinstance(response, RoutingResponse)
    assert a.connection is not None
    links.receive_link(
        2, (Link.LINKED, REMOTE, REMOTE_EPOCH, a.public_key, a.connection.epoch), net.now
    )
    net.pump()
    assert a.take() == [ConnectNotification(response.connection_id)]
    return a, response.connection_id


@pytest.mark.parametrize("update", ["del", "replaced"])
def test_a_link_to_a_connection_the_map_ended_ends_after_the_grace(update: str) -> None:
    """The map update overtook the UNLINK of the remote's own shard (or that
    was lost): the link is doomed, and ends UNLINK_GRACE later (R-KILL-1)."""
    net = Network(shard=1)
    a, connection_id = _linked_across(net)
    if update == "del":
        message = [MapUpdate.DEL, REMOTE, 2, REMOTE_EPOCH]
    else:  # R-CONF-3: the key connected again on shard 3
        message = [MapUpdate.SET, REMOTE, 3, 3 << 32 | 1, 2, REMOTE_EPOCH]
    net.server.cluster.apply_map_updates([message], net.now)
    net.tick(net.now + UNLINK_GRACE / 2)
    assert a.take() == []
    net.tick(net.now + UNLINK_GRACE)
    assert a.take() == [DisconnectNotification(connection_id)]
    assert net.server.stats["unlinked_by_map"] == 1
