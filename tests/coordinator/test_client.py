"""The workers' end of the coordinator protocol against a scripted coordinator
(a real ROUTER and PUB on ipc in a private directory)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import uvloop
import zmq

import coordinator.client as client_module
import coordinator.replica as replica_module
from coordinator.client import CoordinatorClient
from runtime.ipc import pack, router_endpoint, unpack, updates_endpoint
from tests.coordinator.replica import RecordingHandler


def test_an_unanswered_snapshot_request_is_made_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lost snapshot answer must not leave the worker "syncing" for ever
    (it would buffer every map update and never apply one)."""
    monkeypatch.setattr(client_module, "HEARTBEAT_INTERVAL", 0.05)
    monkeypatch.setattr(replica_module, "SNAPSHOT_RETRY", 0.2)
    context = zmq.Context.instance()
    router = context.socket(zmq.ROUTER)
    router.bind(router_endpoint(tmp_path))
    publisher = context.socket(zmq.PUB)
    publisher.bind(updates_endpoint(tmp_path))

    async def body() -> None:
        replica = RecordingHandler()
        worker = CoordinatorClient(tmp_path, 7, asyncio.get_running_loop(), replica)  # type: ignore[arg-type]
        worker.start()
        asked: list[int] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while len(asked) < 2 and loop.time() < deadline:
            if router.poll(10):
                identity, payload = router.recv_multipart()
                message = unpack(payload)
                if message[0] == "snapshot":
                    asked.append(message[1])
                    if len(asked) == 2:  # the first is "lost"; answer the second
                        router.send_multipart([identity, pack(["snapshot", 1, 0, [], message[1]])])
            await asyncio.sleep(0)
        assert asked == [1, 2]
        for _ in range(100):
            if not worker.syncing:
                break
            await asyncio.sleep(0.01)
        assert not worker.syncing
        assert replica.resets == [([], False)] and replica.reset_requests == [2]
        worker.close()

    try:
        uvloop.run(asyncio.wait_for(body(), 10))
    finally:
        router.close(linger=0)
        publisher.close(linger=0)
