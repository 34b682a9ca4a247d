"""NaCl primitives as toxcore uses them (tcp-relay-protocol.md §2).

Nonces are kept as Python integers and turned into 24 big-endian bytes only
when a box is made or opened (R-FRAME-8: big-endian increment with wrap).
"""

import os

from nacl._sodium import ffi, lib
from nacl.bindings import crypto_box_beforenm, crypto_box_keypair, crypto_scalarmult_base
from nacl.exceptions import CryptoError

from relaycore.constants import CRYPTO_MAC_SIZE, CRYPTO_NONCE_SIZE

# Boxes are made and opened with libsodium's *_easy_afternm functions through
# PyNaCl's own cffi module: they take and return exactly toxcore's layout
# (MAC || ciphertext), where PyNaCl's crypto_box_[open_]afternm wrappers pad
# with zero bytes, copy, and check in Python. They are exported as they are
# (no Python call in between: the framing's per-frame path calls them):
# box_open_into(plain, boxed, size, nonce, key) opens ``size`` boxed bytes into
# ``plain`` and returns 0, or -1 for a bad MAC; seal_into(boxed, plain, size,
# nonce, key) seals ``size`` bytes into ``boxed`` (size + 16 bytes). They read
# exactly 32 key and 24 nonce bytes: every caller passes those sizes (checked
# in seal/open_box; SecureChannel checks its key once) and a boxed size > 16.
box_open_into = lib.crypto_box_open_easy_afternm
seal_into = lib.crypto_box_easy_afternm
# For the framing's copy-free path (relaycore.framing.open_frames): libsodium
# reading a bytearray in place and writing into buffers allocated once.
buffer_of = ffi.buffer
from_buffer = ffi.from_buffer
release_buffer = ffi.release
_uninitialised = ffi.new_allocator(should_clear_after_alloc=False)
KEY_SIZE = 32


def scratch_buffer(size: int) -> object:
    """A C buffer of ``size`` bytes, for ``box_open_into`` / ``seal_into``."""
    return _uninitialised("unsigned char[]", size)


NONCE_MODULUS = 1 << (8 * CRYPTO_NONCE_SIZE)

__all__ = [
    "CryptoError",
    "NONCE_MODULUS",
    "beforenm",
    "box_open_into",
    "buffer_of",
    "from_buffer",
    "generate_keypair",
    "increment_nonce",
    "nonce_bytes",
    "nonce_int",
    "open_box",
    "public_key_of",
    "random_bytes",
    "release_buffer",
    "scratch_buffer",
    "seal",
    "seal_into",
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
    if len(key) != KEY_SIZE or len(nonce) != CRYPTO_NONCE_SIZE:
        raise ValueError("seal: key must be 32 bytes, nonce 24")
    boxed = scratch_buffer(len(plain) + CRYPTO_MAC_SIZE)
    seal_into(boxed, plain, len(plain), nonce, key)  # cannot fail for these sizes
    return buffer_of(boxed)[:]


def open_box(key: bytes, nonce: bytes, boxed: bytes) -> bytes:
    """Inverse of seal; raises CryptoError on a bad MAC or when len(boxed) <= 16."""
    if len(key) != KEY_SIZE or len(nonce) != CRYPTO_NONCE_SIZE:
        raise ValueError("open_box: key must be 32 bytes, nonce 24")
    size = len(boxed) - CRYPTO_MAC_SIZE
    if size <= 0:
        raise CryptoError("box too short")
    plain = scratch_buffer(size)
    if box_open_into(plain, boxed, len(boxed), nonce, key) != 0:
        raise CryptoError("box does not open (bad MAC)")
    return buffer_of(plain)[:]


def nonce_int(nonce: bytes) -> int:
    return int.from_bytes(nonce, "big")


def nonce_bytes(value: int) -> bytes:
    return value.to_bytes(CRYPTO_NONCE_SIZE, "big")


def increment_nonce(nonce: bytes) -> bytes:
    """Big-endian +1 over all 24 bytes, ff..ff wraps to 00..00 (R-FRAME-8)."""
    return nonce_bytes((nonce_int(nonce) + 1) % NONCE_MODULUS)
