"""``cluster probe HOST PORT PUBKEY``: is this Tox TCP relay answering?

A health check for an operator, a monitoring system or a status page: one
connection, the real handshake (it proves the relay holds the secret key of
PUBKEY), one PING answered by a PONG (it proves the relay serves clients),
then a clean close. It works against any Tox TCP relay, ours or
tox-bootstrapd, and prints the times; the exit status says the verdict:

* 0 -- ``ok: handshake 0.41 ms, ping round trip 0.12 ms (127.0.0.1 port 33445)``
* 1 -- ``cluster probe: FAILED: ...`` on stderr with the cause (connection
  refused, no answer within the timeout, closed during the handshake: most
  likely a wrong public key, ...)
* 2 -- unusable arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import json
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

from nacl.exceptions import CryptoError

from cluster.client import ConnectionClosed, RelayClient
from cluster.loadtest.options import UsageError, parse_public_key

DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True)
class ProbeResult:
    host: str
    port: int
    handshake_s: float  # TCP connect + hello / reply
    ping_s: float  # PING -> PONG round trip on the confirmed connection

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok",
            "host": self.host,
            "port": self.port,
            "handshake_ms": self.handshake_s * 1e3,
            "ping_ms": self.ping_s * 1e3,
        }


class ProbeFailed(Exception):
    """The relay did not pass; the message says at which step and why."""


def _cause(error: BaseException, step: str, timeout: float) -> str:
    if isinstance(error, TimeoutError):
        return f"no answer to the {step} within {timeout:g} s"
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (nothing listens on that port)"
    if isinstance(error, ConnectionClosed):
        if error.reason.startswith("relay broke"):
            return f"not a Tox TCP relay reply during the {step}: {error.reason}"
        if step == "handshake":
            return (
                "the relay closed the connection during the handshake: "
                "most likely PUBKEY is not this relay's public key"
            )
        return f"the relay closed the connection during the {step} ({error.reason})"
    if isinstance(error, socket.gaierror):
        return f"cannot resolve the host: {error.strerror}"
    if isinstance(error, OSError):
        reason = error.strerror or errno.errorcode.get(error.errno or 0, str(error))
        return f"{step}: {reason}"
    return f"{step}: {error!r}"


async def probe(host: str, port: int, public_key: bytes, timeout: float) -> ProbeResult:
    """Handshake, one PING round trip, close; ProbeFailed says what went wrong."""
    started = time.perf_counter()
    try:
        client = await RelayClient.connect(host, port, public_key, timeout=timeout, confirm=False)
    except (OSError, TimeoutError, ConnectionClosed) as error:
        raise ProbeFailed(_cause(error, "handshake", timeout)) from None
    handshake_s = time.perf_counter() - started
    try:
        ping_s = await client.ping(timeout)
    except (OSError, TimeoutError, ConnectionClosed) as error:
        client.abort()
        raise ProbeFailed(_cause(error, "ping", timeout)) from None
    await client.close()
    return ProbeResult(host, port, handshake_s, ping_s)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``probe`` on the ``cluster`` command's subparsers."""
    parser = subparsers.add_parser(
        "probe",
        help="health check: handshake and one ping round trip with any Tox TCP relay",
        description="Connect to a Tox TCP relay (ours or tox-bootstrapd), complete the "
        "handshake with PUBKEY, send one PING and wait for its PONG, close. Prints the "
        "times and exits 0; on failure prints the cause on stderr and exits 1.",
    )
    parser.add_argument("host", metavar="HOST", help="relay address or name")
    parser.add_argument("port", type=int, metavar="PORT", help="relay TCP port")
    parser.add_argument(
        "pubkey",
        metavar="PUBKEY",
        help="the relay's public key: 64 hex digits, or @FILE, a 64-byte keys file",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=DEFAULT_TIMEOUT,
        metavar="SECONDS",
        help=f"for the handshake and for the ping, each (default {DEFAULT_TIMEOUT:g})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.set_defaults(handler=run_command)
    return parser


def run_command(args: argparse.Namespace) -> int:
    try:
        public_key = parse_public_key(args.pubkey)
        if not 1 <= args.port <= 65535:
            raise UsageError(f"PORT must be 1..65535, got {args.port}")
        if not args.timeout > 0:
            raise UsageError(f"--timeout must be > 0, got {args.timeout:g}")
    except UsageError as error:
        print(f"cluster probe: error: {error}", file=sys.stderr)
        return 2
    try:
        result = asyncio.run(probe(args.host, args.port, public_key, args.timeout))
    except CryptoError:  # e.g. all zeros: no shared key can be computed with it
        print(
            f"cluster probe: error: PUBKEY {args.pubkey[:16]}... is not a usable public key",
            file=sys.stderr,
        )
        return 2
    except ProbeFailed as error:
        where = f"{args.host} port {args.port}"
        if args.json:
            print(json.dumps({"status": "failed", "host": args.host, "port": args.port,
                              "failure": str(error)}))  # fmt: skip
        print(f"cluster probe: FAILED ({where}): {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(
            f"ok: handshake {result.handshake_s * 1e3:.2f} ms, ping round trip "
            f"{result.ping_s * 1e3:.2f} ms ({args.host} port {args.port})"
        )
    return 0
