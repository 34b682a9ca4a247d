"""The bootstrap-info answer (UDP 0xF0, what status pages read: version and MOTD)
compared byte for byte with each reference daemon: Debian's tox-bootstrapd 0.2.18
and tox-bootstrapd 0.2.23, both with ``enable_motd`` on, against our relay with the
same MOTD and that daemon's version number (``motd``, ``info_version``)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from relaycore.bootstrap_info import version_number
from testbed.bootstrapd import (
    BOOTSTRAPD_PATH,
    ReferenceRelay,
    _in_ci,
    bootstrapd_available,
    start_bootstrapd,
)
from testbed.relay_process import HOST, start_relay
from testbed.toxcore0223 import require_toxcore_0223

pytestmark = pytest.mark.reference

MOTD = "Tox relay test node"


@pytest.fixture(params=["0.2.18", "0.2.23"])
def reference(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ReferenceRelay]:
    if request.param == "0.2.18":
        if not bootstrapd_available():
            reason = f"{BOOTSTRAPD_PATH} not installed (apt-get install toxcore-utils)"
            if _in_ci():
                pytest.fail(f"{reason}; required when CI is set")
            pytest.skip(reason)
        binary = BOOTSTRAPD_PATH
    else:
        binary = require_toxcore_0223().bootstrapd
    daemon = start_bootstrapd(tmp_path / "reference", binary=binary, motd=MOTD)
    try:
        yield daemon
    finally:
        daemon.stop()


def ask(port: int, request: bytes) -> bytes | None:
    """One datagram to ``port``; the answer, or None after 1 s of silence."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((HOST, 0))
        sock.settimeout(1.0)
        sock.sendto(request, (HOST, port))
        try:
            return sock.recv(2048)
        except TimeoutError:
            return None


def test_bootstrap_info_answer_equals_the_reference(
    reference: ReferenceRelay, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    version = request.node.callspec.params["reference"]
    major, minor, patch = (int(part) for part in version.split("."))
    ours = start_relay(
        tmp_path / "ours",
        workers=1,
        config=f'motd = "{MOTD}"\ninfo_version = {version_number(major, minor, patch)}\n',
    )
    try:
        assert ours.udp_port is not None
        request_78 = b"\xf0" + bytes(range(77))
        theirs = ask(reference.udp_port, request_78)
        assert theirs == b"\xf0" + version_number(major, minor, patch).to_bytes(4, "big") + (
            MOTD.encode() + b"\x00"
        )
        assert ask(ours.udp_port, request_78) == theirs
        for size in (77, 79):  # only exactly 78 bytes are answered
            wrong = b"\xf0" + bytes(size - 1)
            assert ask(reference.udp_port, wrong) is None
            assert ask(ours.udp_port, wrong) is None
    finally:
        ours.stop()
