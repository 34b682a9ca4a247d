"""The peer bus (worker/bus.py) over real ipc:// sockets, and when a worker's
bus forgets another shard (worker/cluster_member.py): only once that shard's
process is gone, never when the coordinator dropped it for silence."""

from __future__ import annotations

import asyncio
from pathlib import Path

import uvloop
import zmq

from relaycore.shardlink import MapUpdate
from worker.bus import PeerBus
from worker.cluster_member import ClusterMember

WANT = (1, b"a" * 32, 1 << 32 | 1, b"b" * 32, 2 << 32 | 1)


def test_a_forgotten_shard_gets_no_new_socket_and_what_is_sent_to_it_is_counted(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        context = zmq.Context()
        received: list[tuple[int, list]] = []
        one = PeerBus(tmp_path, 1, loop, lambda s, b: None, context)
        two = PeerBus(tmp_path, 2, loop, lambda s, b: received.append((s, list(b))), context)
        try:
            one.send([(2, WANT)])
            for _ in range(200):
                if received:
                    break
                await asyncio.sleep(0.01)
            assert received == [(1, [WANT])]

            one.forget(2)  # its process exited
            one.send([(2, WANT), (2, WANT)])
            await asyncio.sleep(0.1)
            assert 2 not in one._push  # no socket connecting to a dead endpoint
            assert one.stats["messages_to_gone_shard"] == 2
            assert received == [(1, [WANT])]
        finally:
            one.close()
            two.close()
            context.term()

    uvloop.run(asyncio.wait_for(body(), 30))


class _Server:
    shard = 1

    def __init__(self) -> None:
        self.updates: list[tuple] = []

    def apply_map_updates(self, updates: list, now: float) -> None:
        self.updates.extend(updates)


class _Bus:
    def __init__(self) -> None:
        self.forgotten: list[int] = []

    def forget(self, shard: int) -> None:
        self.forgotten.append(shard)


def test_the_bus_forgets_a_shard_only_when_its_process_exited() -> None:
    """A shard dropped for silence (SIGSTOP, a stalled host) may come back
    with the same id (tests/cluster_process/test_faults.py, the shard stopped
    past the silence limit): its socket and what is queued in it stay."""
    member = ClusterMember.__new__(ClusterMember)  # the adapter's decision alone
    member.links, member.bus = _Server(), _Bus()  # type: ignore[assignment]
    member.apply_map_update((MapUpdate.DROP_SHARD, 2, False), 0.0)  # silent
    assert member.bus.forgotten == []  # type: ignore[attr-defined]
    member.apply_map_update((MapUpdate.DROP_SHARD, 1, True), 0.0)  # ourselves (seen as gone)
    assert member.bus.forgotten == []  # type: ignore[attr-defined]
    member.apply_map_update((MapUpdate.DROP_SHARD, 2, True), 0.0)  # exited
    assert member.bus.forgotten == [2]  # type: ignore[attr-defined]
    assert len(member.links.updates) == 3  # type: ignore[attr-defined]
