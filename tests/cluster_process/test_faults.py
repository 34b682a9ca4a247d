"""Fault injection on a real cluster: kill -9 of a worker and of the
coordinator, a worker stopped (SIGSTOP) while others send to it.

Processes are signalled by the PIDs the supervisor printed (``--shard-ports``),
never by name. Each test prints the numbers it measured (``pytest -s``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from relaycore.packets import ConnectNotification, DisconnectNotification, RoutedData
from tests.cluster_process.support import (
    COORDINATOR_RE,
    Cluster,
    Pump,
    Recorder,
    check_data,
    check_oob,
    closed_within,
    expect_event,
    link,
    request,
    run,
    sequence_numbers,
)

PACE = 0.02  # seconds between the numbered packets of a pump
STALL = 2.0  # seconds a peer shard stays stopped (the coordinator drops it after 3 s)
FLOOD_PAUSE = 0.001  # seconds between bursts of 50 packets: up to about 50,000 packets/s


def is_data(event: object) -> bool:
    return isinstance(event, RoutedData)


def is_disconnect(event: object) -> bool:
    return isinstance(event, DisconnectNotification)


def is_connect(event: object) -> bool:
    return isinstance(event, ConnectNotification)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def assert_all_delivered(
    receiver: Recorder, connection_id: int, pump: Pump, timeout: float = 3.0
) -> None:
    """Every numbered packet of a stopped pump arrived, once, in order."""
    await receiver.wait_for(
        lambda event: (
            isinstance(event, RoutedData)
            and event.payload == pump.tag + (pump.sent - 1).to_bytes(4, "big")
        ),
        timeout,
        f"the last {pump.tag!r} packet",
    )
    assert sequence_numbers(receiver, connection_id, pump.tag) == list(range(pump.sent))


def test_kill_9_of_a_worker_only_its_clients_notice(make_cluster: Callable[..., Cluster]) -> None:
    """A1 (victim shard) - B1 (other shard) and C - D (both on the other shard)
    exchange numbered packets; the victim gets SIGKILL. A1 loses its
    connection, B1 gets one DISCONNECT_NOTIFICATION within 2 s, a new worker
    serves within 3 s, A1 reconnects there and relinks, and C - D notice
    nothing: no event but their own data, none of it lost."""
    cluster = make_cluster(2)
    victim, survivor = cluster.shards()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        a1_key = os.urandom(32)
        a1 = await cluster.connect(victim, secret_key=a1_key)
        b1 = await cluster.connect(survivor)
        c = await cluster.connect(survivor)
        d = await cluster.connect(survivor)
        id_a1, id_b1 = await link(a1, b1)
        id_c, id_d = await link(c, d)
        rec_a1, rec_b1, rec_c, rec_d = (Recorder(x) for x in (a1, b1, c, d))
        pump_a1 = Pump(a1, id_a1, b"A1", PACE)
        pump_b1 = Pump(b1, id_b1, b"B1", PACE)
        pump_c = Pump(c, id_c, b"C", PACE)
        pump_d = Pump(d, id_d, b"D", PACE)
        await rec_b1.wait_for(is_data, 3.0, "A1's data on B1")
        await rec_a1.wait_for(is_data, 3.0, "B1's data on A1")
        await asyncio.sleep(0.2)

        killed_at = loop.time()
        os.kill(victim.pid, signal.SIGKILL)
        await closed_within(a1, 2.0)
        notified_at, _ = await rec_b1.wait_for(is_disconnect, 2.0, "B1's disconnect")
        await pump_b1.stop()  # B1's slot is requested again: its data would be dropped
        replacement = await cluster.wait_for_shard(victim.worker, victim.shard, 3.0)
        probe = await cluster.connect(replacement, timeout=3.0)
        serving_at = loop.time()
        assert serving_at - killed_at < 3.0
        for _ in range(8):  # the shared port takes new clients too
            await (await cluster.connect(timeout=3.0)).close()
        await probe.close()
        print(
            f"\nworker kill -9: peer notified after {notified_at - killed_at:.3f} s, "
            f"new worker (pid {replacement.pid}) served after {serving_at - killed_at:.3f} s"
        )

        # Before the kill A1's numbered packets reached B1 in order; then B1
        # got exactly one disconnect and nothing else.
        numbers = sequence_numbers(rec_b1, id_b1, b"A1")
        assert numbers == list(range(len(numbers))) and numbers
        assert [e for e in rec_b1.kinds() if not is_data(e)] == [DisconnectNotification(id_b1)]

        # A1 reconnects (as toxcore does) on the new worker: linked to B1 again.
        a1_again = await cluster.connect(replacement, secret_key=a1_key)
        id_again = await request(a1_again, b1.public_key)
        assert await expect_event(a1_again, ConnectNotification) == ConnectNotification(id_again)
        await rec_b1.wait_for(is_connect, 3.0, "B1's connect notification")
        a1_again.send_data(id_again, b"back")
        await rec_b1.wait_for(lambda e: e == RoutedData(id_b1, b"back"), 3.0, "data after relink")
        assert [e for e in rec_b1.kinds() if not is_data(e)] == [
            DisconnectNotification(id_b1),
            ConnectNotification(id_b1),
        ]
        await check_oob(b1, a1_again, b"oob to the new worker")

        # C - D kept relaying through all of it, lost nothing, saw nothing else.
        during = [
            stamp
            for stamp, event in rec_d.events
            if is_data(event) and killed_at < stamp < killed_at + 0.5
        ]
        assert during, "C - D relayed nothing right after the kill"
        await asyncio.sleep(0.2)
        await pump_c.stop()
        await pump_d.stop()
        await assert_all_delivered(rec_d, id_d, pump_c)
        await assert_all_delivered(rec_c, id_c, pump_d)
        assert all(is_data(e) for e in rec_c.kinds() + rec_d.kinds())
        assert not c.closed.done() and not d.closed.done()
        await c.ping(2.0)
        await d.ping(2.0)
        await pump_a1.stop()
        for recorder in (rec_a1, rec_b1, rec_c, rec_d):
            await recorder.stop()

    run(body())


def test_kill_9_of_the_coordinator_links_keep_relaying(
    make_cluster: Callable[..., Cluster],
) -> None:
    """A - B across shards exchange numbered packets; the coordinator gets
    SIGKILL. The link keeps relaying during the outage, G - H (connected and
    requested during the outage) link once it is back, and new clients E - F
    link across shards within a few seconds."""
    cluster = make_cluster(2)
    first, second = cluster.shards()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        a = await cluster.connect(first)
        b = await cluster.connect(second)
        id_a, id_b = await link(a, b)
        rec_a, rec_b = Recorder(a), Recorder(b)
        pump_a, pump_b = Pump(a, id_a, b"A", PACE), Pump(b, id_b, b"B", PACE)
        await rec_b.wait_for(is_data, 3.0, "A's data")

        (old_pid,) = cluster.coordinator_pids()
        mark = len(cluster.lines)
        killed_at = loop.time()
        os.kill(old_pid, signal.SIGKILL)
        # Clients that connect and request each other while it is down.
        g = await cluster.connect(first)
        h = await cluster.connect(second)
        id_g = await request(g, h.public_key)
        id_h = await request(h, g.public_key)
        connected_in_outage_at = loop.time()

        line = await cluster.wait_for_line(
            lambda text: bool(COORDINATOR_RE.match(text)), 5.0, start=mark
        )
        restarted_at = loop.time()
        match = COORDINATOR_RE.match(line)
        assert match is not None and int(match["pid"]) != old_pid
        in_outage = [s for s, e in rec_b.events if is_data(e) and killed_at < s < restarted_at]
        assert in_outage, "A - B relayed nothing while the coordinator was down"

        assert await expect_event(g, ConnectNotification, 5.0) == ConnectNotification(id_g)
        assert await expect_event(h, ConnectNotification, 5.0) == ConnectNotification(id_h)
        gh_linked_at = loop.time()
        await check_data(g, id_g, h, id_h, b"g->h")
        await check_data(h, id_h, g, id_g, b"h->g")

        e = await cluster.connect(first)
        f = await cluster.connect(second)
        id_e, id_f = await link(e, f, timeout=5.0)
        ef_linked_at = loop.time()
        await check_data(e, id_e, f, id_f, b"e->f")
        await check_data(f, id_f, e, id_e, b"f->e")
        print(
            f"\ncoordinator kill -9: new coordinator after {restarted_at - killed_at:.3f} s; "
            f"pair requested in the outage ({connected_in_outage_at - killed_at:.3f} s) "
            f"linked after {gh_linked_at - killed_at:.3f} s; new pair linked "
            f"{ef_linked_at - gh_linked_at:.3f} s later; A-B packets during the outage: "
            f"{len(in_outage)}"
        )

        await pump_a.stop()
        await pump_b.stop()
        await assert_all_delivered(rec_b, id_b, pump_a)
        await assert_all_delivered(rec_a, id_a, pump_b)
        assert all(is_data(event) for event in rec_a.kinds() + rec_b.kinds())
        for recorder in (rec_a, rec_b):
            await recorder.stop()

    run(body())


def test_a_stopped_peer_shard_does_not_block_the_sender(
    make_cluster: Callable[..., Cluster],
) -> None:
    """B's worker is stopped (SIGSTOP) while A floods B from another shard:
    A's shard keeps serving its other clients (C's pings, a local pair keeps
    relaying, new connections are accepted). Stopped for less than the
    coordinator's 3 s silence limit, the link survives.

    The flood pauses 1 ms between bursts: flooding without pause saturated
    this 2-core machine (test process and both shards) and delayed pings by
    up to 0.5 s with or without a stopped peer; paced, it still queues about
    25 MB/s for the stopped peer, and pings take a few ms."""
    cluster = make_cluster(2)
    sending, stuck = cluster.shards()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        a = await cluster.connect(sending)
        b = await cluster.connect(stuck)
        c = await cluster.connect(sending)
        d = await cluster.connect(sending)
        id_a, id_b = await link(a, b)
        id_c, id_d = await link(c, d)
        rec_b = Recorder(b)
        rss_before = rss_kib(sending.pid)
        flooded = 0
        rtts: list[float] = []
        local_ok = 0

        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            started = loop.time()

            async def flood() -> None:
                nonlocal flooded
                payload = os.urandom(1000)
                assert a.transport is not None
                while loop.time() - started < STALL:
                    if a.transport.get_write_buffer_size() > 1 << 20:
                        await asyncio.sleep(0.005)  # the relay reads slower: wait
                        continue
                    for _ in range(50):
                        a.send_data(id_a, payload)
                    flooded += 50
                    await asyncio.sleep(FLOOD_PAUSE)

            flooder = loop.create_task(flood())
            while not flooder.done():
                rtts.append(await c.ping(STALL + 1.0))
                await check_data(c, id_c, d, id_d, b"local %d" % local_ok)
                local_ok += 1
                await asyncio.sleep(0.05)
            await flooder
            fresh = await cluster.connect(sending, timeout=1.0)
            rtts.append(await fresh.ping(1.0))
            await fresh.close()
            rss_after = rss_kib(sending.pid)
        finally:
            os.kill(stuck.pid, signal.SIGCONT)
        rtts.sort()
        median = rtts[len(rtts) // 2]
        print(
            f"\nstopped peer: {flooded} packets of 1000 B flooded in {STALL} s; ping RTT on "
            f"the sending shard median {median * 1000:.1f} ms, max {rtts[-1] * 1000:.1f} ms "
            f"over {len(rtts)} pings; sender RSS {rss_before} -> {rss_after} KiB"
        )
        assert len(rtts) >= 5
        assert median < 0.1
        assert rtts[-1] < 0.5

        # Resumed within the silence limit: the link is still there; once the
        # backlog drains, new data from A reaches B.
        marker = b"after SIGCONT"

        async def marker_arrives() -> None:
            for _ in range(100):
                a.send_data(id_a, marker)
                with contextlib.suppress(AssertionError):
                    await rec_b.wait_for(lambda e: e == RoutedData(id_b, marker), 0.1)
                    return
            raise AssertionError("A's data never reached B after SIGCONT")

        await marker_arrives()
        assert not any(is_disconnect(e) for e in rec_b.kinds())
        assert not a.closed.done() and not b.closed.done()
        await rec_b.stop()

    run(body())


def test_a_shard_stopped_past_the_silence_limit_comes_back_symmetric(
    make_cluster: Callable[..., Cluster],
) -> None:
    """Stopped for longer than the coordinator's 3 s silence limit, B's shard
    is dropped: A gets one disconnect. When it resumes, B gets one disconnect
    too (symmetry), B's key is registered again, the pair links again and a
    new client can reach B."""
    cluster = make_cluster(2)
    live, stuck = cluster.shards()

    async def body() -> None:
        loop = asyncio.get_running_loop()
        a = await cluster.connect(live)
        b = await cluster.connect(stuck)
        id_a, id_b = await link(a, b)
        rec_a, rec_b = Recorder(a), Recorder(b)
        stopped_at = loop.time()
        os.kill(stuck.pid, signal.SIGSTOP)
        try:
            dropped_at, _ = await rec_a.wait_for(is_disconnect, 6.0, "A's disconnect")
            await asyncio.sleep(0.3)
        finally:
            os.kill(stuck.pid, signal.SIGCONT)
        resumed_at = loop.time()
        await rec_b.wait_for(is_disconnect, 3.0, "B's disconnect after resuming")
        await rec_a.wait_for(is_connect, 5.0, "A linked again")
        await rec_b.wait_for(is_connect, 5.0, "B linked again")
        relinked_at = loop.time()
        print(
            f"\nshard stopped: peer's link ended after {dropped_at - stopped_at:.3f} s; "
            f"relinked {relinked_at - resumed_at:.3f} s after SIGCONT"
        )
        assert rec_a.kinds() == [DisconnectNotification(id_a), ConnectNotification(id_a)]
        assert rec_b.kinds() == [DisconnectNotification(id_b), ConnectNotification(id_b)]
        a.send_data(id_a, b"a again")
        b.send_data(id_b, b"b again")
        await rec_b.wait_for(lambda e: e == RoutedData(id_b, b"a again"), 3.0, "A's data")
        await rec_a.wait_for(lambda e: e == RoutedData(id_a, b"b again"), 3.0, "B's data")
        await rec_a.stop()
        await rec_b.stop()
        # B is in the map again: a new client on the live shard links to it.
        e = await cluster.connect(live)
        id_e, id_be = await link(e, b, timeout=5.0)
        await check_data(e, id_e, b, id_be, b"e->b")
        await check_data(b, id_be, e, id_e, b"b->e")

    run(body())
