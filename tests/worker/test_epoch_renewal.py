"""A worker whose epochs run low asks, once, to be replaced by a fresh
incarnation (issue 10 finding 9): its counter never carries into the shard bits."""

from __future__ import annotations

import asyncio

from relaycore.options import RelayOptions
from relaycore.shardlink import EPOCH_COUNTER_MAX, EPOCH_RENEW_MARGIN
from worker.shard import Shard


def test_tick_asks_for_replacement_once_when_epochs_run_low() -> None:
    loop = asyncio.new_event_loop()
    try:
        shard = Shard(bytes(range(32)), RelayOptions(), loop, shard_id=3)
        calls: list[int] = []
        shard.on_epochs_low = lambda: calls.append(shard.server.cluster.epochs_left)
        shard._tick()
        assert calls == []  # plenty left
        shard.server.cluster._epoch_serial = EPOCH_COUNTER_MAX - EPOCH_RENEW_MARGIN
        shard._tick()
        assert calls == []  # exactly the margin left: not yet
        shard.server.cluster._epoch_serial += 1
        shard._tick()
        shard._tick()
        assert calls == [EPOCH_RENEW_MARGIN - 1]  # once
        if shard._timer is not None:
            shard._timer.cancel()
    finally:
        loop.close()
