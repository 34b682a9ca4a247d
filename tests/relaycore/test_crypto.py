"""relaycore.crypto's boxes (libsodium's *_easy_afternm through PyNaCl's cffi
module) against PyNaCl's own crypto_box_afternm / crypto_box_open_afternm."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nacl.bindings import crypto_box_afternm, crypto_box_open_afternm

from relaycore.crypto import CryptoError, open_box, seal
from relaycore.framing import SecureChannel

keys = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=24, max_size=24)


@given(keys, nonces, st.binary(max_size=2100))
def test_seal_is_pynacls_box(key: bytes, nonce: bytes, plain: bytes) -> None:
    boxed = seal(key, nonce, plain)
    assert boxed == crypto_box_afternm(plain, nonce, key)
    assert len(boxed) == len(plain) + 16


@given(keys, nonces, st.binary(min_size=1, max_size=2100))
def test_open_box_opens_pynacls_box(key: bytes, nonce: bytes, plain: bytes) -> None:
    boxed = crypto_box_afternm(plain, nonce, key)
    assert open_box(key, nonce, boxed) == plain == crypto_box_open_afternm(boxed, nonce, key)


@given(keys, nonces, st.binary(min_size=1, max_size=64), st.integers(min_value=0))
def test_a_changed_byte_does_not_open(key: bytes, nonce: bytes, plain: bytes, at: int) -> None:
    boxed = bytearray(seal(key, nonce, plain))
    boxed[at % len(boxed)] ^= 0x01
    with pytest.raises(CryptoError):
        open_box(key, nonce, bytes(boxed))


@pytest.mark.parametrize("size", [0, 1, 16])
def test_a_box_of_16_bytes_or_less_does_not_open(size: int) -> None:
    with pytest.raises(CryptoError):
        open_box(bytes(32), bytes(24), bytes(size))


@pytest.mark.parametrize(("key", "nonce"), [(bytes(31), bytes(24)), (bytes(32), bytes(23))])
def test_wrong_key_or_nonce_sizes_are_refused(key: bytes, nonce: bytes) -> None:
    """The C functions read 32 and 24 bytes: shorter inputs must never reach them."""
    with pytest.raises(ValueError):
        seal(key, nonce, b"x")
    with pytest.raises(ValueError):
        open_box(key, nonce, bytes(32))


def test_a_session_key_of_the_wrong_size_is_refused() -> None:
    with pytest.raises(ValueError):
        SecureChannel(bytes(31), bytes(24), bytes(24))
