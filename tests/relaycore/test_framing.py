"""Framing rules R-FRAME-1..8 (tcp-relay-protocol.md §5): SecureChannel and RelayServer."""

from __future__ import annotations

import pytest

from relaycore.constants import MAX_PLAINTEXT_SIZE
from relaycore.crypto import NONCE_MODULUS, nonce_bytes, seal
from relaycore.errors import ProtocolViolation
from relaycore.framing import SecureChannel
from relaycore.packets import OobReceive, OobSend, Ping, Pong, RoutedData, RoutingRequest
from relaycore.relay import ConnectionState
from tests.relaycore.harness import Network

KEY = bytes(range(100, 132))
BASE = bytes(23) + b"\xfe"


def _pair() -> tuple[SecureChannel, SecureChannel]:
    """(sender, receiver) sharing key and the sender's base nonce."""
    return SecureChannel(KEY, BASE, bytes(24)), SecureChannel(KEY, bytes(24), BASE)


# ----------------------------------------------------------------------
# SecureChannel alone
# ----------------------------------------------------------------------


def test_r_frame_1_partial_frames_wait() -> None:
    """R-FRAME-1: a frame arrives in pieces; nothing is yielded until it is whole."""
    sender, receiver = _pair()
    frame = sender.encrypt(b"\x04abcdefgh")
    for index in range(len(frame) - 1):
        assert list(receiver.receive(frame[index : index + 1])) == []
    assert receiver.buffered == len(frame) - 1
    assert list(receiver.receive(frame[-1:])) == [b"\x04abcdefgh"]
    assert receiver.buffered == 0


def test_r_frame_1_several_frames_in_one_chunk() -> None:
    sender, receiver = _pair()
    plains = [b"\x10", b"\x11" * 100, b"\x12" * MAX_PLAINTEXT_SIZE]
    stream = b"".join(sender.encrypt(plain) for plain in plains)
    assert list(receiver.receive(stream + stream[:1])) == plains
    assert receiver.buffered == 1


def test_r_frame_2_length_2049_kills_once_the_length_is_read() -> None:
    """R-FRAME-2: no need to wait for the body."""
    _, receiver = _pair()
    with pytest.raises(ProtocolViolation) as caught:
        list(receiver.receive(b"\x08\x01"))
    assert caught.value.rule == "R-FRAME-2"


def test_r_frame_2_length_2048_is_accepted() -> None:
    sender, receiver = _pair()
    frame = sender.encrypt(b"\x10" * MAX_PLAINTEXT_SIZE)
    assert frame[:2] == b"\x08\x00"
    assert list(receiver.receive(frame)) == [b"\x10" * MAX_PLAINTEXT_SIZE]


def test_r_frame_3_zero_length_ignored_without_nonce() -> None:
    """R-FRAME-3: L = 0 is consumed and skipped; the next frame still opens."""
    sender, receiver = _pair()
    stream = b"\x00\x00" + sender.encrypt(b"\x10a") + b"\x00\x00\x00\x00"
    stream += sender.encrypt(b"\x10b")
    assert list(receiver.receive(stream)) == [b"\x10a", b"\x10b"]
    assert receiver.recv_nonce == sender.send_nonce
    assert receiver.buffered == 0


@pytest.mark.parametrize("zeros", [0, 1, 2, 3, 4, 5, 1000, 1001, 1 << 20])
@pytest.mark.parametrize("split", [None, 1, 2, 3])
def test_r_frame_3_runs_of_empty_frames_skip_whole_pairs_only(
    zeros: int, split: int | None
) -> None:
    """Issue 10 finding 4: runs of 00 00 are skipped in one step. Only whole
    pairs at a frame boundary are empty frames: an odd run ends in the high
    byte of the next length (a frame shorter than 256 bytes starts 00), and a
    run split across reads keeps its alignment."""
    sender, receiver = _pair()
    frame = sender.encrypt(b"\x10" + bytes(30))  # length 47: bytes 00 2f
    assert frame[0] == 0  # so with an odd run, its last zero is this byte
    pairs = bytes(zeros - zeros % 2)
    stream = pairs + frame
    chunks = (
        [stream] if split is None else [stream[: len(pairs) + split], stream[len(pairs) + split :]]
    )
    got = [plain for chunk in chunks for plain in receiver.receive(chunk)]
    assert got == [b"\x10" + bytes(30)]
    assert receiver.buffered == 0 and receiver.recv_nonce == sender.send_nonce


