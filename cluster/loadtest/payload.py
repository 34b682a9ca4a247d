"""Test payloads and deterministic randomness.

Every throughput/oob payload starts with a 13-byte header, ``kind`` (an
original or its echo), a per-sender sequence number and the sender's
``time.perf_counter()`` at sending, so the sender computes the round trip from
the echo alone; the rest is filler. With ``--seed`` every process derives its
own generator, so client keys and filler are the same on every run.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct

HEADER = struct.Struct("<BId")  # kind, sequence (mod 2**32), send time (perf_counter s)
HEADER_SIZE = HEADER.size
ORIGINAL = 0
ECHO = 1
ECHO_PREFIX = bytes((ECHO,))
SEQUENCE_MODULUS = 1 << 32


def process_seed(seed: int, process_index: int) -> int:
    """The seed of one worker process, derived from ``--seed`` (stable across runs)."""
    digest = hashlib.sha256(f"cluster-loadtest:{seed}:{process_index}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


class Randomness:
    """Client secret keys and filler bytes: seeded, or from the OS when ``seed`` is None."""

    def __init__(self, seed: int | None) -> None:
        self._rng = random.Random(seed) if seed is not None else None

    def bytes(self, size: int) -> bytes:
        return self._rng.randbytes(size) if self._rng is not None else os.urandom(size)

    def secret_key(self) -> bytes:
        return self.bytes(32)


def original(sequence: int, sent_at: float, filler: bytes) -> bytes:
    """An original payload: header plus ``filler`` (already the right length)."""
    return HEADER.pack(ORIGINAL, sequence % SEQUENCE_MODULUS, sent_at) + filler


def echo_of(payload: bytes) -> bytes:
    """The echo of an original: same bytes, kind byte set to ECHO."""
    return ECHO_PREFIX + payload[1:]
