"""Encrypted framing after the handshake (tcp-relay-protocol.md §5).

A frame is ``uint16 BE length · seal(K, nonce, plaintext)``. ``SecureChannel``
holds one session key and the two nonce counters (as integers) and turns a
byte stream into plaintexts and plaintexts into frames. It is used unchanged
by the server sessions and the client library.
"""

import re
from collections.abc import Iterator

from relaycore.constants import CRYPTO_MAC_SIZE, MAX_PACKET_SIZE, MAX_PLAINTEXT_SIZE
from relaycore.crypto import (
    KEY_SIZE,
    NONCE_MODULUS,
    box_open_into,
    buffer_of,
    from_buffer,
    nonce_int,
    release_buffer,
    scratch_buffer,
    seal_into,
)
from relaycore.errors import ProtocolViolation

# A run of zero bytes, matched at C speed: a stream of empty frames (00 00,
# R-FRAME-3) is skipped in one step instead of one loop turn per frame.
_ZEROS = re.compile(b"\x00*")

# The plaintext of the frame being read, shared by every channel of the
# process: ``open_frames`` opens each frame into it and its reader handles
# (or copies) it before asking for the next (one thread, no re-entry per
# frame). Relaying a frame then costs one new object, the sealed output.
PLAINTEXT = scratch_buffer(MAX_PACKET_SIZE)
_SEALED = scratch_buffer(MAX_PACKET_SIZE + 2)  # length prefix + MAC + ciphertext


class SecureChannel:
    """Session key + nonce counters + the receive buffer of one connection."""

    __slots__ = ("key", "send_nonce", "recv_nonce", "_buffer", "empty_frames")

    def __init__(self, key: bytes, send_base_nonce: bytes, recv_base_nonce: bytes) -> None:
        if len(key) != KEY_SIZE:
            raise ValueError(f"session key is {len(key)} bytes, not 32")
        self.key = key
        self.send_nonce = nonce_int(send_base_nonce)
        self.recv_nonce = nonce_int(recv_base_nonce)
        self._buffer = bytearray()
        self.empty_frames = 0  # L = 0 frames skipped so far (R-FRAME-3)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet forming a complete frame."""
        return len(self._buffer)

    def encrypt(self, plain: bytes) -> bytes:
        """One frame; uses (and advances) the send nonce (R-FRAME-7)."""
        if len(plain) > MAX_PLAINTEXT_SIZE:
            # R-FRAME-6: never emit a frame longer than 2048.
            raise ValueError(f"plaintext of {len(plain)} bytes exceeds {MAX_PLAINTEXT_SIZE}")
        return self.seal_frame(len(plain), plain)

    def seal_frame(self, size: int, plain: object = PLAINTEXT) -> bytes:
        """The frame of the first ``size`` bytes of ``plain`` (by default
        PLAINTEXT: a frame ``open_frames`` opened, so no longer than one and
        R-FRAME-6 holds); uses (and advances) the send nonce (R-FRAME-7)."""
        nonce = self.send_nonce
        self.send_nonce = (nonce + 1) % NONCE_MODULUS
        boxed = size + CRYPTO_MAC_SIZE
        sealed = _SEALED
        sealed[0] = boxed >> 8
        sealed[1] = boxed & 0xFF
        seal_into(sealed + 2, plain, size, nonce.to_bytes(24, "big"), self.key)
        return buffer_of(sealed, boxed + 2)[:]

    def has_frame(self) -> bool:
        """Whether the buffer holds a whole frame (or a bad length) to read."""
        buffer = self._buffer
        position = _ZEROS.match(buffer).end() & ~1  # whole 00 00 pairs only
        if len(buffer) - position < 2:
            return False
        length = (buffer[position] << 8) | buffer[position + 1]
        return (
            length <= CRYPTO_MAC_SIZE
            or length > MAX_PACKET_SIZE
            or (len(buffer) - position - 2 >= length)
        )

    def hold(self, data: bytes) -> None:
        """Keep bytes for a later ``receive`` without parsing them now."""
        self._buffer += data

    def receive(self, data: bytes) -> Iterator[bytes]:
        """Feed stream bytes; yield each complete frame's plaintext in order.

        Raises ProtocolViolation at the first bad frame; the frames before it
        have already been yielded (R-FRAME-5: strict stream order). Partial
        frames stay buffered (R-FRAME-1).
        """
        plaintext = buffer_of(PLAINTEXT)
        frames = self.open_frames(data)
        try:
            for size in frames:
                yield plaintext[:size]
        finally:
            frames.close()

    def open_frames(self, data: bytes) -> Iterator[int]:
        """``receive`` without a copy: each complete frame is opened into
        PLAINTEXT and its size yielded; the reader is done with it when it
        asks for the next. Closing the iterator early (``close()``) leaves
        the unread frames buffered, still sealed."""
        buffer = self._buffer
        buffer += data
        position = 0
        end = len(buffer)
        source = None  # the buffer's bytes for libsodium, while no resize
        try:
            while end - position >= 2:
                length = (buffer[position] << 8) | buffer[position + 1]
                if length == 0:  # R-FRAME-3: ignored, no nonce used
                    # Skip the whole run of empty frames at once: a run of n
                    # zero bytes holds n // 2 of them, and the length after
                    # them (00 xx when n is odd) is not zero.
                    run = _ZEROS.match(buffer, position).end() - position
                    position += run & ~1
                    self.empty_frames += run >> 1
                    continue
                if length > MAX_PACKET_SIZE:
                    raise ProtocolViolation("R-FRAME-2", f"frame length {length} > 2048")
                if length <= CRYPTO_MAC_SIZE:
                    raise ProtocolViolation("R-FRAME-4", f"frame length {length} <= 16")
                if end - position - 2 < length:
                    break
                if source is None:
                    source = from_buffer(buffer)
                nonce = self.recv_nonce
                if box_open_into(
                    PLAINTEXT, source + position + 2, length, nonce.to_bytes(24, "big"), self.key
                ):
                    raise ProtocolViolation("R-FRAME-4", "frame MAC does not verify")
                position += 2 + length
                self.recv_nonce = (nonce + 1) % NONCE_MODULUS  # R-FRAME-5
                yield length - CRYPTO_MAC_SIZE
        finally:
            if source is not None:
                release_buffer(source)
            del buffer[:position]
