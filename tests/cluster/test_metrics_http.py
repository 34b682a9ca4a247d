"""The metrics endpoint (cluster/metrics_http.py): the collector runs on the
event loop's thread (a consistent snapshot of what the loop changes), slow
connections time out, and at the connection cap the oldest unfinished one
makes room (issue 10 finding 9)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from cluster.metrics_http import MetricsServer


class ThreadRecorder(Collector):
    def __init__(self) -> None:
        self.threads: list[int] = []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        self.threads.append(threading.get_ident())
        yield GaugeMetricFamily("probe", "A test gauge.", value=1)


async def get(address: str, request: bytes = b"GET /metrics HTTP/1.1\r\n\r\n") -> bytes:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


def test_collector_runs_on_the_loop_thread() -> None:
    recorder = ThreadRecorder()
    registry = CollectorRegistry()
    registry.register(recorder)

    async def body() -> None:
        server = MetricsServer(registry)
        address = await server.start("127.0.0.1", 0)
        try:
            answer = await get(address)
            assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
            assert b"Content-Type: text/plain; version=" in answer
            assert answer.endswith(b"probe 1.0\n")
            assert (await get(address, b"POST / HTTP/1.1\r\n\r\n")).startswith(b"HTTP/1.1 405")
        finally:
            server.close()

    asyncio.run(body())
    assert recorder.threads and set(recorder.threads) == {threading.get_ident()}


def test_slow_connections_time_out_and_make_room() -> None:
    registry = CollectorRegistry()
    registry.register(ThreadRecorder())

    async def body() -> None:
        server = MetricsServer(registry, max_connections=4, request_timeout=0.3)
        address = await server.start("127.0.0.1", 0)
        host, port = address.rsplit(":", 1)
        slow = []
        try:
            for _ in range(10):  # more than the cap, none finishes its request
                reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"GET / HTTP/1.1\r\n")
                slow.append((reader, writer))
            await asyncio.sleep(0.05)
            assert server.open_connections <= 4
            assert server.evicted >= 6
            assert (await get(address)).startswith(b"HTTP/1.1 200 OK")  # room for a scrape
            await asyncio.sleep(0.5)
            assert server.open_connections == 0 and server.timed_out >= 1
        finally:
            for _, writer in slow:
                writer.close()
            server.close()

    asyncio.run(body())
