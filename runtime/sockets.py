"""Sockets bound with SO_REUSEPORT, so that every worker can bind the same
port (the kernel spreads connections and datagrams over them) and the
supervisor can check a port before the workers start."""

from __future__ import annotations

import socket


def bind_reuseport(host: str, port: int, kind: int) -> socket.socket:
    """A socket of ``kind`` (SOCK_STREAM / SOCK_DGRAM) bound to ``host:port``
    with SO_REUSEADDR and SO_REUSEPORT, so every shard can bind the same port;
    "::" is dual-stack. Closed again if anything fails."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, kind)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def open_listening_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A TCP listener with SO_REUSEADDR and SO_REUSEPORT set, not yet serving."""
    sock = bind_reuseport(host, port, socket.SOCK_STREAM)
    try:
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def open_udp_socket(host: str, port: int) -> socket.socket:
    """The onion / forwarding UDP socket, SO_REUSEPORT so every shard binds the
    same port and a reply may arrive at any of them."""
    try:
        sock = bind_reuseport(host, port, socket.SOCK_DGRAM)
    except OSError as error:
        raise OSError(
            error.errno, f"cannot bind UDP port {port} on {host}: {error.strerror}"
        ) from None
    sock.setblocking(False)
    return sock
