"""The supervisor's start-up checks, in-process: admin socket replacement,
per-address locks, the worker-count warning (issue 10 finding 9, issue 14
points 5 and 6)."""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path

import pytest

from cluster.admin import AdminSocketError, AdminSocketInUse, remove_stale_socket
from cluster.supervisor import StartupError, lock_address, worker_count_warning


def test_only_a_socket_is_ever_removed(tmp_path: Path) -> None:
    keys = tmp_path / "relay.keys"
    keys.write_bytes(b"k" * 64)
    with pytest.raises(AdminSocketError, match="exists and is not a socket"):
        remove_stale_socket(keys)
    assert keys.read_bytes() == b"k" * 64
    link = tmp_path / "link.sock"
    link.symlink_to(keys)  # lstat: a symlink is not a socket, whatever it points to
    with pytest.raises(AdminSocketError, match="exists and is not a socket"):
        remove_stale_socket(link)
    assert link.is_symlink() and keys.exists()
    directory = tmp_path / "dir"
    directory.mkdir()
    with pytest.raises(AdminSocketError, match="not a socket"):
        remove_stale_socket(directory)


def test_stale_socket_is_removed_live_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))
    remove_stale_socket(path)
    assert not path.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(AdminSocketInUse, match="in use by a running cluster"):
            remove_stale_socket(path)
    remove_stale_socket(tmp_path / "absent.sock")  # nothing there: nothing to do


def test_lock_per_address_is_exclusive_and_released(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    first = lock_address("tcp", "127.0.0.1", 33445)
    try:
        with pytest.raises(
            StartupError, match=r"another cluster already serves TCP 127\.0\.0\.1:33445"
        ):
            lock_address("tcp", "127.0.0.1", 33445)
        os.close(lock_address("tcp", "127.0.0.1", 443))  # another port: its own lock
        os.close(lock_address("udp", "127.0.0.1", 33445))  # another protocol too
    finally:
        os.close(first)
    os.close(lock_address("tcp", "127.0.0.1", 33445))  # free again once released
    locks = tmp_path / f"tox-relay-locks-{os.getuid()}"
    assert locks.stat().st_mode & 0o777 == 0o700


def test_worker_count_warning() -> None:
    assert worker_count_warning(8, 2) is None
    assert worker_count_warning(1, 1) is None
    warning = worker_count_warning(500, 2)
    assert warning is not None and "workers = 500 on 2 CPU(s)" in warning
