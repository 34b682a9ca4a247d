"""Relaying between clients on different shards of a real `cluster start`.

Clients reach a chosen shard through its direct address (``--shard-ports``);
the last test uses only the shared port, where the kernel places them.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

import pytest
from nacl.bindings import crypto_scalarmult_base

from relaycore.packets import (
    ConnectNotification,
    DisconnectNotification,
    OobReceive,
    RoutedData,
    RoutingResponse,
)
from tests.cluster_process.support import (
    Cluster,
    check_data,
    check_oob,
    closed_within,
    expect_event,
    link,
    quiet,
    request,
    run,
)

QUIET = 0.3  # seconds without an unexpected event


@pytest.mark.parametrize("workers", [2, 4])
def test_cross_shard_links_data_oob_and_disconnects(
    make_cluster: Callable[..., Cluster], workers: int
) -> None:
    cluster = make_cluster(workers)
    shards = cluster.shards()
    first, second = shards[0], shards[1]
    # With 4 workers the reconnecting key moves to a shard that held neither end.
    third = shards[2] if workers > 2 else shards[1]

    async def body() -> None:
        a_key = os.urandom(32)
        a = await cluster.connect(first, secret_key=a_key)
        b = await cluster.connect(second)
        # a's slot for b is its second one, b's slot for a its first: the
        # relay must rewrite the connection id on the way.
        assert await request(a, os.urandom(32)) == 16
        id_a, id_b = await link(a, b)  # a requests first
        assert (id_a, id_b) == (17, 16)
        await check_data(a, id_a, b, id_b, b"a->b")
        await check_data(b, id_b, a, id_a, b"b->a")
        await check_oob(a, b, b"oob a->b")
        await check_oob(b, a, b"oob b->a")

        # The other order: the client on the second shard requests first.
        c = await cluster.connect(first)
        d = await cluster.connect(second)
        id_d, id_c = await link(d, c)
        await check_data(c, id_c, d, id_d, b"c->d")
        await check_data(d, id_d, c, id_c, b"d->c")

        # A DISCONNECT_NOTIFICATION from a reaches b on the other shard once;
        # a asks again, b's slot is still requested: linked again.
        a.disconnect(id_a)
        assert await expect_event(b, DisconnectNotification) == DisconnectNotification(id_b)
        assert await request(a, b.public_key) == id_a
        assert await expect_event(a, ConnectNotification) == ConnectNotification(id_a)
        assert await expect_event(b, ConnectNotification) == ConnectNotification(id_b)
        await check_data(a, id_a, b, id_b, b"relinked")
        assert await quiet(a, QUIET) == []
        assert await quiet(b, 0) == []

        # The same key confirmed on another shard: the relay closes the old
        # connection (R-CONF-3) and b gets exactly one disconnect for it.
        a2 = await cluster.connect(third, secret_key=a_key)
        await closed_within(a, 3.0)
        assert await expect_event(b, DisconnectNotification) == DisconnectNotification(id_b)
        assert await quiet(b, QUIET) == []
        # The new connection requests b: linked, data both ways.
        id_a2 = await request(a2, b.public_key)
        assert await expect_event(a2, ConnectNotification) == ConnectNotification(id_a2)
        assert await expect_event(b, ConnectNotification) == ConnectNotification(id_b)
        await check_data(a2, id_a2, b, id_b, b"from the new connection")
        await check_data(b, id_b, a2, id_a2, b"to the new connection")
        await check_oob(b, a2, b"oob to the new connection")

        # A client that closes its socket: its peer on the other shard is told at once.
        started = time.monotonic()
        await a2.close()
        assert await expect_event(b, DisconnectNotification, 1.0) == DisconnectNotification(id_b)
        assert time.monotonic() - started < 1.0
        await d.close()
        assert await expect_event(c, DisconnectNotification, 1.0) == DisconnectNotification(id_c)
        assert await quiet(b, QUIET) == []
        assert await quiet(c, 0) == []
        await b.close()
        await c.close()

    run(body())


def test_reconnect_on_the_peers_shard_requesting_at_once_relinks(
    make_cluster: Callable[..., Cluster],
) -> None:
    """As toxcore does: a client whose old connection still lingers reconnects
    and sends its routing requests at once. On one server R-CONF-3 kills the
    old connection inside the confirmation, so the request links; a cluster
    must give the same result when the new connection lands on the peer's shard."""
    cluster = make_cluster(2)
    first, second = cluster.shards()

    async def body() -> None:
        a_key = os.urandom(32)
        a = await cluster.connect(first, secret_key=a_key)
        b = await cluster.connect(second)
        _, id_b = await link(a, b)
        # b's shard; the routing request is the first frame (it confirms the
        # connection), as toxcore sends it right after the handshake.
        a2 = await cluster.connect(second, secret_key=a_key, confirm=False)
        a2.route_request(b.public_key)
        response = await expect_event(a2, RoutingResponse)
        await closed_within(a, 3.0)
        assert await expect_event(b, DisconnectNotification) == DisconnectNotification(id_b)
        # Expected as on one server: both ends linked.
        assert await expect_event(a2, ConnectNotification, 3.0) == ConnectNotification(
            response.connection_id
        )
        assert await expect_event(b, ConnectNotification, 3.0) == ConnectNotification(id_b)
        await check_data(a2, response.connection_id, b, id_b, b"after reconnect")
        assert await quiet(b, QUIET) == []  # one disconnect only, for the old epoch
        assert await quiet(a2, 0) == []

    run(body())


