"""Issue 10 findings 1-4 in the worker's adapters, over real loopback sockets
and ipc:// ZeroMQ sockets: an exception is contained where it arises (the
timer keeps firing, a reader keeps reading, one connection is killed, the
counter moves), a connection waiting for another shard is not read, and a
long burst of frames is shared out over loop turns."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgpack
import pytest
import uvloop
import zmq

from coordinator.client import CoordinatorClient
from relaycore.constants import PacketId
from relaycore.crossshard import CrossShard
from relaycore.packets import DisconnectNotification, Ping, Pong, RoutingResponse
from relaycore.relay import FRAMES_PER_RECEIVE, MAX_HELD_INPUT, ConnectionState
from relaycore.shardlink import Link, MapUpdate
from runtime.ipc import pack, router_endpoint, updates_endpoint
from tests.coordinator.replica import RecordingHandler
from tests.support.inprocess import live_relay, wait_for
from tests.worker.test_shard import linked_pair
from worker.bus import PeerBus
from worker.shard import EMPTY_FRAMES_PAUSE

WANT = (1, b"a" * 32, 1 << 32 | 1, b"b" * 32, 2 << 32 | 1)


def run(coro):  # type: ignore[no-untyped-def]
    return uvloop.run(asyncio.wait_for(coro, 30))


def test_the_timer_keeps_firing_after_the_core_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception in tick() used to stop the timer for good: no pings, no
    handshake timeouts. Now it is counted and the next tick comes."""

    async def scenario() -> None:
        async with live_relay(tick_interval=0.02) as relay:
            shard = relay.shard
            broken: list[str] = []
            shard.on_broken = broken.append
            real_tick, calls = shard.server.tick, []

            def tick(now: float) -> None:
                calls.append(now)
                if len(calls) == 1:
                    raise RuntimeError("injected")
                real_tick(now)

            monkeypatch.setattr(shard.server, "tick", tick)
            await wait_for(lambda: len(calls) >= 5)
            assert shard.server.stats["internal_errors.tick"] == 1
            assert broken == []  # one failure is not a wedged table

    run(scenario())


def test_a_timer_that_keeps_failing_ends_the_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        async with live_relay(tick_interval=0.02) as relay:
            shard = relay.shard
            broken: list[str] = []
            shard.on_broken = broken.append

            def tick(now: float) -> None:
                raise RuntimeError("injected")

            monkeypatch.setattr(shard.server, "tick", tick)
            await wait_for(lambda: broken)
            assert "3 times in a row" in broken[0]

    run(scenario())


