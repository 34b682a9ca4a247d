"""The ZeroMQ ipc:// endpoints in a cluster's runtime directory, and the
msgpack form of every message on them."""

from __future__ import annotations

from pathlib import Path

import msgpack
import zmq


def router_endpoint(runtime_dir: Path) -> str:
    """The coordinator's ROUTER: registry events and snapshot requests."""
    return f"ipc://{runtime_dir / 'coordinator.sock'}"


def updates_endpoint(runtime_dir: Path) -> str:
    """The coordinator's PUB: map updates and heartbeats."""
    return f"ipc://{runtime_dir / 'updates.sock'}"


def shard_endpoint(runtime_dir: Path, shard: int) -> str:
    """Shard ``shard``'s PULL of the peer bus."""
    return f"ipc://{runtime_dir / f'shard-{shard}.sock'}"


def supervisor_endpoint(runtime_dir: Path) -> str:
    """The supervisor's PULL: statistics reports."""
    return f"ipc://{runtime_dir / 'supervisor.sock'}"


def bind_ipc(sock: zmq.Socket, endpoint: str) -> None:
    """Bind ``sock`` to an ipc:// endpoint, removing the socket file a killed
    process left there first."""
    path = Path(endpoint.removeprefix("ipc://"))
    if path.exists():
        path.unlink()
    sock.bind(endpoint)


def pack(message: object) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def unpack(data: bytes) -> list:
    return msgpack.unpackb(data, raw=False, use_list=True)
