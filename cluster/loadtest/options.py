"""The ``loadtest`` command line: flags, their validation, and the run's settings.

``add_arguments`` fills an argparse parser; ``options_from_args`` turns the
parsed namespace into a frozen ``LoadtestOptions`` or raises ``UsageError``
with a message that names the flag (non-loopback targets, malformed public
keys, sizes the protocol cannot carry ...).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cluster.loadtest.payload import HEADER_SIZE
from relaycore.constants import MAX_PLAINTEXT_SIZE, TCP_MAX_OOB_DATA_LENGTH

MODES = ("throughput", "oob", "handshake", "idle")
TRAFFIC_MODES = ("throughput", "oob")
KEYS_FILE_SIZE = 64
MAX_DATA_PAYLOAD = MAX_PLAINTEXT_SIZE - 1  # one byte of the frame is the connection id
MAX_SOURCE_ADDRESSES = 254

DEFAULT_PAIRS = 8
DEFAULT_WINDOW = 8
DEFAULT_SIZE = 1024
DEFAULT_CONNECTIONS = 1000
DEFAULT_CONCURRENCY = 64
DEFAULT_DURATION = {"throughput": 10.0, "oob": 10.0, "idle": 40.0, "handshake": 0.0}
DEFAULT_WARMUP = 1.0
DEFAULT_DRAIN = 2.0
DEFAULT_SOURCE_ADDRESSES = 4  # at least; more when many connections open at once
# Connections one source address may have opening at once by default: half of
# a relay's default max_unconfirmed_per_ip (256 per worker), so a burst such as
# -K 10000 is not refused as a half-open flood from a few addresses.
OPENING_PER_SOURCE_ADDRESS = 128
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_LINK_TIMEOUT = 10.0
DEFAULT_SETUP_TIMEOUT = 60.0
DEFAULT_PING_TIMEOUT = 10.0
HANDSHAKE_RUN_ALLOWANCE = 300.0  # default deadline of the handshake phase itself
DEADLINE_SLACK = 30.0
DEFAULT_MAX_FAILURE_FRACTION = 0.01
DEFAULT_MAX_DISCONNECT_FRACTION = 0.01
DEFAULT_MAX_LOSS_FRACTION = 0.01


class UsageError(Exception):
    """A flag or argument cannot be used; the message says which and why."""


@dataclass(frozen=True)
class Target:
    """The relay under test."""

    name: str  # HOST as given
    address: str  # the resolved IP address connected to
    port: int
    public_key: bytes
    loopback: bool


@dataclass(frozen=True)
class LoadtestOptions:
    """Everything one run needs, validated (picklable: sent to the worker processes)."""

    mode: str
    target: Target
    pairs: int
    window: int
    size: int
    connections: int
    concurrency: int
    duration: float
    warmup: float
    drain: float
    processes: int
    source_addresses: tuple[str, ...]  # empty: let the kernel choose
    seed: int | None
    connect_timeout: float
    link_timeout: float
    setup_timeout: float
    ping_timeout: float
    deadline: float
    server_pid: int | None
    json: bool
    quiet: bool
    plot: Path | None
    max_failure_fraction: float = DEFAULT_MAX_FAILURE_FRACTION
    max_disconnect_fraction: float = DEFAULT_MAX_DISCONNECT_FRACTION
    max_loss_fraction: float = DEFAULT_MAX_LOSS_FRACTION
    partner_port: int | None = None  # the second client of each pair (--partner-port)

    @property
    def units(self) -> int:
        """What is divided among the processes: pairs or connections."""
        return self.pairs if self.mode in TRAFFIC_MODES else self.connections


def default_processes() -> int:
    """min(4, usable CPUs)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag of ``cluster loadtest``."""
    add = parser.add_argument
    add("mode", choices=MODES, metavar="MODE", help="throughput | oob | handshake | idle")
    add("host", metavar="HOST", help="relay address; loopback only unless --allow-remote")
    add("port", type=int, metavar="PORT", help="relay TCP port")
    add(
        "pubkey",
        metavar="PUBKEY",
        help="relay public key: 64 hex digits, or @FILE, a 64-byte keys file "
        "(public key || secret key, as `cluster start` and tox-bootstrapd write it)",
    )
    shape = parser.add_argument_group("load shape")
    shape.add_argument(
        "-P", "--pairs", type=int, metavar="P", default=DEFAULT_PAIRS,
        help=f"throughput/oob: client pairs (default {DEFAULT_PAIRS})",
    )  # fmt: skip
    shape.add_argument(
        "-W", "--window", type=int, metavar="W", default=DEFAULT_WINDOW,
        help=f"throughput/oob: packets each client keeps in flight (default {DEFAULT_WINDOW})",
    )  # fmt: skip
    shape.add_argument(
        "-S", "--size", type=int, metavar="S", default=DEFAULT_SIZE,
        help=f"throughput/oob: payload bytes per packet, {HEADER_SIZE}..{MAX_DATA_PAYLOAD} "
        f"(oob: ..{TCP_MAX_OOB_DATA_LENGTH}; default {DEFAULT_SIZE})",
    )  # fmt: skip
    shape.add_argument(
        "-C", "-N", "--connections", type=int, metavar="N", default=DEFAULT_CONNECTIONS,
        help=f"handshake: connections C to open; idle: connections N to hold "
        f"(default {DEFAULT_CONNECTIONS})",
    )  # fmt: skip
    shape.add_argument(
        "-K", "--concurrency", type=int, metavar="K", default=DEFAULT_CONCURRENCY,
        help="connections being opened at once, over all processes; handshake: K "
        f"(default {DEFAULT_CONCURRENCY})",
    )  # fmt: skip
    shape.add_argument(
        "-D", "--duration", type=float, metavar="D",
        help="seconds measured (throughput/oob, default 10) or held (idle, default 40, "
        "beyond the relay's 30 s ping interval); handshake runs until C are done",
    )  # fmt: skip
    shape.add_argument(
        "--warmup", type=float, metavar="SECONDS", default=DEFAULT_WARMUP,
        help=f"throughput/oob: seconds of traffic before measuring (default {DEFAULT_WARMUP:g})",
    )  # fmt: skip
    shape.add_argument(
        "--drain", type=float, metavar="SECONDS", default=DEFAULT_DRAIN,
        help="throughput/oob: seconds to wait for echoes after the last packet is sent; "
        f"what is still missing then counts as lost (default {DEFAULT_DRAIN:g})",
    )  # fmt: skip
    shape.add_argument(
        "--seed", type=int, metavar="INT",
        help="deterministic client keys and payloads (each process derives its own seed)",
    )  # fmt: skip
    gen = parser.add_argument_group("generator")
    gen.add_argument(
        "--processes", type=int, metavar="N", default=default_processes(),
        help="worker processes generating load (default min(4, CPUs) = %(default)s)",
    )  # fmt: skip
    gen.add_argument(
        "--source-addresses", type=int, default=None, metavar="N",
        help="spread client sockets over 127.0.0.1 .. 127.0.0.N (IPv4 loopback targets "
        f"only; default: {DEFAULT_SOURCE_ADDRESSES}, or one per "
        f"{OPENING_PER_SOURCE_ADDRESS} connections opening at once, up to "
        f"{MAX_SOURCE_ADDRESSES}, so that a relay's per-address limit on unconfirmed "
        "connections does not refuse a large -K)",
    )  # fmt: skip
    gen.add_argument(
        "--partner-port", type=int, metavar="PORT",
        help="throughput/oob: the second client of every pair connects to PORT (same host "
        "and key), e.g. another shard's direct port of `cluster start --shard-ports`, so "
        "every pair crosses shards (default: PORT)",
    )  # fmt: skip
    gen.add_argument(
        "--allow-remote", action="store_true",
        help="allow a HOST that is not a loopback address (only relays you run!)",
    )  # fmt: skip
    timeouts = parser.add_argument_group("timeouts")
    timeouts.add_argument(
        "--connect-timeout", type=float, metavar="SECONDS", default=DEFAULT_CONNECT_TIMEOUT,
        help="seconds for one connection's handshake and first PING round trip "
        f"(default {DEFAULT_CONNECT_TIMEOUT:g})",
    )  # fmt: skip
    timeouts.add_argument(
        "--link-timeout", type=float, metavar="SECONDS", default=DEFAULT_LINK_TIMEOUT,
        help="throughput: seconds for a pair's routing responses and connect "
        f"notifications (default {DEFAULT_LINK_TIMEOUT:g})",
    )  # fmt: skip
    timeouts.add_argument(
        "--setup-timeout", type=float, metavar="SECONDS", default=DEFAULT_SETUP_TIMEOUT,
        help="seconds for every process to open (and link) its connections "
        f"(default {DEFAULT_SETUP_TIMEOUT:g})",
    )  # fmt: skip
    timeouts.add_argument(
        "--ping-timeout", type=float, metavar="SECONDS", default=DEFAULT_PING_TIMEOUT,
        help="idle: seconds for the final PING round trip that proves a connection "
        f"survived (default {DEFAULT_PING_TIMEOUT:g})",
    )  # fmt: skip
    timeouts.add_argument(
        "--deadline", type=float, metavar="SECONDS",
        help="overall limit in seconds; the run is stopped and reported as failed after it "
        "(default: the sum of the phases' limits plus 30 s)",
    )  # fmt: skip
    verdict = parser.add_argument_group(
        "verdict",
        "the run fails (status failed, exit status 1, the cause in the report) when a "
        "fraction passes its limit; 0 tolerates nothing, 1 everything",
    )
    verdict.add_argument(
        "--max-failure-fraction", type=float, metavar="F", default=DEFAULT_MAX_FAILURE_FRACTION,
        help="handshake: failed handshakes / attempted; other modes: pairs or connections "
        f"not set up / requested (default {DEFAULT_MAX_FAILURE_FRACTION:g})",
    )  # fmt: skip
    verdict.add_argument(
        "--max-disconnect-fraction", type=float, metavar="F",
        default=DEFAULT_MAX_DISCONNECT_FRACTION,
        help="throughput/oob/idle: connections the relay closed during the run / connections "
        f"held (default {DEFAULT_MAX_DISCONNECT_FRACTION:g})",
    )  # fmt: skip
    verdict.add_argument(
        "--max-loss-fraction", type=float, metavar="F", default=DEFAULT_MAX_LOSS_FRACTION,
        help="throughput/oob: packets never echoed / sent "
        f"(default {DEFAULT_MAX_LOSS_FRACTION:g})",
    )  # fmt: skip
    out = parser.add_argument_group("output")
    out.add_argument(
        "--server-pid", type=int, metavar="PID",
        help="relay process (e.g. the `cluster start` supervisor): report the RSS of it and "
        "all its descendants before/after, and per connection",
    )  # fmt: skip
    out.add_argument("--json", action="store_true", help="print one JSON line, not the table")
    out.add_argument("--quiet", action="store_true", help="no progress line on stderr")
    out.add_argument(
        "--plot", type=Path, metavar="FILE.png",
        help="draw the rate over time and the latency distribution (needs matplotlib)",
    )  # fmt: skip


def parse_public_key(text: str) -> bytes:
    """PUBKEY: 64 hex digits, or ``@path`` of a 64-byte keys file (public key first)."""
    if text.startswith("@"):
        path = Path(text[1:])
        try:
            data = path.read_bytes()
        except OSError as error:
            raise UsageError(f"PUBKEY {text}: cannot read: {error.strerror or error}") from None
        if len(data) != KEYS_FILE_SIZE:
            raise UsageError(
                f"PUBKEY {text}: keys file is {len(data)} bytes; expected {KEYS_FILE_SIZE} "
                "(public key || secret key)"
            )
        return data[:32]
    digits = text.strip()
    if len(digits) != 64:
        raise UsageError(f"PUBKEY must be 64 hex digits or @KEYSFILE; got {len(digits)} characters")
    try:
        return bytes.fromhex(digits)
    except ValueError:
        raise UsageError(
            "PUBKEY must be 64 hex digits or @KEYSFILE; it has a non-hex digit"
        ) from None


def resolve_target(host: str, port: int, public_key: bytes, allow_remote: bool) -> Target:
    """Resolve HOST; refuse anything but loopback unless ``allow_remote``."""
    if not 1 <= port <= 65535:
        raise UsageError(f"PORT must be 1..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise UsageError(f"HOST {host!r}: cannot resolve: {error.strerror}") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    loopback = all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
    if not loopback and not allow_remote:
        raise UsageError(
            f"HOST {host!r} ({', '.join(addresses)}) is not a loopback address; a load test "
            "floods its target, so pass --allow-remote only for a relay you run"
        )
    ipv4 = [a for a in addresses if ipaddress.ip_address(a.split("%")[0]).version == 4]
    return Target(host, (ipv4 or addresses)[0], port, public_key, loopback)


def source_addresses(target: Target, count: int) -> tuple[str, ...]:
    """127.0.0.1 .. 127.0.0.N for an IPv4 loopback target; none otherwise."""
    if not target.loopback or ipaddress.ip_address(target.address).version != 4:
        return ()
    return tuple(f"127.0.0.{i}" for i in range(1, count + 1))


def default_source_addresses(mode: str, concurrency: int, pairs: int) -> int:
    """Enough source addresses that each has at most OPENING_PER_SOURCE_ADDRESS
    connections opening at once (handshake / idle: K; traffic: both clients of
    up to K pairs), and at least DEFAULT_SOURCE_ADDRESSES."""
    opening = 2 * min(pairs, concurrency) if mode in TRAFFIC_MODES else concurrency
    needed = -(-opening // OPENING_PER_SOURCE_ADDRESS)
    return max(DEFAULT_SOURCE_ADDRESSES, min(needed, MAX_SOURCE_ADDRESSES))


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise UsageError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value:g}")


def options_from_args(args: argparse.Namespace) -> LoadtestOptions:
    """Validate the parsed flags; UsageError names the first one that is wrong."""
    mode: str = args.mode
    for name in ("pairs", "window", "connections", "concurrency", "processes"):
        _positive(f"--{name}", getattr(args, name))
    for name in ("connect_timeout", "link_timeout", "setup_timeout", "ping_timeout"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    _positive("--warmup", args.warmup, allow_zero=True)
    _positive("--drain", args.drain, allow_zero=True)
    duration = DEFAULT_DURATION[mode] if args.duration is None else args.duration
    if mode != "handshake":
        _positive("--duration", duration)
    for name in ("max_failure_fraction", "max_disconnect_fraction", "max_loss_fraction"):
        fraction = getattr(args, name)
        if not 0 <= fraction <= 1:  # also refuses NaN
            raise UsageError(f"--{name.replace('_', '-')} must be 0..1, got {fraction:g}")
    if args.source_addresses is not None and not (
        1 <= args.source_addresses <= MAX_SOURCE_ADDRESSES
    ):
        raise UsageError(f"--source-addresses must be 1..{MAX_SOURCE_ADDRESSES}")
    address_count = args.source_addresses or default_source_addresses(
        mode, args.concurrency, args.pairs
    )
    if mode in TRAFFIC_MODES:
        largest = TCP_MAX_OOB_DATA_LENGTH if mode == "oob" else MAX_DATA_PAYLOAD
        if not HEADER_SIZE <= args.size <= largest:
            raise UsageError(
                f"--size must be {HEADER_SIZE}..{largest} bytes in {mode} mode, got {args.size}"
            )
    if args.server_pid is not None and not Path(f"/proc/{args.server_pid}").is_dir():
        raise UsageError(f"--server-pid {args.server_pid}: no such process")
    if args.plot is not None and args.plot.suffix.lower() != ".png":
        raise UsageError(f"--plot {args.plot}: the file name must end in .png")
    target = resolve_target(args.host, args.port, parse_public_key(args.pubkey), args.allow_remote)
    partner_port = getattr(args, "partner_port", None)
    if partner_port is not None:
        if mode not in TRAFFIC_MODES:
            raise UsageError(f"--partner-port is for throughput and oob, not {mode}")
        if not 1 <= partner_port <= 65535:
            raise UsageError(f"--partner-port must be 1..65535, got {partner_port}")
    warmup = args.warmup if mode in TRAFFIC_MODES else 0.0
    drain = args.drain if mode in TRAFFIC_MODES else 0.0
    deadline = args.deadline
    if deadline is None:
        run_s = HANDSHAKE_RUN_ALLOWANCE if mode == "handshake" else warmup + duration + drain
        if mode == "idle":
            run_s += args.ping_timeout
        deadline = args.setup_timeout + run_s + DEADLINE_SLACK
    _positive("--deadline", deadline)
    units = args.pairs if mode in TRAFFIC_MODES else args.connections
    return LoadtestOptions(
        mode=mode,
        target=target,
        pairs=args.pairs,
        window=args.window,
        size=args.size,
        connections=args.connections,
        concurrency=args.concurrency,
        duration=duration,
        warmup=warmup,
        drain=drain,
        processes=min(args.processes, units),
        source_addresses=source_addresses(target, address_count),
        seed=args.seed,
        connect_timeout=args.connect_timeout,
        link_timeout=args.link_timeout,
        setup_timeout=args.setup_timeout,
        ping_timeout=args.ping_timeout,
        deadline=deadline,
        server_pid=args.server_pid,
        json=args.json,
        quiet=args.quiet,
        plot=args.plot,
        max_failure_fraction=args.max_failure_fraction,
        max_disconnect_fraction=args.max_disconnect_fraction,
        max_loss_fraction=args.max_loss_fraction,
        partner_port=partner_port,
    )
