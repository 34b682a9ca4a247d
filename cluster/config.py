"""Relay configuration: defaults, the TOML file, command-line overrides, and
validation that names the key and the problem before anything is bound.

Every key is documented in ``ops/cluster.example.toml``; keep the two in step
(a test checks that the example file loads and names every key).
"""

from __future__ import annotations

import ipaddress
import math
import os
import tomllib
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from relaycore.options import COMPAT_VERSIONS, RelayOptions


class ConfigError(Exception):
    """A configuration value is wrong; the message names the key."""


_CORE_DEFAULTS = RelayOptions()


@dataclass(frozen=True)
class RelayConfig:
    keys_file: Path = Path("relay.keys")
    host: str = "0.0.0.0"
    ports: tuple[int, ...] = (33445,)
    udp_port: int = 33445  # onion / forwarding (types 8-11) go out and come back here
    onion: bool = True
    workers: int = 0  # 0 = one per CPU
    log_level: str = "info"
    # The relay core's tunables; their defaults live in RelayOptions.
    handshake_timeout: float = _CORE_DEFAULTS.handshake_timeout
    close_on_peer_eof: bool = _CORE_DEFAULTS.close_on_peer_eof
    max_connections: int = _CORE_DEFAULTS.max_connections
    max_connections_per_ip: int = _CORE_DEFAULTS.max_connections_per_ip
    max_unconfirmed: int = _CORE_DEFAULTS.max_unconfirmed
    max_unconfirmed_per_ip: int = _CORE_DEFAULTS.max_unconfirmed_per_ip
    output_soft_limit: int = _CORE_DEFAULTS.output_soft_limit
    output_hard_limit: int = _CORE_DEFAULTS.output_hard_limit
    onion_rate_per_client: float = _CORE_DEFAULTS.onion_rate_per_client
    onion_burst_per_client: float = _CORE_DEFAULTS.onion_burst_per_client
    onion_rate_per_ip: float = _CORE_DEFAULTS.onion_rate_per_ip
    onion_burst_per_ip: float = _CORE_DEFAULTS.onion_burst_per_ip
    onion_rate_per_worker: float = _CORE_DEFAULTS.onion_rate_per_worker
    allow_private_next_hops: bool = _CORE_DEFAULTS.allow_private_next_hops
    oob_broadcast_rate_per_ip: float = _CORE_DEFAULTS.oob_broadcast_rate_per_ip
    oob_broadcast_burst_per_ip: float = _CORE_DEFAULTS.oob_broadcast_burst_per_ip
    oob_broadcast_rate_per_worker: float = _CORE_DEFAULTS.oob_broadcast_rate_per_worker
    compat: str = _CORE_DEFAULTS.compat
    motd: str = _CORE_DEFAULTS.motd
    info_version: int = _CORE_DEFAULTS.info_version
    info_rate_per_worker: float = _CORE_DEFAULTS.info_rate_per_worker
    listen_backlog: int = 4096
    min_open_files: int = 4096
    shard_ports: bool = False
    metrics: str = ""  # "ADDR:PORT" for the Prometheus endpoint; "" = off
    admin_socket: Path = Path("relay-admin.sock")
    log_format: str = "text"

    def relay_options(self) -> RelayOptions:
        """The RelayOptions fields this file configures (pings keep their defaults)."""
        return replace(_CORE_DEFAULTS, **{key: getattr(self, key) for key in _CORE_KEYS})


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


def _metrics_address(value: object) -> str:
    """ "" (off) or "ADDR:PORT" with an IP address; "[::1]:9477" for IPv6."""
    if value == "":
        return ""
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f'metrics: expected "ADDR:PORT" (e.g. "127.0.0.1:9477"), got {value!r}')
    host, _, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"metrics: {host!r} is not an IPv4 or IPv6 address") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"metrics: port {port!r} is not a number from 0 to 65535")
    return value


CONFIG_KEYS = tuple(f.name for f in fields(RelayConfig))
_CORE_KEYS = tuple(f.name for f in fields(RelayOptions) if f.name in CONFIG_KEYS)


def _type_name(value: object) -> str:
    return type(value).__name__


def _int(key: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key}: expected an integer, got {_type_name(value)} {value!r}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise ConfigError(f"{key}: {value} is out of range (must be {bound})")
    return value


def _number(key: str, value: object, minimum: float, unit: str = "seconds") -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key}: expected a number of {unit}, got {_type_name(value)} {value!r}")
    if not math.isfinite(value):  # nan compares false with everything: it would pass
        raise ConfigError(f"{key}: {value} is not a finite number")
    if value < minimum:
        raise ConfigError(f"{key}: {value} is out of range (must be >= {minimum})")
    return float(value)