def test_r_frame_3_odd_zero_run_then_long_frame_is_a_short_length() -> None:
    """00 00 00 05 ...: one empty frame, then length 0x0005 (R-FRAME-4 kill),
    never the empty frame 00 00 read from the middle of the pair."""
    _, receiver = _pair()
    with pytest.raises(ProtocolViolation) as caught:
        list(receiver.receive(b"\x00\x00\x00\x05" + bytes(5)))
    assert caught.value.rule == "R-FRAME-4"


def test_has_frame_says_whether_a_whole_frame_or_a_bad_length_is_buffered() -> None:
    sender, receiver = _pair()
    frame = sender.encrypt(b"\x10abc")
    receiver.hold(bytes(6) + frame[:-1])
    assert not receiver.has_frame()
    receiver.hold(frame[-1:])
    assert receiver.has_frame()
    _, other = _pair()
    other.hold(b"\x00\x00\x00\x03")  # a length that kills is something to read
    assert other.has_frame()


@pytest.mark.parametrize("length", range(1, 17))
def test_r_frame_4_length_1_to_16_kills(length: int) -> None:
    """R-FRAME-4: 1 <= L <= 16 can carry no plaintext."""
    _, receiver = _pair()
    with pytest.raises(ProtocolViolation) as caught:
        list(receiver.receive(length.to_bytes(2, "big") + bytes(length)))
    assert caught.value.rule == "R-FRAME-4"


def test_r_frame_4_bad_mac_kills() -> None:
    sender, receiver = _pair()
    frame = bytearray(sender.encrypt(b"\x04abcdefgh"))
    frame[5] ^= 0x80
    with pytest.raises(ProtocolViolation) as caught:
        list(receiver.receive(bytes(frame)))
    assert caught.value.rule == "R-FRAME-4"


def test_r_frame_5_frames_before_a_bad_frame_are_yielded() -> None:
    """R-FRAME-5: strict stream order; good frames before the bad one come out."""
    sender, receiver = _pair()
    stream = sender.encrypt(b"\x10one") + sender.encrypt(b"\x10two") + b"\x00\x05" + bytes(5)
    got = []
    with pytest.raises(ProtocolViolation):
        for plain in receiver.receive(stream):
            got.append(plain)
    assert got == [b"\x10one", b"\x10two"]


def test_r_frame_5_replayed_frame_fails() -> None:
    """R-FRAME-5: the receive nonce moves on, so the same frame twice is a bad MAC."""
    sender, receiver = _pair()
    frame = sender.encrypt(b"\x10x")
    assert list(receiver.receive(frame)) == [b"\x10x"]
    with pytest.raises(ProtocolViolation):
        list(receiver.receive(frame))


def test_r_frame_6_refuses_plaintext_over_2032() -> None:
    """R-FRAME-6: never emit L > 2048."""
    sender, _ = _pair()
    with pytest.raises(ValueError):
        sender.encrypt(b"\x10" * (MAX_PLAINTEXT_SIZE + 1))
    assert sender.send_nonce == int.from_bytes(BASE, "big")  # no nonce used


def test_r_frame_7_one_nonce_per_frame() -> None:
    sender, _ = _pair()
    start = sender.send_nonce
    frames = [sender.encrypt(b"\x10" * n) for n in (1, 2, 3)]
    assert sender.send_nonce == start + 3
    assert [int.from_bytes(f[:2], "big") for f in frames] == [17, 18, 19]


def test_r_frame_8_nonce_wraps_big_endian() -> None:
    """R-FRAME-8: ff..ff + 1 = 00..00, on both sides."""
    top = b"\xff" * 24
    sender = SecureChannel(KEY, top, bytes(24))
    receiver = SecureChannel(KEY, bytes(24), top)
    stream = sender.encrypt(b"\x10a") + sender.encrypt(b"\x10b")
    assert sender.send_nonce == 1
    assert list(receiver.receive(stream)) == [b"\x10a", b"\x10b"]
    assert nonce_bytes(receiver.recv_nonce) == nonce_bytes(1)
    assert NONCE_MODULUS == 1 << 192


