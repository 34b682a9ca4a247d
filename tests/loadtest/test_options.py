"""Arguments of `cluster loadtest`: validation, PUBKEY forms, limits, process shares."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cluster.cli import build_parser
from cluster.loadtest.limits import LimitError, check_limits, ensure_open_files
from cluster.loadtest.modes.handshake import HandshakeRunner
from cluster.loadtest.options import (
    LoadtestOptions,
    UsageError,
    options_from_args,
    parse_public_key,
)
from cluster.loadtest.payload import (
    ECHO,
    HEADER,
    HEADER_SIZE,
    ORIGINAL,
    Randomness,
    echo_of,
    original,
    process_seed,
)
from cluster.loadtest.plot import PlotUnavailable, require_matplotlib
from cluster.loadtest.spec import split_evenly, worker_specs

KEY = bytes(range(32))
HEX = KEY.hex()


def options(*argv: str) -> LoadtestOptions:
    args = build_parser().parse_args(["loadtest", *argv])
    return options_from_args(args)


def test_loadtest_is_a_cluster_subcommand() -> None:
    args = build_parser().parse_args(["loadtest", "idle", "127.0.0.1", "33445", HEX])
    assert args.handler.__module__ == "cluster.loadtest.cli"


def test_defaults_per_mode() -> None:
    throughput = options("throughput", "127.0.0.1", "33445", HEX)
    assert (throughput.pairs, throughput.window, throughput.size) == (8, 8, 1024)
    assert (throughput.duration, throughput.warmup) == (10.0, 1.0)
    assert throughput.source_addresses == ("127.0.0.1", "127.0.0.2", "127.0.0.3", "127.0.0.4")
    assert throughput.target.public_key == KEY and throughput.target.loopback
    idle = options("idle", "127.0.0.1", "33445", HEX)
    assert idle.duration > 30  # past the relay's 30 s ping interval
    assert idle.warmup == 0
    handshake = options("handshake", "127.0.0.1", "33445", HEX, "-C", "3", "--processes", "8")
    assert handshake.processes == 3  # never more processes than connections
    assert handshake.deadline > handshake.setup_timeout


def test_non_loopback_host_is_refused_unless_allowed() -> None:
    with pytest.raises(UsageError, match="not a loopback address"):
        options("throughput", "10.1.2.3", "33445", HEX)
    remote = options("throughput", "10.1.2.3", "33445", HEX, "--allow-remote")
    assert not remote.target.loopback
    assert remote.source_addresses == ()  # 127.x sources cannot reach it


def test_loopback_names_and_ipv6() -> None:
    assert options("handshake", "localhost", "33445", HEX).target.loopback
    v6 = options("handshake", "::1", "33445", HEX)
    assert v6.target.loopback and v6.source_addresses == ()


@pytest.mark.parametrize("text", [HEX, HEX.upper(), f"  {HEX} "])
def test_public_key_as_hex(text: str) -> None:
    assert parse_public_key(text) == KEY


@pytest.mark.parametrize(
    ("text", "message"),
    [(HEX[:-2], "64 hex digits"), ("zz" + HEX[2:], "non-hex"), ("", "64 hex digits")],
)
def test_public_key_malformed(text: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        parse_public_key(text)


def test_public_key_from_keys_file(tmp_path: Path) -> None:
    keys = tmp_path / "relay.keys"
    keys.write_bytes(KEY + os.urandom(32))
    assert parse_public_key(f"@{keys}") == KEY
    assert options("oob", "127.0.0.1", "1", f"@{keys}").target.public_key == KEY
    keys.write_bytes(KEY + b"short")
    with pytest.raises(UsageError, match="37 bytes; expected 64"):
        parse_public_key(f"@{keys}")
    with pytest.raises(UsageError, match="cannot read"):
        parse_public_key(f"@{tmp_path / 'missing.keys'}")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["oob", "--size", "1025"], "--size must be 13..1024"),
        (["throughput", "--size", "2032"], "--size must be 13..2031"),
        (["throughput", "--size", "12"], "--size"),
        (["throughput", "--pairs", "0"], "--pairs must be > 0"),
        (["handshake", "--concurrency", "-1"], "--concurrency"),
        (["idle", "--duration", "0"], "--duration must be > 0"),
        (["throughput", "--warmup", "-1"], "--warmup must be >= 0"),
        (["throughput", "--source-addresses", "0"], "--source-addresses"),
        (["throughput", "--plot", "out.svg"], "must end in .png"),
        (["idle", "--server-pid", "999999999"], "no such process"),
    ],
)
def test_bad_values_name_the_flag(argv: list[str], message: str) -> None:
    mode, *flags = argv
    with pytest.raises(UsageError, match=message):
        options(mode, *flags, "127.0.0.1", "33445", HEX)


def test_port_range() -> None:
    with pytest.raises(UsageError, match="PORT"):
        options("handshake", "127.0.0.1", "70000", HEX)


def test_worker_shares_and_seeds() -> None:
    assert split_evenly(10, 4) == [3, 3, 2, 2]
    opts = options("throughput", "127.0.0.1", "1", HEX, "-P", "5", "-K", "3", "--processes", "4")
    specs = worker_specs(opts)
    assert [s.units for s in specs] == [2, 1, 1, 1]
    assert all(s.concurrency >= 1 for s in specs)
    assert all(s.seed is None for s in specs)
    seeded = worker_specs(options("idle", "127.0.0.1", "1", HEX, "--processes", "3", "--seed", "9"))
    seeds = [s.seed for s in seeded]
    assert len(set(seeds)) == 3 and seeds == [process_seed(9, i) for i in range(3)]


def test_connections_spread_over_source_addresses() -> None:
    opts = options("handshake", "127.0.0.1", "1", HEX, "--source-addresses", "3")
    runner = HandshakeRunner(worker_specs(opts)[1])
    assert [runner.source_address(n) for n in range(4)] == [
        "127.0.0.2",
        "127.0.0.3",
        "127.0.0.1",
        "127.0.0.2",
    ]


def test_default_source_addresses_grow_with_connections_opening_at_once() -> None:
    """A burst of 10,000 (-K 10000) from 4 addresses is 2,500 half-open per
    address, which a relay's default max_unconfirmed_per_ip (256 per worker)
    refuses as a flood: the default spreads it over one address per 128."""
    burst = options("handshake", "127.0.0.1", "1", HEX, "-C", "10000", "-K", "10000")
    assert len(burst.source_addresses) == 79  # ceil(10000 / 128)
    assert burst.source_addresses[-1] == "127.0.0.79"
    small = options("handshake", "127.0.0.1", "1", HEX, "-K", "32")
    assert len(small.source_addresses) == 4
    pairs = options("throughput", "127.0.0.1", "1", HEX, "-P", "640", "-K", "1000")
    assert len(pairs.source_addresses) == 10  # both clients of 640 pairs
    chosen = options("handshake", "127.0.0.1", "1", HEX, "-K", "10000", "--source-addresses", "2")
    assert len(chosen.source_addresses) == 2
    huge = options("idle", "127.0.0.1", "1", HEX, "-N", "90000", "-K", "90000")
    assert len(huge.source_addresses) == 254  # 127.0.0.1 .. 127.0.0.254


def test_seeded_randomness_is_deterministic() -> None:
    assert Randomness(5).bytes(40) == Randomness(5).bytes(40)
    assert Randomness(5).secret_key() != Randomness(6).secret_key()
    assert Randomness(None).secret_key() != Randomness(None).secret_key()


def test_payload_header_round_trip() -> None:
    payload = original(2**32 + 7, 12.5, b"x" * 20)
    assert len(payload) == HEADER_SIZE + 20
    assert HEADER.unpack_from(payload) == (ORIGINAL, 7, 12.5)
    echo = echo_of(payload)
    assert HEADER.unpack_from(echo) == (ECHO, 7, 12.5) and echo[1:] == payload[1:]


def test_open_file_limit_is_checked() -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert ensure_open_files(10) == soft
    if hard == resource.RLIM_INFINITY:
        pytest.skip("no hard open-file limit here")
    with pytest.raises(LimitError, match=r"ulimit -Hn.*--processes"):
        ensure_open_files(hard + 1)
    too_many = options("idle", "127.0.0.1", "1", HEX, "-N", str(hard * 4), "--processes", "2")
    with pytest.raises(LimitError, match="open files"):
        check_limits(too_many)


def test_plot_without_matplotlib_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import raises ImportError
    with pytest.raises(PlotUnavailable, match=r"pip install -e '\.\[plot\]'"):
        require_matplotlib()