def _bool(key: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {_type_name(value)} {value!r}")
    return value


def _validate(key: str, value: object) -> object:
    """The checked value of one key, or ConfigError naming the key."""
    match key:
        case "keys_file":
            if not isinstance(value, str | Path) or not str(value):
                raise ConfigError(f"keys_file: expected a path, got {value!r}")
            return Path(value)
        case "host":
            if not isinstance(value, str):
                raise ConfigError(f"host: expected an IP address string, got {value!r}")
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ConfigError(f"host: {value!r} is not an IPv4 or IPv6 address") from None
            return value
        case "ports":
            if isinstance(value, int) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, list | tuple) or not value:
                raise ConfigError(f"ports: expected a non-empty list of ports, got {value!r}")
            ports = tuple(_int("ports", port, 0, 65535) for port in value)
            if len(set(ports)) != len(ports) and 0 not in ports:
                raise ConfigError(f"ports: {list(ports)} lists a port twice")
            return ports
        case "workers":
            return _int(key, value, 0, 1024)
        case "udp_port":
            return _int(key, value, 0, 65535)
        case "onion":
            return _bool(key, value)
        case (
            "onion_rate_per_client" | "onion_rate_per_ip" | "onion_rate_per_worker"
            | "oob_broadcast_rate_per_ip" | "oob_broadcast_rate_per_worker" | "info_rate_per_worker"
        ):  # fmt: skip
            return _number(key, value, 0.0, "packets per second")
        case "onion_burst_per_client" | "onion_burst_per_ip" | "oob_broadcast_burst_per_ip":
            return _number(key, value, 1.0, "packets")
        case "allow_private_next_hops":
            return _bool(key, value)
        case "shard_ports":
            return _bool(key, value)
        case "metrics":
            return _metrics_address(value)
        case "admin_socket":
            if not isinstance(value, str | Path) or not str(value):
                raise ConfigError(f"admin_socket: expected a path, got {value!r}")
            return Path(value)
        case "log_format":
            if value not in LOG_FORMATS:
                raise ConfigError(f"log_format: {value!r} is not one of {', '.join(LOG_FORMATS)}")
            return value
        case "log_level":
            if value not in LOG_LEVELS:
                raise ConfigError(f"log_level: {value!r} is not one of {', '.join(LOG_LEVELS)}")
            return value
        case "handshake_timeout":
            return _number(key, value, 0.0)
        case "close_on_peer_eof":
            return _bool(key, value)
        case (
            "max_connections" | "max_connections_per_ip" | "max_unconfirmed"
            | "max_unconfirmed_per_ip"
        ):  # fmt: skip
            return _int(key, value, 0)
        case "output_soft_limit" | "output_hard_limit":
            return _int(key, value, 2048)
        case "listen_backlog":
            return _int(key, value, 1, 65535)
        case "min_open_files":
            return _int(key, value, 0)
        case "motd":
            if not isinstance(value, str):
                raise ConfigError(f"motd: expected a string, got {_type_name(value)} {value!r}")
            if "\x00" in value:
                raise ConfigError("motd: must not contain a NUL character")
            return value
        case "info_version":
            return _int(key, value, 0, 0xFFFFFFFF)
        case "compat":
            if value not in COMPAT_VERSIONS:
                raise ConfigError(
                    f"compat: {value!r} is not one of {', '.join(map(repr, COMPAT_VERSIONS))}"
                )
            return value
    raise ConfigError(f"{key}: unknown configuration key (known: {', '.join(CONFIG_KEYS)})")


def _check_consistency(config: RelayConfig) -> None:
    if config.output_hard_limit < config.output_soft_limit:
        raise ConfigError(
            f"output_hard_limit: {config.output_hard_limit} is below output_soft_limit "
            f"({config.output_soft_limit})"
        )


# Paths: one rule for both. A path in the configuration file is relative to
# that file's directory; a path given as a flag, to the working directory.
PATH_KEYS = ("keys_file", "admin_socket")
UNIX_SOCKET_PATH_MAX = 100  # sun_path is 108 bytes on Linux; keep a margin


def _check_paths(config: RelayConfig) -> None:
    if len(os.fsencode(os.path.abspath(config.admin_socket))) > UNIX_SOCKET_PATH_MAX:
        raise ConfigError(
            f"admin_socket: {str(config.admin_socket)!r} is too long for a unix socket path "
            f"(at most {UNIX_SOCKET_PATH_MAX} bytes once absolute)"
        )


def flag_name(key: str) -> str:
    """The command-line flag that sets ``key`` (for error messages)."""
    return {"ports": "--port", "keys_file": "--keys"}.get(key, "--" + key.replace("_", "-"))


def build_config(
    file_values: dict[str, Any],
    overrides: dict[str, Any],
    base_dir: Path,
    source: str | None = None,
) -> RelayConfig:
    """Defaults <- file values <- overrides (flags); every value checked.

    A bad file value is blamed on ``source`` (the file) and the key; a bad
    flag value on the flag."""
    values: dict[str, Any] = {}
    for key, value in file_values.items():
        try:
            values[key] = _validate(key, value)
        except ConfigError as error:
            raise ConfigError(f"{source}: {error}" if source else str(error)) from None
        if key in PATH_KEYS:
            values[key] = base_dir / values[key]  # relative to the configuration file
    for key, value in overrides.items():
        if value is None:
            continue
        try:
            values[key] = _validate(key, value)
        except ConfigError as error:
            problem = str(error).removeprefix(f"{key}: ")
            raise ConfigError(f"{flag_name(key)}: {problem}") from None
    config = replace(RelayConfig(), **values)
    try:
        _check_paths(config)
        _check_consistency(config)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}" if source else str(error)) from None
    return config


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as config_file:
            return tomllib.load(config_file)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such configuration file") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read: {error.strerror}") from None


def load_config(path: Path | None, overrides: dict[str, Any]) -> RelayConfig:
    if path is None:
        return build_config({}, overrides, Path(os.getcwd()))
    file_values = read_config_file(path)
    return build_config(file_values, overrides, path.resolve().parent, source=str(path))
