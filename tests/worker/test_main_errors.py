"""``python -m worker`` reports a bind failure as one ERROR line for the
supervisor, not a traceback (issue 14 point 5), and exits quietly when its
specification never comes."""

from __future__ import annotations

import json
import subprocess
import sys


def spec(**changes: object) -> str:
    base = {
        "shard": 1,
        "secret_key": bytes(range(32)).hex(),
        "options": {},
        "host": "192.0.2.1",  # TEST-NET-1: not an address of this host
        "ports": [0],
        "backlog": 16,
        "runtime_dir": "/nonexistent",
        "min_open_files": 0,
        "log_level": "error",
        "log_format": "text",
        "private_port": False,
        "udp_port": None,
        "onion_secret": bytes(32).hex(),
    }
    return json.dumps({**base, **changes}) + "\n"


def run_worker(stdin: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker"], input=stdin, capture_output=True, text=True, timeout=30
    )


def test_bind_failure_is_one_error_line() -> None:
    result = run_worker(spec())
    assert result.returncode == 1
    assert result.stdout == (
        "ERROR cannot listen on 192.0.2.1 port 0: Cannot assign requested address\n"
    )
    assert "Traceback" not in result.stderr


def test_udp_bind_failure_is_one_error_line() -> None:
    result = run_worker(spec(ports=[], udp_port=0))
    assert result.returncode == 1
    assert result.stdout == (
        "ERROR cannot bind UDP port 0 on 192.0.2.1: Cannot assign requested address\n"
    )
    assert "Traceback" not in result.stderr


def test_no_specification_exits_quietly() -> None:
    result = run_worker("")
    assert result.returncode == 1
    assert result.stdout == "" and "Traceback" not in result.stderr
