"""`cluster probe HOST PORT PUBKEY` (issue 14, "What must exist"): a real
handshake and one PING round trip against our relay and tox-bootstrapd; a
wrong key and a closed port fail with exit status 1 and a clear cause."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

from testbed.bootstrapd import ReferenceRelay
from testbed.relay_process import RelayProcess

REPO = Path(__file__).resolve().parents[2]
WRONG_KEY = crypto_scalarmult_base(bytes(range(1, 33))).hex()  # a valid key, another relay's
OK_LINE = re.compile(
    r"^ok: handshake (\d+\.\d\d) ms, ping round trip (\d+\.\d\d) ms \(127\.0\.0\.1 port \d+\)$"
)


def probe(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cluster.cli", "probe", *argv],
        capture_output=True, text=True, cwd=REPO, timeout=30,
    )  # fmt: skip


def test_probe_our_relay(relay_process: RelayProcess) -> None:
    target = [relay_process.host, str(relay_process.port)]
    result = probe(*target, relay_process.public_key.hex())
    assert result.returncode == 0, result.stderr
    match = OK_LINE.match(result.stdout.strip())
    assert match, result.stdout
    assert float(match[1]) > 0 and float(match[2]) > 0
    keys = relay_process.workdir / "relay.keys"
    as_json = probe(*target, f"@{keys}", "--json")
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    assert report["status"] == "ok" and report["port"] == relay_process.port
    assert 0 < report["ping_ms"] < 5000 and 0 < report["handshake_ms"] < 5000


@pytest.mark.reference
def test_probe_tox_bootstrapd(reference_relay: ReferenceRelay) -> None:
    key = reference_relay.public_key.hex()
    result = probe(reference_relay.host, str(reference_relay.port), key)
    assert result.returncode == 0, result.stderr
    assert OK_LINE.match(result.stdout.strip()), result.stdout


def test_probe_with_a_wrong_key_fails_clearly(relay_process: RelayProcess) -> None:
    result = probe(relay_process.host, str(relay_process.port), WRONG_KEY, "--json")
    assert result.returncode == 1
    assert "FAILED" in result.stderr
    assert "most likely PUBKEY is not this relay's public key" in result.stderr
    assert json.loads(result.stdout)["status"] == "failed"


@pytest.mark.reference
def test_probe_tox_bootstrapd_with_a_wrong_key_fails(reference_relay: ReferenceRelay) -> None:
    result = probe(reference_relay.host, str(reference_relay.port), WRONG_KEY,
                   "--timeout", "2")  # fmt: skip
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "handshake" in result.stderr


def test_probe_of_a_closed_port_fails_clearly() -> None:
    with socket.socket() as reserved:  # bound, not listening: connections are refused
        reserved.bind(("127.0.0.1", 0))
        port = reserved.getsockname()[1]
        result = probe("127.0.0.1", str(port), WRONG_KEY)
    assert result.returncode == 1
    assert f"FAILED (127.0.0.1 port {port}): connection refused" in result.stderr
    assert result.stdout == ""


def test_probe_refuses_a_malformed_key() -> None:
    result = probe("127.0.0.1", "33445", "abc")
    assert result.returncode == 2
    assert "PUBKEY must be 64 hex digits" in result.stderr
    zeros = probe("127.0.0.1", "33445", bytes(32).hex())
    assert zeros.returncode == 2 and "is not a usable public key" in zeros.stderr
    assert "Traceback" not in zeros.stderr


def test_probe_of_a_silent_server_times_out_clearly() -> None:
    with socket.socket() as silent:  # accepts (kernel backlog) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        result = probe("127.0.0.1", str(port), WRONG_KEY, "--timeout", "0.5")
    assert result.returncode == 1
    assert "no answer to the handshake within 0.5 s" in result.stderr
