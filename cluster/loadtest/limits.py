"""Will the connections fit? Open-file limit and source ports, checked before starting."""

from __future__ import annotations

import math
import resource
from pathlib import Path

from cluster.loadtest.options import TRAFFIC_MODES, LoadtestOptions

FD_MARGIN = 64  # descriptors a worker needs besides its sockets (pipes, epoll, libraries)
PORT_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")


class LimitError(Exception):
    """The requested load cannot fit this machine's limits; the message says what to change."""


def sockets_per_process(options: LoadtestOptions) -> int:
    """Sockets the busiest worker process holds open at once."""
    processes = max(1, min(options.processes, options.units))
    per_process = math.ceil(options.units / processes)
    if options.mode in TRAFFIC_MODES:
        return 2 * per_process
    if options.mode == "handshake":
        return min(per_process, math.ceil(options.concurrency / processes))
    return per_process


def concurrent_sockets(options: LoadtestOptions) -> int:
    """Sockets open at once over all processes."""
    if options.mode in TRAFFIC_MODES:
        return 2 * options.pairs
    if options.mode == "handshake":
        return min(options.connections, options.concurrency)
    return options.connections


def ensure_open_files(needed: int) -> int:
    """Raise the soft RLIMIT_NOFILE (inherited by the workers) to fit ``needed``; the limit.

    LimitError when even the hard limit is too low.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if needed <= soft:
        return soft
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise LimitError(
            f"each worker process needs about {needed} open files but the limit is {hard} "
            f"(ulimit -Hn); raise it, or spread the connections over more --processes"
        )
    target = hard if hard != resource.RLIM_INFINITY else needed
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError) as error:
        raise LimitError(
            f"cannot raise the open-file limit from {soft} to {target}: {error}"
        ) from None
    return target


def local_port_count() -> int | None:
    """Ephemeral ports per source address (ip_local_port_range), if known."""
    try:
        low, high = (int(v) for v in PORT_RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return None
    return high - low + 1


def check_limits(options: LoadtestOptions) -> None:
    """Fail clearly, before anything starts, when the connections cannot fit."""
    ensure_open_files(sockets_per_process(options) + FD_MARGIN)
    ports = local_port_count()
    addresses = max(1, len(options.source_addresses))
    wanted = concurrent_sockets(options)
    if ports is not None and wanted > ports * addresses:
        raise LimitError(
            f"{wanted} connections to one address need more source ports than "
            f"{addresses} source address(es) x {ports} ephemeral ports; use more "
            "--source-addresses (loopback) or widen net.ipv4.ip_local_port_range"
        )
