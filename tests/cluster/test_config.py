"""Configuration: the example file documents every key; a bad value names the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cluster.config import CONFIG_KEYS, PATH_KEYS, ConfigError, RelayConfig, load_config

EXAMPLE = Path(__file__).resolve().parents[2] / "ops" / "cluster.example.toml"


def test_example_file_loads_with_the_defaults() -> None:
    config = load_config(EXAMPLE, {})
    defaults = RelayConfig()
    for key in CONFIG_KEYS:
        if key in PATH_KEYS:  # relative to the file
            assert getattr(config, key) == EXAMPLE.parent / getattr(defaults, key), key
        else:
            assert getattr(config, key) == getattr(defaults, key), key


def test_example_file_documents_every_key() -> None:
    text = EXAMPLE.read_text()
    for key in CONFIG_KEYS:
        assert re.search(rf"^{key} = ", text, re.MULTILINE), f"{key} missing from the example"
        # a comment right above the key explains it
        block = text.split(f"\n{key} = ")[0].rstrip().splitlines()
        assert block[-1].startswith("#"), f"{key} has no comment"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('handshake_timeout = "ten"', "handshake_timeout: expected a number"),
        ("handshake_timeout = -1", "handshake_timeout: -1 is out of range"),
        # issue 10 finding 9: nan compares false with every bound, so it passed
        # (and disabled the timeout); inf never fires either.
        ("handshake_timeout = nan", "handshake_timeout: nan is not a finite number"),
        ("handshake_timeout = inf", "handshake_timeout: inf is not a finite number"),
        ("onion_rate_per_client = -inf", "onion_rate_per_client: -inf is not a finite number"),
        ("onion_rate_per_worker = nan", "onion_rate_per_worker: nan is not a finite number"),
        ("onion_burst_per_client = inf", "onion_burst_per_client: inf is not a finite number"),
        ("ports = [70000]", "ports: 70000 is out of range"),
        ("ports = []", "ports: expected a non-empty list"),
        ("ports = [33445, 33445]", "lists a port twice"),
        ('host = "example.org"', "host: 'example.org' is not an IPv4 or IPv6 address"),
        ("workers = -1", "workers: -1 is out of range"),
        ('shard_ports = "on"', "shard_ports: expected true or false"),
        ("max_connections_per_ip = true", "max_connections_per_ip: expected an integer"),
        ('close_on_peer_eof = "yes"', "close_on_peer_eof: expected true or false"),
        ('log_level = "loud"', "log_level: 'loud' is not one of"),
        ("output_soft_limit = 100", "output_soft_limit: 100 is out of range"),
        ("output_hard_limit = 4096", "output_hard_limit: 4096 is below output_soft_limit"),
        ("max_conections = 3", "max_conections: unknown configuration key"),
        ('compat = "0.2.20"', "compat: '0.2.20' is not one of '0.2.23', '0.2.18'"),
        ("compat = 0.218", "compat: 0.218 is not one of"),
        ("motd = 5", "motd: expected a string"),
        ('motd = "a\\u0000b"', "motd: must not contain a NUL"),
        ("info_version = 4294967296", "info_version: 4294967296 is out of range"),
        ("info_rate_per_worker = -1", "info_rate_per_worker: -1 is out of range"),
    ],
)
def test_bad_value_names_the_key(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path, line + "\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {})
    assert str(raised.value).startswith(f"{path}: ")
    assert message in str(raised.value)


def test_invalid_toml_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "ports = [\n"), {})


def test_missing_file_is_reported(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.toml", {})


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'host = "127.0.0.1"\nports = [1, 2]\nkeys_file = "a.keys"\n')
    config = load_config(path, {"ports": [5], "keys_file": Path("/x/b.keys"), "host": None})
    assert config.ports == (5,)
    assert config.host == "127.0.0.1"
    assert config.keys_file == Path("/x/b.keys")


def test_bad_flag_value_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^--port: 99999 is out of range"):
        load_config(None, {"ports": [99999]})


def test_bad_flag_value_is_blamed_on_the_flag_not_the_file(tmp_path: Path) -> None:
    """Issue 14 point 5: `--workers -1 --config c.toml` said `c.toml: workers: ...`."""
    path = write(tmp_path, "workers = 2\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, {"workers": -1})
    assert str(raised.value) == "--workers: -1 is out of range (must be between 0 and 1024)"
    with pytest.raises(ConfigError, match=r"^--udp-port: 70000 is out of range"):
        load_config(path, {"udp_port": 70000})


def test_paths_in_the_file_resolve_against_the_file_flags_against_the_cwd(
    tmp_path: Path,
) -> None:
    """Issue 14 point 5: one rule for keys_file and admin_socket."""
    path = write(tmp_path, 'keys_file = "id.keys"\nadmin_socket = "admin.sock"\n')
    config = load_config(path, {})
    assert config.keys_file == tmp_path / "id.keys"
    assert config.admin_socket == tmp_path / "admin.sock"
    flagged = load_config(path, {"keys_file": Path("k"), "admin_socket": Path("s")})
    assert flagged.keys_file == Path("k") and flagged.admin_socket == Path("s")


def test_too_long_admin_socket_path_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path, f'admin_socket = "{"a" * 120}.sock"\n')
    with pytest.raises(ConfigError, match=r"admin_socket: .* too long for a unix socket path"):
        load_config(path, {})


def test_relay_options_carry_the_limits(tmp_path: Path) -> None:
    path = write(tmp_path, "max_connections_per_ip = 7\nhandshake_timeout = 2.5\n")
    options = load_config(path, {}).relay_options()
    assert options.max_connections_per_ip == 7
    assert options.handshake_timeout == 2.5


def test_compat_reaches_the_relay_options(tmp_path: Path) -> None:
    """Default: the newest reference (R-ORET-2a); "0.2.18" for Debian's daemon."""
    assert load_config(None, {}).relay_options().compat == "0.2.23"
    options = load_config(write(tmp_path, 'compat = "0.2.18"\n'), {}).relay_options()
    assert options.compat == "0.2.18"
