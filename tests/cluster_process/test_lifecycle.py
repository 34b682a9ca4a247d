"""Stopping (SIGTERM) and rolling reload (SIGHUP) of a real cluster."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
from collections.abc import Callable

import pytest

from cluster.client import ConnectionClosed, RelayClient
from relaycore.packets import DisconnectNotification
from tests.cluster_process.support import (
    Cluster,
    Recorder,
    check_data,
    closed_within,
    link,
    pid_alive,
    run,
    wait_until,
)

STOP_BOUND = 5.0  # seconds: `cluster start` exits within this after SIGTERM
EXIT_GRACE = 1.0  # seconds for the kernel to reap children after the supervisor exits


async def sigterm_and_wait(cluster: Cluster) -> float:
    """SIGTERM the supervisor (by PID); seconds until it exited."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    os.kill(cluster.relay.pid, signal.SIGTERM)
    await wait_until(lambda: not cluster.relay.running, STOP_BOUND + 3.0, "the supervisor to exit")
    return loop.time() - started


async def assert_children_gone(pids: set[int]) -> None:
    await wait_until(
        lambda: not any(pid_alive(pid) for pid in pids),
        EXIT_GRACE,
        f"workers and coordinator {sorted(pids)} to be gone",
    )
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_sigterm_stops_everything_within_the_bound(make_cluster: Callable[..., Cluster]) -> None:
    cluster = make_cluster(2)
    first, second = cluster.shards()
    children = cluster.child_pids()
    assert len(children) == 3

    async def body() -> None:
        a = await cluster.connect(first)
        b = await cluster.connect(second)
        await link(a, b)
        shared = await cluster.connect()
        took = await sigterm_and_wait(cluster)
        print(f"\nSIGTERM: supervisor exited after {took:.3f} s")
        assert took < STOP_BOUND
        assert cluster.relay.stop() == 0  # already exited: just its code
        await assert_children_gone(children)
        for client in (a, b, shared):  # every session was closed
            async with asyncio.timeout(1.0):
                await asyncio.shield(client.closed)

    run(body())


