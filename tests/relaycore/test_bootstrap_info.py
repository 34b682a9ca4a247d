"""The bootstrap-info answer (0xF0) as tox-bootstrapd gives it: request of exactly 78
bytes; answer 0xF0, the version number u32 big-endian, the MOTD with its NUL, at most
256 bytes (relaycore/bootstrap_info.py cites the c-toxcore sources)."""

from __future__ import annotations

import pytest

from relaycore.bootstrap_info import (
    DEFAULT_VERSION,
    format_uptime,
    info_response,
    is_info_request,
    render_motd,
    version_number,
)


def test_version_number_of_tox_bootstrapd() -> None:
    assert version_number(0, 2, 23) == 1_000_002_023 == DEFAULT_VERSION
    assert version_number(0, 2, 18) == 1_000_002_018


@pytest.mark.parametrize(("size", "first", "answered"), [(78, 0xF0, True), (77, 0xF0, False),
                                                          (79, 0xF0, False), (78, 0xF1, False),
                                                          (1, 0xF0, False)])  # fmt: skip
def test_only_78_byte_requests_are_answered(size: int, first: int, answered: bool) -> None:
    assert is_info_request(bytes((first,)) + bytes(size - 1)) is answered


def test_answer_layout() -> None:
    answer = info_response(1_000_002_023, render_motd("hello", {}))
    assert answer == b"\xf0" + (1_000_002_023).to_bytes(4, "big") + b"hello\x00"


def test_motd_template_fields_and_other_dollars() -> None:
    motd = render_motd(
        "up $worker_uptime, ${worker_connections} conns, $worker_relayed relayed, $other $",
        {"worker_uptime": "1h 2m", "worker_connections": 7, "worker_relayed": 9},
    )
    assert motd == b"up 1h 2m, 7 conns, 9 relayed, $other $\x00"


def test_motd_is_cut_to_255_bytes_plus_nul_without_splitting_a_character() -> None:
    assert render_motd("x" * 400, {}) == b"x" * 255 + b"\x00"
    motd = render_motd("x" * 254 + "\u00e9", {})  # the 2-byte character would cross 255
    assert motd == b"x" * 254 + b"\x00"
    assert len(info_response(DEFAULT_VERSION, render_motd("y" * 999, {}))) == 1 + 4 + 256


@pytest.mark.parametrize("bad", [b"no nul", b"x" * 256 + b"\x00"])
def test_answer_refuses_a_motd_the_reference_could_not_send(bad: bytes) -> None:
    with pytest.raises(ValueError):
        info_response(DEFAULT_VERSION, bad)


def test_format_uptime() -> None:
    assert format_uptime(59) == "0m"
    assert format_uptime(3 * 3600 + 5 * 60) == "3h 5m"
    assert format_uptime(2 * 86400 + 60) == "2d 0h 1m"
