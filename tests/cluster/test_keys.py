"""Keys file: tox-bootstrapd's 64-byte format, created 0600, refused when unsafe."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

from cluster.keys import KeysFileError, create_keys, load_keys, load_or_create_keys


def test_created_file_is_0600_and_loads_back(tmp_path: Path) -> None:
    path = tmp_path / "relay.keys"
    old_umask = os.umask(0)  # even a permissive umask must not widen the mode
    try:
        identity = create_keys(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert len(data) == 64
    assert data == identity.public_key + identity.secret_key
    assert crypto_scalarmult_base(identity.secret_key) == identity.public_key
    assert load_keys(path) == identity


def test_load_or_create_creates_once(tmp_path: Path) -> None:
    path = tmp_path / "relay.keys"
    first, created = load_or_create_keys(path)
    assert created
    second, created_again = load_or_create_keys(path)
    assert not created_again
    assert second == first


def test_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "relay.keys"
    create_keys(path)
    before = path.read_bytes()
    with pytest.raises(KeysFileError, match="already exists"):
        create_keys(path)
    assert path.read_bytes() == before


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_group_or_world_readable_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "relay.keys"
    create_keys(path)
    path.chmod(mode)
    with pytest.raises(KeysFileError, match=r"readable by group or others .*chmod 600"):
        load_keys(path)


def test_short_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.keys"
    path.write_bytes(os.urandom(63))
    path.chmod(0o600)
    with pytest.raises(KeysFileError, match="63 bytes; it must be exactly 64"):
        load_keys(path)


def test_longer_file_is_refused(tmp_path: Path) -> None:
    """Issue 10 finding 9: a 65-byte file (a valid pair plus one byte) was accepted."""
    path = tmp_path / "relay.keys"
    create_keys(path)
    with open(path, "ab") as keys_file:
        keys_file.write(b"\n")
    with pytest.raises(KeysFileError, match="more than 64 bytes; it must be exactly 64"):
        load_keys(path)


def test_mismatched_halves_are_refused(tmp_path: Path) -> None:
    """tcp-relay-protocol.md §17.9: tox-bootstrapd would print a key that fails every handshake."""
    path = tmp_path / "relay.keys"
    path.write_bytes(os.urandom(32) + os.urandom(32))
    path.chmod(0o600)
    with pytest.raises(KeysFileError, match="does not belong"):
        load_keys(path)


def test_bootstrapd_keys_file_is_accepted(tmp_path: Path) -> None:
    """Same format as tox-bootstrapd's keys file: public key || secret key."""
    secret = bytes(range(0x40, 0x60))
    path = tmp_path / "tox-bootstrapd.keys"
    path.write_bytes(crypto_scalarmult_base(secret) + secret)
    path.chmod(0o600)
    identity = load_keys(path)
    assert identity.public_key_hex == (
        "79A631EEDE1BF9C98F12032CDEADD0E7A079398FC786B88CC846EC89AF85A51A"
    )


def test_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(KeysFileError, match="cluster keygen"):
        load_keys(tmp_path / "absent.keys")


def test_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "real.keys"
    create_keys(target)
    link = tmp_path / "link.keys"
    link.symlink_to(target)
    with pytest.raises(KeysFileError):
        load_keys(link)
