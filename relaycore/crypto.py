"""NaCl primitives as toxcore uses them (tcp-relay-protocol.md §2).

Nonces are kept as Python integers and turned into 24 big-endian bytes only
when a box is made or opened (R-FRAME-8: big-endian increment with wrap).
"""

import os

from nacl.bindings import (
    crypto_box_afternm,
    crypto_box_beforenm,
    crypto_box_keypair,
    crypto_box_open_afternm,
    crypto_scalarmult_base,
)
from nacl.exceptions import CryptoError

from relaycore.constants import CRYPTO_MAC_SIZE, CRYPTO_NONCE_SIZE

NONCE_MODULUS = 1 << (8 * CRYPTO_NONCE_SIZE)

__all__ = [
    "CryptoError",
    "NONCE_MODULUS",
    "beforenm",
    "generate_keypair",
    "increment_nonce",
    "nonce_bytes",
    "nonce_int",
    "open_box",
    "public_key_of",
    "random_bytes",
    "seal",
]


def random_bytes(size: int) -> bytes:
    return os.urandom(size)


def generate_keypair() -> tuple[bytes, bytes]:
    """(public key, secret key), both 32 bytes."""
    return crypto_box_keypair()


def public_key_of(secret_key: bytes) -> bytes:
    return crypto_scalarmult_base(secret_key)


def beforenm(public_key: bytes, secret_key: bytes) -> bytes:
    """Precomputed shared key (crypto_box_beforenm); symmetric in the two parties."""
    return crypto_box_beforenm(public_key, secret_key)


def seal(key: bytes, nonce: bytes, plain: bytes) -> bytes:
    """MAC(16) || ciphertext, nonce not included (encrypt_data_symmetric)."""
    return crypto_box_afternm(plain, nonce, key)


def open_box(key: bytes, nonce: bytes, boxed: bytes) -> bytes:
    """Inverse of seal; raises CryptoError on a bad MAC or when len(boxed) <= 16."""
    if len(boxed) <= CRYPTO_MAC_SIZE:
        raise CryptoError("box too short")
    return crypto_box_open_afternm(boxed, nonce, key)


def nonce_int(nonce: bytes) -> int:
    return int.from_bytes(nonce, "big")


def nonce_bytes(value: int) -> bytes:
    return value.to_bytes(CRYPTO_NONCE_SIZE, "big")


def increment_nonce(nonce: bytes) -> bytes:
    """Big-endian +1 over all 24 bytes, ff..ff wraps to 00..00 (R-FRAME-8)."""
    return nonce_bytes((nonce_int(nonce) + 1) % NONCE_MODULUS)
