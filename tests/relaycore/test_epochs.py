"""Epoch layout (issue 10 finding 9): ``epoch = shard << 32 | counter``
is u64 on the wire; the counter must never carry into the shard bits,
which would make this shard's epoch another shard's (the boundary at 2^32)."""

from __future__ import annotations

import pytest

from relaycore.relay import ConnectionState, RelayServer
from relaycore.shardlink import EPOCH_COUNTER_BITS, EPOCH_COUNTER_MAX, SHARD_ID_MAX
from tests.relaycore.harness import CONFIRM_PACKET, Network

SHARD = 5


def test_counter_stops_at_the_boundary_instead_of_carrying() -> None:
    net = Network(shard=SHARD)
    net.server.cluster._epoch_serial = EPOCH_COUNTER_MAX - 2  # as after ~4.3e9 confirmations
    epochs = []
    for name in ("a", "b"):
        epochs.append(net.connect(name).connection.epoch)
    assert epochs == [(SHARD << 32) | (EPOCH_COUNTER_MAX - 1), (SHARD << 32) | EPOCH_COUNTER_MAX]
    assert net.server.cluster.epochs_left == 0
    late = net.handshake("c")
    net.send("c", CONFIRM_PACKET)
    assert late.connection.state is ConnectionState.CLOSED
    assert late.close_reason == "epochs_exhausted"
    assert net.server.stats["closed.epochs_exhausted"] == 1
    for connection in net.server.by_key.values():  # no epoch of shard 6's
        assert connection.epoch >> EPOCH_COUNTER_BITS == SHARD
    assert set(net.server.by_epoch) == set(epochs)


def test_epochs_left_counts_down() -> None:
    net = Network(shard=SHARD)
    assert net.server.cluster.epochs_left == EPOCH_COUNTER_MAX
    net.connect("a")
    assert net.server.cluster.epochs_left == EPOCH_COUNTER_MAX - 1


def test_shard_id_must_fit_the_high_bits() -> None:
    RelayServer(bytes(32), shard=SHARD_ID_MAX)
    with pytest.raises(ValueError, match="does not fit"):
        RelayServer(bytes(32), shard=SHARD_ID_MAX + 1)