def test_reconnect_on_a_third_shard_requesting_at_once_relinks(
    make_cluster: Callable[..., Cluster],
) -> None:
    """The same race when the new connection lands on a shard that held
    neither end: the WANT supersedes the old link."""
    cluster = make_cluster(3)
    first, second, third = cluster.shards()

    async def body() -> None:
        a_key = os.urandom(32)
        a = await cluster.connect(first, secret_key=a_key)
        b = await cluster.connect(second)
        _, id_b = await link(a, b)
        a2 = await cluster.connect(third, secret_key=a_key, confirm=False)
        a2.route_request(b.public_key)  # the first frame
        response = await expect_event(a2, RoutingResponse)
        await closed_within(a, 3.0)
        assert await expect_event(b, DisconnectNotification) == DisconnectNotification(id_b)
        assert await expect_event(a2, ConnectNotification, 3.0) == ConnectNotification(
            response.connection_id
        )
        assert await expect_event(b, ConnectNotification, 3.0) == ConnectNotification(id_b)
        await check_data(a2, response.connection_id, b, id_b, b"after reconnect")
        assert await quiet(b, QUIET) == []

    run(body())


def test_a_late_want_from_a_replaced_connection_does_not_break_the_new_link(
    make_cluster: Callable[..., Cluster],
) -> None:
    """a (shard 1) holds a request for b's key while b is offline. Shard 1
    stalls (SIGSTOP, well under the coordinator's silence limit) while b
    connects on shard 2 and a's key connects again on shard 3 (R-CONF-3, a is
    replaced) and links with b. Resumed, shard 1 applies the map updates in
    their order: b's SET first, which re-sends a WANT for a's pending slot,
    then the one that replaces a. That late WANT must not touch the new link.
    As on one server: the new connection and b stay linked and hear nothing
    more, and a is closed."""
    cluster = make_cluster(3)
    first, second, third = cluster.shards()

    async def body() -> None:
        a_key, b_key = os.urandom(32), os.urandom(32)
        a = await cluster.connect(first, secret_key=a_key)
        await request(a, crypto_scalarmult_base(b_key))
        await a.ping()
        await asyncio.sleep(0.2)  # every replica knows a
        os.kill(first.pid, signal.SIGSTOP)
        try:
            b = await cluster.connect(second, secret_key=b_key)
            a2 = await cluster.connect(third, secret_key=a_key)
            await asyncio.sleep(0.2)  # the map says a2 replaced a
            id_a2, id_b = await link(a2, b)
        finally:
            os.kill(first.pid, signal.SIGCONT)
        await closed_within(a, 3.0)
        await asyncio.sleep(1.5)  # past the 1 s unlink grace
        assert b.pending_events() == []
        assert a2.pending_events() == []
        await check_data(a2, id_a2, b, id_b, b"still linked")
        await check_data(b, id_b, a2, id_a2, b"still linked too")

    run(body())


def test_clients_through_the_shared_port_link_in_pairs(
    make_cluster: Callable[..., Cluster],
) -> None:
    """16 clients on the shared port of 4 workers, wherever the kernel puts
    them, in 8 linked pairs: every payload reaches its own peer only."""
    cluster = make_cluster(4)

    async def body() -> None:
        clients = await asyncio.gather(*(cluster.connect() for _ in range(16)))
        pairs = [(clients[2 * i], clients[2 * i + 1]) for i in range(8)]
        ids = await asyncio.gather(*(link(x, y) for x, y in pairs))
        rounds = 5
        for n in range(rounds):
            for index, ((x, y), (id_x, id_y)) in enumerate(zip(pairs, ids, strict=True)):
                x.send_data(id_x, b"pair %d x %d" % (index, n))
                y.send_data(id_y, b"pair %d y %d" % (index, n))
        for index, ((x, y), (id_x, id_y)) in enumerate(zip(pairs, ids, strict=True)):
            for n in range(rounds):
                assert await expect_event(y, RoutedData) == RoutedData(
                    id_y, b"pair %d x %d" % (index, n)
                )
                assert await expect_event(x, RoutedData) == RoutedData(
                    id_x, b"pair %d y %d" % (index, n)
                )
            await check_oob(x, y, b"oob %d" % index)
        await asyncio.sleep(QUIET)
        for client in clients:
            assert client.pending_events() == []
        for client in clients:
            await client.close()

    run(body())


def test_oob_to_a_client_that_just_connected_on_another_shard(
    make_cluster: Callable[..., Cluster],
) -> None:
    """OOB right after the receiver confirmed, before the map can have told
    the sender's shard: delivered anyway (offered to every live shard)."""
    cluster = make_cluster(2)
    first, second = cluster.shards()

    async def body() -> None:
        a = await cluster.connect(first)
        await asyncio.sleep(1.5)  # a's shard has seen a coordinator heartbeat
        for n in range(5):
            b = await cluster.connect(second)
            a.send_oob(b.public_key, b"hello %d" % n)
            assert await expect_event(b, OobReceive) == OobReceive(a.public_key, b"hello %d" % n)
            await b.close()

    run(body())
