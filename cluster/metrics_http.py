"""The Prometheus endpoint: a small HTTP server on the supervisor's event loop.

Not prometheus-client's ``start_http_server``: that one starts a thread per
connection with no timeout (a slowloris holds threads without bound) and runs
the collector on those threads while the loop changes the statistics it walks
(issue 10 finding 9). Here the exposition is generated on the loop thread, so
it is one consistent snapshot; every connection has a deadline for its request
and for the answer; the number of open connections is capped, and at the cap
the oldest connection still sending its request is closed to make room, so a
slow client can never keep a scrape out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry

log = logging.getLogger("cluster.metrics")

MAX_CONNECTIONS = 32  # open connections at once (Prometheus needs one per scrape)
REQUEST_TIMEOUT = 5.0  # seconds for the whole request head
WRITE_TIMEOUT = 10.0  # seconds for the answer to drain
MAX_REQUEST_BYTES = 8192  # request line and headers


class MetricsAddressError(Exception):
    """The metrics endpoint cannot listen; the message names the address."""


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class MetricsServer:
    """Serves ``registry`` in the Prometheus text format on every GET path."""

    def __init__(
        self,
        registry: CollectorRegistry,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.registry = registry
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.write_timeout = write_timeout
        # Open connections in arrival order -> True once the request was read.
        self._open: dict[asyncio.StreamWriter, bool] = {}
        self._server: asyncio.AbstractServer | None = None
        self.evicted = 0  # connections closed at the cap to make room
        self.timed_out = 0  # connections that did not send a request in time

    async def start(self, host: str, port: int) -> str:
        """Listen on ``host:port``; the bound address as ``host:port``."""
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(self.max_connections)
        except OSError as error:
            sock.close()
            raise MetricsAddressError(
                f"metrics: cannot listen on {format_address(host, port)}: {error.strerror}"
            ) from None
        self._server = await asyncio.start_server(self._answer, sock=sock, limit=MAX_REQUEST_BYTES)
        bound = self._server.sockets[0].getsockname()[1]
        return format_address(host, bound)

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._open):
            writer.transport.abort()
        self._open.clear()

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def _make_room(self) -> bool:
        """At the cap, close the oldest connection still sending its request."""
        if len(self._open) < self.max_connections:
            return True
        for writer, answered in self._open.items():
            if not answered:
                del self._open[writer]
                writer.transport.abort()
                self.evicted += 1
                return True
        return False

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._make_room():
            writer.transport.abort()
            return
        self._open[writer] = False
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.request_timeout)
            except TimeoutError:
                self.timed_out += 1
                return
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            if writer not in self._open:
                return  # evicted meanwhile
            self._open[writer] = True
            method = head.split(b" ", 1)[0]
            if method not in (b"GET", b"HEAD"):
                response = _response(405, b"text/plain; charset=utf-8", b"only GET\n")
            else:
                body = generate_latest(self.registry)  # on the loop: one consistent snapshot
                response = _response(200, CONTENT_TYPE_LATEST.encode(), body, method == b"GET")
            writer.write(response)
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(writer.drain(), self.write_timeout)
        except Exception:  # one connection's fault never reaches the loop
            log.exception("metrics request failed")
        finally:
            self._open.pop(writer, None)
            writer.close()


def _response(status: int, content_type: bytes, body: bytes, with_body: bool = True) -> bytes:
    reason = {200: b"OK", 405: b"Method Not Allowed"}[status]
    head = (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\nConnection: close\r\n\r\n"
        % (status, reason, content_type, len(body))
    )
    return head + body if with_body else head
