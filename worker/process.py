"""Running one shard as a process: open-file limit, sockets, signals, the
ready announcement and a clean stop within a bound."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from relaycore.onion import OnionSecrets
from relaycore.options import RelayOptions
from runtime.sockets import open_listening_socket
from worker.cluster_member import ClusterMember
from worker.shard import Shard

log = logging.getLogger("worker")

STOP_TIMEOUT = 4.0
PARENT_CHECK_INTERVAL = 0.5  # seconds  # seconds; `cluster start` must exit within 5 s of SIGTERM


def raise_open_file_limit(minimum: int) -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; warn when below ``minimum``.

    Returns the new soft limit (each connection costs one descriptor).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as error:
            log.warning(
                "could not raise the open-file limit from %d to %d: %s", soft, target, error
            )
    if soft < minimum:
        log.warning(
            "open-file limit is %d (< %d): the relay can hold at most about %d clients; "
            "raise it (LimitNOFILE= in systemd, ulimit -n)",
            soft,
            minimum,
            soft - 32,
        )
    return soft


@dataclass(frozen=True)
class ListenSpec:
    host: str
    ports: Sequence[int]
    backlog: int


def bind_listeners(spec: ListenSpec) -> list[socket.socket]:
    """Bind every port or none (an error names the port that failed)."""
    sockets: list[socket.socket] = []
    try:
        for port in spec.ports:
            try:
                sockets.append(open_listening_socket(spec.host, port, spec.backlog))
            except OSError as error:
                raise OSError(
                    error.errno, f"cannot listen on {spec.host} port {port}: {error.strerror}"
                ) from None
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def format_address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _stop_when_orphaned(
    loop: asyncio.AbstractEventLoop, parent: int, stopping: asyncio.Event
) -> None:
    """A worker whose supervisor died (even by SIGKILL) stops too, instead of
    serving on as an orphan nobody manages."""
    if os.getppid() != parent:
        log.error("supervisor (pid %d) is gone: stopping", parent)
        stopping.set()
        return
    loop.call_later(PARENT_CHECK_INTERVAL, _stop_when_orphaned, loop, parent, stopping)


@dataclass(frozen=True)
class ClusterSpec:
    """How a worker joins a cluster (absent for a stand-alone relay)."""

    shard_id: int
    runtime_dir: Path


@dataclass(frozen=True)
class OnionSpec:
    """The UDP side: the bound socket and the keys every shard shares."""

    udp_socket: socket.socket
    secrets: OnionSecrets


async def serve_until_stopped(
    secret_key: bytes,
    options: RelayOptions,
    sockets: list[socket.socket],
    on_ready: Callable[[list[str]], None],
    cluster: ClusterSpec | None = None,
    backlog: int = 1024,
    onion: OnionSpec | None = None,
    on_stopped: Callable[[dict], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; then close every connection and hand
    ``on_stopped`` the shard's final report (its counters include the
    ``closed.shutdown`` of this stop), so no count is lost at a reload or stop."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping.set)
    shard = Shard(
        secret_key,
        options,
        loop,
        shard_id=cluster.shard_id if cluster else None,
        onion_secrets=onion.secrets if onion else None,
    )
    member = ClusterMember(shard, cluster.runtime_dir) if cluster else None
    if cluster is not None:
        _stop_when_orphaned(loop, os.getppid(), stopping)

        def renew() -> None:
            log.warning(
                "shard %d has %d epochs left: exiting so that the supervisor starts a fresh "
                "shard (an epoch must never reach another shard's)",
                cluster.shard_id,
                shard.server.cluster.epochs_left,
            )
            stopping.set()

        shard.on_epochs_low = renew
    await shard.serve(sockets, backlog, onion.udp_socket if onion else None)
    if member is not None:
        member.start()
    on_ready([format_address(sock) for sock in sockets])
    await stopping.wait()
    log.info("stopping: closing %d connections", shard.server.connection_count)
    try:
        await asyncio.wait_for(shard.stop(), STOP_TIMEOUT)
    except TimeoutError:
        log.warning("stop took longer than %.0f s; exiting anyway", STOP_TIMEOUT)
    if member is not None:
        member.close()  # sends the UNLINK / UNREGISTER messages the stop produced
        if on_stopped is not None:
            on_stopped(member.final_report())
