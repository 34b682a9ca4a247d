"""The ``cluster`` command: keygen, pubkey, start, status, loadtest, probe."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path

from cluster.config import ConfigError, RelayConfig, load_config
from cluster.keys import KeysFileError, create_keys, load_keys, load_or_create_keys
from cluster.loadtest.cli import add_parser as add_loadtest_parser
from cluster.probe import add_parser as add_probe_parser
from runtime.logs import configure_logging

DEFAULT_KEYS = RelayConfig().keys_file

log = logging.getLogger("cluster")


def _print(line: str) -> None:
    print(line, flush=True)


def _cmd_keygen(args: argparse.Namespace) -> int:
    identity = create_keys(args.keys)
    _print(identity.public_key_hex)
    return 0


def _cmd_pubkey(args: argparse.Namespace) -> int:
    _print(load_keys(args.keys).public_key_hex)
    return 0


def _cmd_start(args: argparse.Namespace) -> int:
    # Imported here so `cluster keygen` works without uvloop's and zmq's start-up cost.
    import uvloop

    from cluster.supervisor import StartupError, Supervisor
    from worker.process import raise_open_file_limit

    overrides = {
        "keys_file": args.keys,
        "host": args.host,
        "ports": args.port,
        "udp_port": args.udp_port,
        "workers": args.workers,
        "log_level": args.log_level,
        "shard_ports": True if args.shard_ports else None,
        "metrics": args.metrics,
        "log_format": args.log_format,
        "admin_socket": args.admin_socket,
    }
    config = load_config(args.config, overrides)
    configure_logging(config.log_level, config.log_format, "supervisor")
    identity, created = load_or_create_keys(config.keys_file)
    if created:
        log.info("created a new keys file %s (mode 0600)", config.keys_file)
    raise_open_file_limit(config.min_open_files)  # the workers inherit it
    log.info(
        "config: workers=%d handshake_timeout=%ss per worker: max_connections=%d per_ip=%d "
        "max_unconfirmed=%d",
        config.workers or (os.cpu_count() or 1),
        config.handshake_timeout,
        config.max_connections,
        config.max_connections_per_ip,
        config.max_unconfirmed,
    )

    async def supervise() -> int:
        return await Supervisor(config, identity, _print).run()

    try:
        code = uvloop.run(supervise())
    except StartupError as error:
        print(f"cluster: error: {error}", file=sys.stderr)
        return 1
    log.info("stopped")
    return code


def _cmd_status(args: argparse.Namespace) -> int:
    from cluster.admin import run_status

    config = load_config(args.config, {"admin_socket": args.admin_socket})
    return run_status(config.admin_socket, as_json=args.json, once=args.once)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cluster",
        description="A Tox TCP relay, byte-compatible with tox-bootstrapd's, "
        "built to use every core.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    keys_help = f"keys file: 64 bytes, public key || secret key (default: {DEFAULT_KEYS})"

    keys_commands = (
        (
            _cmd_keygen,
            "keygen",
            "create a keys file and print its public key",
            "Create a new relay identity (mode 0600) and print the public key as "
            "64 uppercase hex digits. Refuses to overwrite an existing file.",
        ),
        (
            _cmd_pubkey,
            "pubkey",
            "print the public key of an existing keys file",
            "Print the public key of a keys file (the one clients are given).",
        ),
    )
    for handler, name, help_text, description in keys_commands:
        command = _command(sub, handler, name, help=help_text, description=description)
        command.add_argument(
            "--keys", type=Path, default=DEFAULT_KEYS, metavar="PATH", help=keys_help
        )

    start = _command(
        sub,
        _cmd_start,
        "start",
        help="run the relay in the foreground",
        description="Run the relay in the foreground until SIGINT or SIGTERM. Creates the keys "
        "file when it is missing. Prints 'Public Key: ...', one 'Listening on ...' line per "
        "address and 'Relay ready' once connections are accepted. Flags override the "
        "configuration file.",
    )
    start.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML configuration file (see ops/cluster.example.toml)",
    )
    start.add_argument("--keys", type=Path, metavar="PATH", help=keys_help)
    start.add_argument(
        "--host", metavar="ADDR", help="address to listen on (default 0.0.0.0; '::' for dual-stack)"
    )
    start.add_argument(
        "--port",
        type=int,
        action="append",
        metavar="P",
        help="TCP port to listen on; repeat for several (default 33445; 443 and 3389 are "
        "common extras; 0 = any free port)",
    )
    start.add_argument(
        "--udp-port",
        type=int,
        metavar="P",
        help="UDP port for onion and forwarding traffic (types 8-11) to and from DHT "
        "nodes (default 33445; 0 = any free port)",
    )
    start.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="number of worker processes (relay shards); default: one per CPU",
    )
    start.add_argument(
        "--shard-ports",
        action="store_true",
        help="testing/diagnostics: each worker also listens on a private port of its own "
        "(printed as 'Shard N ... direct address'), to reach one shard on purpose",
    )
    start.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="log verbosity (default info)",
    )
    start.add_argument(
        "--metrics",
        metavar="ADDR:PORT",
        help="serve Prometheus metrics for the whole cluster there (off by default; "
        "e.g. 127.0.0.1:9477)",
    )
    start.add_argument("--log-format", choices=("text", "json"), help="log lines (default text)")
    start.add_argument(
        "--admin-socket",
        type=Path,
        metavar="PATH",
        help="unix socket (0600) that `cluster status` talks to (default relay-admin.sock)",
    )

    status = _command(
        sub,
        _cmd_status,
        "status",
        help="show the running cluster's workers and totals",
        description="Ask the running supervisor (over its admin socket) for a live table "
        "per worker: connections, frames/s in and out, CPU, RSS, restarts, event-loop lag, "
        "and cluster totals. Exits 1 when no cluster runs.",
    )
    status.add_argument(
        "--admin-socket",
        type=Path,
        metavar="PATH",
        help="default: from --config, else relay-admin.sock",
    )
    status.add_argument(
        "--config", type=Path, metavar="FILE", help="read admin_socket from this file"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object and exit")
    status.add_argument("--once", action="store_true", help="print the table once and exit")

    add_loadtest_parser(sub)
    add_probe_parser(sub)
    return parser


def _command(
    sub: argparse._SubParsersAction, handler: Callable, name: str, **texts: str
) -> argparse.ArgumentParser:
    """A subcommand ``name`` (``texts``: help, description) run by ``handler``."""
    command = sub.add_parser(name, **texts)
    command.set_defaults(handler=handler)
    return command


def main(argv: list[str] | None = None) -> int:
    configure_logging("info", "text", "cluster")
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, KeysFileError) as error:
        print(f"cluster: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"cluster: error: {error.strerror or error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
