"""The relay identity: a 64-byte keys file ``public key || secret key``, the
format tox-bootstrapd uses, so an operator can move a node's identity.

Created with mode 0600 (exclusive create, never following a symlink) when
missing; refused when group/world readable, not exactly 64 bytes (a longer
file is not a keys file: a wrong path, or an identity we would silently cut),
or when the halves do not belong together (tcp-relay-protocol.md §17 item 9).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from relaycore.crypto import generate_keypair, public_key_of

KEYS_FILE_SIZE = 64


class KeysFileError(Exception):
    """The keys file cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class RelayIdentity:
    public_key: bytes
    secret_key: bytes

    @property
    def public_key_hex(self) -> str:
        return self.public_key.hex().upper()


def _check_halves(path: Path, data: bytes) -> RelayIdentity:
    if len(data) != KEYS_FILE_SIZE:
        size = f"{len(data)}" if len(data) <= KEYS_FILE_SIZE else f"more than {KEYS_FILE_SIZE}"
        raise KeysFileError(
            f"{path}: keys file is {size} bytes; it must be exactly 64 (public key || secret key)"
        )
    public_key, secret_key = data[:32], data[32:64]
    if public_key_of(secret_key) != public_key:
        raise KeysFileError(
            f"{path}: the public key (first 32 bytes) does not belong to the secret key "
            "(last 32 bytes); clients would fail every handshake"
        )
    return RelayIdentity(public_key, secret_key)


def load_keys(path: Path) -> RelayIdentity:
    """Read an existing keys file; KeysFileError if it is unusable."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise KeysFileError(
            f"{path}: no such keys file (create one with `cluster keygen`)"
        ) from None
    except OSError as error:
        raise KeysFileError(f"{path}: cannot open keys file: {error.strerror}") from None
    with os.fdopen(fd, "rb") as keys_file:
        mode = os.fstat(keys_file.fileno()).st_mode
        if not stat.S_ISREG(mode):
            raise KeysFileError(f"{path}: not a regular file")
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise KeysFileError(
                f"{path}: keys file is readable by group or others (mode {mode & 0o777:04o}); "
                f"run `chmod 600 {path}`"
            )
        data = keys_file.read(KEYS_FILE_SIZE + 1)
    return _check_halves(path, data)


def create_keys(path: Path) -> RelayIdentity:
    """Write a new key pair with mode 0600; never overwrites an existing file."""
    public_key, secret_key = generate_keypair()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise KeysFileError(f"{path}: already exists; refusing to overwrite an identity") from None
    except OSError as error:
        raise KeysFileError(f"{path}: cannot create keys file: {error.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, public_key + secret_key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return RelayIdentity(public_key, secret_key)


def load_or_create_keys(path: Path) -> tuple[RelayIdentity, bool]:
    """(identity, created): the file's keys, or new ones written to it."""
    if os.path.lexists(path):
        return load_keys(path), False
    return create_keys(path), True