def test_r_frame_8_second_frame_uses_incremented_nonce() -> None:
    """Frames use base, base + 1, base + 2 = ...00fe, ...00ff, ...0100 (carry
    from byte 23 into byte 22, big-endian)."""
    sender, _ = _pair()
    first = sender.encrypt(b"\x10a")
    second = sender.encrypt(b"\x10b")
    third = sender.encrypt(b"\x10c")
    assert first[2:] == seal(KEY, bytes(22) + b"\x00\xfe", b"\x10a")
    assert second[2:] == seal(KEY, bytes(22) + b"\x00\xff", b"\x10b")
    assert third[2:] == seal(KEY, bytes(22) + b"\x01\x00", b"\x10c")


# ----------------------------------------------------------------------
# Through RelayServer
# ----------------------------------------------------------------------


def test_r_frame_1_server_handles_frame_sent_byte_by_byte(net: Network) -> None:
    peer = net.connect("a")
    peer.client.send(Ping(b"abcdefgh"))
    frame = peer.client.take_outbox()
    for index in range(len(frame)):
        net.send_raw("a", frame[index : index + 1])
    assert peer.take() == [Pong(b"abcdefgh")]


def test_r_frame_2_server_kills_on_2049(net: Network) -> None:
    peer = net.connect("a")
    net.send_raw("a", b"\x08\x01")
    assert peer.closed and peer.close_reason == "R-FRAME-2"
    assert peer.received == []


def test_r_frame_3_server_ignores_zero_length(net: Network) -> None:
    peer = net.connect("a")
    nonce_before = peer.connection.channel.recv_nonce  # type: ignore[union-attr]
    net.send_raw("a", b"\x00\x00")
    assert not peer.closed
    assert peer.connection.channel.recv_nonce == nonce_before  # type: ignore[union-attr]
    net.send("a", Ping(b"abcdefgh"))
    assert peer.take() == [Pong(b"abcdefgh")]


def test_r_frame_3_zero_length_before_confirmation(net: Network) -> None:
    """An L = 0 frame does not confirm an UNCONFIRMED connection."""
    peer = net.handshake("a")
    net.send_raw("a", b"\x00\x00")
    assert peer.connection.state is ConnectionState.UNCONFIRMED


@pytest.mark.parametrize("length", [1, 16])
def test_r_frame_4_server_kills_short_length(net: Network, length: int) -> None:
    peer = net.connect("a")
    net.send_raw("a", length.to_bytes(2, "big") + bytes(length))
    assert peer.closed and peer.close_reason == "R-FRAME-4"


def test_r_frame_4_server_kills_2048_bytes_of_garbage(net: Network) -> None:
    peer = net.connect("a")
    net.send_raw("a", b"\x08\x00" + bytes(2048))
    assert peer.closed and peer.close_reason == "R-FRAME-4"
    assert peer.received == []


def test_r_frame_5_frames_before_bad_frame_still_handled(net: Network) -> None:
    """R-FRAME-5: an OOB in the same chunk as a bad frame is still relayed to
    its (good) destination before the sender is killed."""
    a = net.connect("a")
    b = net.connect("b")
    a.client.send(OobSend(b.public_key, b"first"))
    a.client.send(OobSend(b.public_key, b"second"))
    net.send_raw("a", a.client.take_outbox() + b"\x00\x10" + bytes(16))
    assert a.closed and a.close_reason == "R-FRAME-4"
    assert b.take() == [OobReceive(a.public_key, b"first"), OobReceive(a.public_key, b"second")]
    assert not b.closed


def test_r_frame_6_server_relays_2032_byte_plaintext_as_2048(net: Network) -> None:
    """R-FRAME-6: the largest server frame has L = 2048 exactly."""
    a = net.connect("a")
    b = net.connect("b")
    net.send("a", RoutingRequest(b.public_key))
    net.send("b", RoutingRequest(a.public_key))
    a.take(), b.take()
    net.hold("b")
    net.send("a", RoutedData(16, b"\xab" * (MAX_PLAINTEXT_SIZE - 1)))
    (frame,) = b.connection.outbox
    assert len(frame) == 2 + 2048 and frame[:2] == b"\x08\x00"
    net.release("b")
    assert b.take() == [RoutedData(16, b"\xab" * (MAX_PLAINTEXT_SIZE - 1))]


def test_r_frame_7_server_send_nonce_counts_frames(net: Network) -> None:
    peer = net.connect("a")
    channel = peer.connection.channel
    assert channel is not None
    start = channel.send_nonce
    net.send("a", Ping(b"1" * 8), Ping(b"2" * 8), Ping(b"3" * 8))
    assert channel.send_nonce == start + 3
    assert peer.take() == [Pong(b"1" * 8), Pong(b"2" * 8), Pong(b"3" * 8)]
