"""The supervisor's local admin socket and `cluster status`.

A unix stream socket (mode 0600) at ``admin_socket``: a client writes one
command line (``status``) and reads one JSON line back. `cluster status`
renders it as a live table, or prints it with ``--json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path


class AdminSocketError(Exception):
    """The admin socket cannot be created; the message names the path and why."""


class AdminSocketInUse(AdminSocketError):
    pass


class NoCluster(Exception):
    """No supervisor answers on the admin socket."""


async def serve_admin(path: Path, status: Callable[[], dict]) -> asyncio.AbstractServer:
    """Listen on ``path`` (0600). Only a stale socket is ever removed there:
    refuses to replace a socket a live cluster answers on, and any file that
    is not a socket (``--admin-socket relay.keys`` must not delete the keys)."""
    remove_stale_socket(path)

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            command = (await asyncio.wait_for(reader.readline(), 5)).strip()
            if command == b"status":
                writer.write(json.dumps(status()).encode() + b"\n")
            else:
                writer.write(json.dumps({"error": f"unknown command {command!r}"}).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    old_umask = os.umask(0o177)  # the socket file is created 0600
    try:
        server = await asyncio.start_unix_server(answer, path=str(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    return server


def remove_stale_socket(path: Path) -> None:
    """Remove ``path`` if ``lstat`` says it is a socket nobody answers on."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as error:
        raise AdminSocketError(f"admin_socket: {path}: {error.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise AdminSocketError(
            f"admin_socket: {path} exists and is not a socket; refusing to replace it "
            "(choose another admin_socket path)"
        )
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            probe.connect(str(path))
    except OSError:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # left behind by a cluster that died
    else:
        raise AdminSocketInUse(f"admin_socket: {path} is in use by a running cluster")


def remove_own_socket(path: Path, inode: int) -> None:
    """At stop: remove the socket we created, not whatever replaced it since."""
    with contextlib.suppress(OSError):
        status = os.lstat(path)
        if stat.S_ISSOCK(status.st_mode) and status.st_ino == inode:
            path.unlink()


def query_status(path: Path, timeout: float = 5.0) -> dict:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(timeout)
            client.connect(str(path))
            client.sendall(b"status\n")
            data = b""
            while not data.endswith(b"\n"):
                chunk = client.recv(65536)
                if not chunk:
                    break
                data += chunk
    except (FileNotFoundError, ConnectionRefusedError):
        raise NoCluster(f"no cluster is running (no admin socket answers at {path})") from None
    except OSError as error:
        raise NoCluster(f"cannot reach the cluster at {path}: {error.strerror or error}") from None
    return json.loads(data)


def _size(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(value)


def render_table(status: dict) -> str:
    header = (
        f"{'worker':>6} {'shard':>6} {'pid':>8} {'conns':>7} {'in/s':>9} {'out/s':>9} "
        f"{'cpu%':>6} {'rss':>10} {'restarts':>8} {'lag ms':>7}"
    )
    lines = [header, "-" * len(header)]
    for row in status["workers"]:
        lines.append(
            f"{row['worker']:>6} {row['shard']:>6} {row['pid']:>8} {row['connections']:>7} "
            f"{row['frames_in_per_s']:>9.0f} {row['frames_out_per_s']:>9.0f} "
            f"{row['cpu_percent']:>6.1f} {_size(row['rss_bytes']):>10} {row['restarts']:>8} "
            f"{row['loop_lag_seconds'] * 1000:>7.1f}"
        )
    totals = status["totals"]
    lines.append("-" * len(header))
    lines.append(
        f"{'total':>6} {'':>6} {'':>8} {totals['connections']:>7} "
        f"{totals['frames_in_per_s']:>9.0f} {totals['frames_out_per_s']:>9.0f} "
        f"{'':>6} {_size(totals['rss_bytes']):>10} {totals['worker_restarts']:>8}"
    )
    lines.append(
        f"confirmed clients {totals['confirmed']}, routing map {totals['map_entries']} keys, "
        f"coordinator restarts {totals['coordinator_restarts']}"
    )
    return "\n".join(lines)


def run_status(path: Path, as_json: bool, once: bool, interval: float = 1.0) -> int:
    try:
        if as_json:
            print(json.dumps(query_status(path)))
            return 0
        while True:
            table = render_table(query_status(path))
            if once:
                print(table)
                return 0
            sys.stdout.write("\x1b[H\x1b[2J" + time.strftime("%H:%M:%S ") + str(path) + "\n")
            sys.stdout.write(table + "\n")
            sys.stdout.flush()
            with contextlib.suppress(KeyboardInterrupt):
                time.sleep(interval)
                continue
            return 0
    except NoCluster as error:
        print(f"cluster: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