def test_an_exception_in_data_received_kills_that_connection_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection whose frame raised is killed (its linked peer is told,
    as for any kill); the other clients are served on."""

    async def scenario() -> None:
        async with live_relay() as relay:
            server = relay.shard.server
            a, b = await linked_pair(relay)
            c = await relay.client()
            real = server._handle_packet

            def handle(connection, plain, now):  # type: ignore[no-untyped-def]
                if connection.public_key == a.public_key and plain[0] == PacketId.PING:
                    raise KeyError("injected")
                return real(connection, plain, now)

            monkeypatch.setattr(server, "_handle_packet", handle)
            a.send(Ping(b"breaks!!"))
            assert await b.expect(DisconnectNotification) == DisconnectNotification(16)
            await wait_for(lambda: a.closed.done())
            assert server.stats["internal_errors.data_received"] == 1
            assert server.stats["closed.internal_error"] == 1
            assert await c.ping() < 1.0 and await b.ping() < 1.0
            server.check_invariants()

    run(scenario())


def test_a_broken_table_after_a_contained_error_ends_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def scenario() -> None:
        async with live_relay() as relay:
            shard = relay.shard
            broken: list[str] = []
            shard.on_broken = broken.append
            a = await relay.client()
            real = shard.server._handle_packet

            def handle(connection, plain, now):  # type: ignore[no-untyped-def]
                shard.server.connection_count += 7  # half-updated, then raises
                raise RuntimeError("injected")

            monkeypatch.setattr(shard.server, "_handle_packet", handle)
            a.send(Ping(b"12345678"))
            await wait_for(lambda: broken)
            monkeypatch.setattr(shard.server, "_handle_packet", real)
            shard.server.connection_count -= 7
            assert "connections counted" in broken[0]

    run(scenario())


def test_the_peer_bus_reader_survives_a_deliver_that_raises_and_bad_batches(
    tmp_path: Path,
) -> None:
    """Finding 1: an exception from deliver escaped _readable, which was then
    never called again (ZeroMQ's descriptor signals changes only)."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        context = zmq.Context()
        received: list[list] = []
        errors: list[str] = []

        def deliver(shard: int, batch: list) -> None:
            if batch[0][0] == 99:
                raise ValueError("injected")
            received.append(list(batch))

        one = PeerBus(tmp_path, 1, loop, lambda s, b: None, context)
        two = PeerBus(tmp_path, 2, loop, deliver, context, on_error=errors.append)
        raw = context.socket(zmq.PUSH)
        raw.connect(f"ipc://{tmp_path / 'shard-2.sock'}")
        try:
            one.send([(2, (99,))])
            await asyncio.sleep(0.05)
            raw.send(msgpack.packb([1, 5]))  # a batch that is no list
            raw.send(b"\xc1")  # not msgpack
            raw.send(msgpack.packb(7))
            for _ in range(3):
                one.send([(2, WANT)])
                await asyncio.sleep(0.02)
            await wait_for(lambda: len(received) == 3)
            assert errors == ["bus_batch"]
            assert two.stats["undecodable"] == 3
        finally:
            raw.close(linger=0)
            one.close()
            two.close()
            context.term()

    uvloop.run(asyncio.wait_for(body(), 30))


def test_the_coordinator_reader_skips_a_message_that_raises(tmp_path: Path) -> None:
    async def body() -> None:
        context = zmq.Context.instance()
        router = context.socket(zmq.ROUTER)
        router.bind(router_endpoint(tmp_path))
        publisher = context.socket(zmq.PUB)
        publisher.bind(updates_endpoint(tmp_path))
        replica = RecordingHandler()
        applied: list[tuple] = []

        def apply(update: tuple, now: float) -> None:
            if update[1] == b"bad":
                raise RuntimeError("injected")
            applied.append(update)

        replica.apply_map_update = apply  # type: ignore[method-assign]
        errors: list[str] = []
        worker = CoordinatorClient(
            tmp_path, 7, asyncio.get_running_loop(), replica, on_error=errors.append
        )  # type: ignore[arg-type]
        worker.start()
        try:
            assert router.poll(3000)
            identity, _ = router.recv_multipart()  # hello
            while True:
                assert router.poll(3000)
                _, payload = router.recv_multipart()
                if b"snapshot" in payload:
                    break
            router.send_multipart([identity, pack(["snapshot", 1, 0, [], 1])])
            await wait_for(lambda: not worker.syncing)
            publisher.send(b"\xc1garbage")  # does not decode
            publisher.send(pack(["u", 1, 17]))  # decodes, then raises
            publisher.send(pack(["u", 1, [[1, [MapUpdate.DEL, b"bad", 2, 5]]]]))
            publisher.send(pack(["u", 1, [[2, [MapUpdate.DEL, b"good", 2, 6]]]]))
            await wait_for(lambda: len(errors) == 3)
            assert errors == ["coordinator_message"] * 3
            # The update that raised was not applied: the next one is a gap,
            # so the worker fetches a snapshot (and reads on meanwhile).
            while True:
                assert router.poll(3000)
                _, payload = router.recv_multipart()
                if b"snapshot" in payload:
                    break
            assert applied == [] and worker.syncing
            router.send_multipart([identity, pack(["snapshot", 1, 2, [], 2])])
            await wait_for(lambda: not worker.syncing)
            publisher.send(pack(["u", 1, [[3, [MapUpdate.DEL, b"next", 2, 7]]]]))
            await wait_for(lambda: applied == [(MapUpdate.DEL, b"next", 2, 7)])
        finally:
            worker.close()
            router.close(linger=0)
            publisher.close(linger=0)

    uvloop.run(asyncio.wait_for(body(), 10))


def test_a_waiting_connection_is_not_read_and_is_read_again_when_answered() -> None:
    """Finding 3: while its routing request waits for another shard, what a
    client sends stays in the kernel (TCP pushes back), not in our memory;
    the answer makes the relay read again and every frame is handled."""

    async def scenario() -> None:
        async with live_relay() as relay:
            server = relay.shard.server
            server.shard = 1  # a shard of a cluster, no bus
            server.cluster = CrossShard(server, 1)
            server.cluster.set_peer_shards([2], relay.shard.loop.time())
            remote = bytes(range(32))
            server.cluster.apply_map_update(
                (MapUpdate.SET, remote, 2, 2 << 32 | 1, None, None), relay.shard.loop.time()
            )
            a = await relay.client()
            a.route_request(remote)
            assert (await a.expect(RoutingResponse)).connection_id == 16
            connection = server.by_key[a.public_key]
            assert connection.waiting_for is not None
            for _ in range(8 * 1024):  # 8 MiB of pings, ~1 KiB frames of zeros between
                a.core.send(Ping(b"12345678"))
                a.core.outbox += bytes(1000)
            a.flush()
            await asyncio.sleep(0.5)
            assert connection.state is ConnectionState.CONFIRMED
            assert connection.channel.buffered <= MAX_HELD_INPUT  # type: ignore[union-attr]
            assert a.transport.get_write_buffer_size() > 1 << 20  # the client is held back
            epoch = connection.epoch
            server.cluster.receive_link(
                2, (Link.NOLINK, remote, 2 << 32 | 1, a.public_key, epoch), 0
            )
            relay.shard.flush()
            for _ in range(8 * 1024):
                assert await a.expect(Pong) == Pong(b"12345678")
            assert server.stats["frames_in"] >= 8 * 1024

    run(scenario())


def test_a_long_burst_of_frames_is_shared_out_over_loop_turns() -> None:
    """Finding 4: one data_received handles FRAMES_PER_RECEIVE frames; the
    rest on later turns, while other clients are served in between."""

    async def scenario() -> None:
        async with live_relay() as relay:
            server = relay.shard.server
            a, b = await relay.client(), await relay.client()
            calls: list[int] = []
            real = server.receive

            def receive(connection, data, now):  # type: ignore[no-untyped-def]
                before = server.stats["frames_in"]
                real(connection, data, now)
                calls.append(server.stats["frames_in"] - before)

            server.receive = receive  # type: ignore[method-assign]
            count = FRAMES_PER_RECEIVE * 20
            for _ in range(count):
                a.core.send(Ping(b"burst..."))
            a.flush()
            assert await b.ping() < 1.0
            for _ in range(count):
                assert await a.expect(Pong) == Pong(b"burst...")
            assert max(calls) == FRAMES_PER_RECEIVE
            assert sum(calls) >= count

    run(scenario())


def test_a_stream_of_empty_frames_is_read_one_share_per_pause() -> None:
    """Finding 4: reads that bring only empty frames make the relay wait
    EMPTY_FRAMES_PAUSE before reading that client again, so a stream of
    them cannot take a CPU; other clients are served meanwhile."""

    async def scenario() -> None:
        async with live_relay() as relay:
            a, b = await relay.client(), await relay.client()
            loop = asyncio.get_running_loop()
            started = loop.time()
            a.send_raw(bytes(4 << 20))
            a.send(Ping(b"afterall"))
            assert await b.ping() < 0.1
            assert await a.expect(Pong) == Pong(b"afterall")
            reads = (4 << 20) // 256_000  # at most 256000 bytes per read
            assert loop.time() - started >= reads * EMPTY_FRAMES_PAUSE * 0.9
            assert not a.closed.done()

    run(scenario())