def test_sigterm_with_a_hung_worker_still_stops_within_the_bound(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A worker that does not react to SIGTERM (stopped here) is killed in
    time: the whole stop stays within 5 s and nothing is left behind."""
    cluster = make_cluster(2)
    hung, _ = cluster.shards()
    children = cluster.child_pids()

    async def body() -> None:
        os.kill(hung.pid, signal.SIGSTOP)
        try:
            took = await sigterm_and_wait(cluster)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung.pid, signal.SIGCONT)
        print(f"\nSIGTERM with a stopped worker: supervisor exited after {took:.3f} s")
        assert took < STOP_BOUND
        await assert_children_gone(children)

    run(body())


def test_sighup_rolling_reload_never_closes_the_port(make_cluster: Callable[..., Cluster]) -> None:
    """While a client keeps pinging through the shared port (reconnecting
    when its worker is replaced, which is expected) and a prober connects
    every 50 ms, SIGHUP replaces every worker: no connection attempt is ever
    refused, "Reload complete" is printed, the old workers are gone and the
    new shards relay across each other."""
    cluster = make_cluster(2)
    old = cluster.shards()
    mark = len(cluster.lines)
    relay = cluster.relay

    async def body() -> None:
        loop = asyncio.get_running_loop()
        done = asyncio.Event()
        refused: list[float] = []
        tcp_ok = 0
        handshakes = {"ok": 0, "failed": 0}
        pings = {"ok": 0, "reconnects": 0}

        async def probe_tcp() -> None:
            nonlocal tcp_ok
            while not done.is_set():
                try:
                    async with asyncio.timeout(2.0):
                        _, writer = await asyncio.open_connection(relay.host, relay.port)
                except ConnectionRefusedError:
                    refused.append(loop.time())
                except OSError as error:
                    if error.errno == errno.ECONNREFUSED:
                        refused.append(loop.time())
                    else:
                        raise
                else:
                    tcp_ok += 1
                    writer.close()
                    with contextlib.suppress(OSError):
                        await writer.wait_closed()
                await asyncio.sleep(0.05)

        async def probe_handshake() -> None:
            while not done.is_set():
                try:
                    client = await RelayClient.connect(
                        relay.host, relay.port, relay.public_key, timeout=2.0
                    )
                except ConnectionRefusedError:
                    refused.append(loop.time())
                except (ConnectionClosed, TimeoutError, OSError):
                    handshakes["failed"] += 1  # landed on a worker being replaced
                else:
                    handshakes["ok"] += 1
                    client.abort()
                await asyncio.sleep(0.05)

        async def pinger() -> None:
            client = await cluster.connect()
            while not done.is_set():
                try:
                    await client.ping(2.0)
                    pings["ok"] += 1
                except (ConnectionClosed, TimeoutError):
                    client.abort()
                    pings["reconnects"] += 1
                    client = await cluster.connect(timeout=3.0)
                await asyncio.sleep(0.05)
            await client.close()

        # A pair across the old workers: a's worker is replaced first, so b
        # gets exactly one disconnect before its own worker goes.
        a = await cluster.connect(old[0])
        b = await cluster.connect(old[1])
        _, id_b = await link(a, b)
        rec_b = Recorder(b)
        tasks = [loop.create_task(job()) for job in (probe_tcp, probe_handshake, pinger)]
        await asyncio.sleep(0.3)
        started = loop.time()
        os.kill(relay.pid, signal.SIGHUP)
        try:
            await cluster.wait_for_line(lambda line: line == "Reload complete", 20.0, start=mark)
            reloaded_in = loop.time() - started
            await asyncio.sleep(0.3)
        finally:
            done.set()
            async with asyncio.timeout(5.0):
                await asyncio.gather(*tasks)
        print(
            f"\nSIGHUP: reload complete after {reloaded_in:.3f} s; TCP connects ok {tcp_ok}, "
            f"refused {len(refused)}; handshakes ok {handshakes['ok']}, failed "
            f"{handshakes['failed']}; pings ok {pings['ok']}, reconnects {pings['reconnects']}"
        )
        assert refused == [], "the listening port refused connections during the reload"
        assert tcp_ok >= 5 and pings["ok"] >= 5
        await closed_within(a, 2.0)
        await closed_within(b, 2.0)
        await rec_b.stop()
        assert rec_b.kinds() == [DisconnectNotification(id_b)]

        new = cluster.shards()
        assert len(new) == len(old)
        assert not {s.shard for s in new} & {s.shard for s in old}
        await wait_until(
            lambda: not any(pid_alive(s.pid) for s in old), 2.0, "the old workers to exit"
        )
        for shard in new:
            assert pid_alive(shard.pid)
        # The new shards relay across each other and through the shared port.
        a = await cluster.connect(new[0])
        b = await cluster.connect(new[1])
        id_a, id_b = await link(a, b)
        await check_data(a, id_a, b, id_b, b"after reload")
        await check_data(b, id_b, a, id_a, b"after reload too")
        for _ in range(5):
            await (await cluster.connect(timeout=2.0)).close()

    run(body())


def test_kill_9_of_the_supervisor_leaves_no_orphan_serving(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Without its supervisor nobody restarts or stops the workers: they and
    the coordinator stop by themselves and the port closes."""
    cluster = make_cluster(2)
    children = cluster.child_pids()
    relay = cluster.relay

    async def body() -> None:
        loop = asyncio.get_running_loop()
        client = await cluster.connect()
        started = loop.time()
        os.kill(relay.pid, signal.SIGKILL)
        await wait_until(
            lambda: not any(pid_alive(pid) for pid in children), STOP_BOUND, "orphans to exit"
        )
        print(f"\nsupervisor kill -9: children gone after {loop.time() - started:.3f} s")
        await closed_within(client, 1.0)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(relay.host, relay.port)

    run(body())
