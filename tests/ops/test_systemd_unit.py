"""The operator files: the systemd unit, the sysctl advice, docs/operations.md.

`systemd-analyze verify` checks the unit the way systemd would load it. It
refuses a unit whose ExecStart binary is missing, so it runs on a copy whose
ExecStart/ExecReload point at executables that exist here; everything else is
verified as shipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "ops" / "systemd" / "tox-relay.service"
SYSCTL = ROOT / "ops" / "sysctl" / "99-tox-relay.conf"
OPERATIONS = ROOT / "docs" / "operations.md"

EXEC_START = "/usr/local/bin/cluster start --config /etc/tox-relay/cluster.toml"
EXEC_RELOAD = "/bin/kill -HUP $MAINPID"

# The metrics table of the metrics specification (toxrelay_ names, all of them).
SPEC_METRICS = (
    "toxrelay_connections",
    "toxrelay_accepted_connections_total",
    "toxrelay_refused_connections_total",
    "toxrelay_handshakes_total",
    "toxrelay_closed_connections_total",
    "toxrelay_packets_received_total",
    "toxrelay_relayed_packets_total",
    "toxrelay_relayed_bytes_total",
    "toxrelay_links_total",
    "toxrelay_dropped_packets_total",
    "toxrelay_bus_messages_total",
    "toxrelay_bus_dropped_messages_total",
    "toxrelay_map_entries",
    "toxrelay_map_resyncs_total",
    "toxrelay_worker_restarts_total",
    "toxrelay_coordinator_restarts_total",
    "toxrelay_workers",
    "toxrelay_event_loop_lag_seconds",
    "toxrelay_worker_resident_memory_bytes",
    "toxrelay_worker_cpu_seconds_total",
)

# Lines of `systemd-analyze verify` that mean the unit has a bad setting.
_BAD_SETTING = re.compile(
    r"unknown (key|lvalue|section)|failed to parse|invalid|ignoring|not executable"
    r"|bad (setting|unit)|unsupported|deprecated",
    re.IGNORECASE,
)


def _service_settings(text: str) -> dict[str, list[str]]:
    """`key=value` lines of the [Service] section; a key may repeat."""
    settings: dict[str, list[str]] = {}
    section = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def _systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        message = "systemd-analyze is not installed (apt-get install systemd)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def _cluster_command() -> str:
    """An existing `cluster` executable: the console script of this Python's
    environment, one on PATH, or this interpreter running the module."""
    beside = Path(sys.executable).with_name("cluster")
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    on_path = shutil.which("cluster")
    if on_path is not None:
        return on_path
    return f"{sys.executable} -m cluster.cli"


def _verifiable_copy(directory: Path, extra: str = "") -> Path:
    """The unit with ExecStart/ExecReload pointing at executables that exist."""
    text = UNIT.read_text()
    assert f"\nExecStart={EXEC_START}\n" in text
    assert f"\nExecReload={EXEC_RELOAD}\n" in text
    text = text.replace(
        f"ExecStart={EXEC_START}",
        f"ExecStart={_cluster_command()} start --config /etc/tox-relay/cluster.toml",
    )
    kill = "/bin/kill" if os.access("/bin/kill", os.X_OK) else shutil.which("kill")
    if kill is None:
        pytest.skip("no kill executable to stand in for /bin/kill")
    text = text.replace(f"ExecReload={EXEC_RELOAD}", f"ExecReload={kill} -HUP $MAINPID")
    if extra:
        text = text.replace("[Service]\n", f"[Service]\n{extra}\n", 1)
    copy = directory / UNIT.name
    copy.write_text(text)
    copy.chmod(0o644)  # verify warns about executable unit files
    return copy


def _verify(unit: Path) -> tuple[int, list[str]]:
    result = subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = (result.stdout + result.stderr).splitlines()
    return result.returncode, [line for line in lines if line.strip()]


def _problems(lines: list[str]) -> list[str]:
    """Lines about the unit itself, or naming a bad setting anywhere."""
    return [line for line in lines if UNIT.name in line or _BAD_SETTING.search(line)]


def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    code, lines = _verify(_verifiable_copy(tmp_path))
    print("\n".join(lines) or "(systemd-analyze verify printed nothing)")
    assert code == 0, lines
    assert _problems(lines) == []


def test_the_verify_check_notices_a_bad_setting(tmp_path: Path) -> None:
    """verify exits 0 on unknown keys; the output check must catch them."""
    code, lines = _verify(_verifiable_copy(tmp_path, "NoSuchSetting=1\nProtectSystem=bogus"))
    problems = _problems(lines)
    assert any("NoSuchSetting" in line for line in problems), (code, lines)
    assert any("bogus" in line for line in problems), (code, lines)


def test_unit_runs_the_documented_service() -> None:
    settings = _service_settings(UNIT.read_text())
    expected = {
        "ExecStart": EXEC_START,
        "ExecReload": EXEC_RELOAD,
        "User": "tox-relay",
        "StateDirectory": "tox-relay",
        "RuntimeDirectory": "tox-relay",
        "Restart": "on-failure",
        "KillMode": "mixed",
        "TimeoutStopSec": "10",
        "LimitNOFILE": "1048576",
        "AmbientCapabilities": "CAP_NET_BIND_SERVICE",
        "CapabilityBoundingSet": "CAP_NET_BIND_SERVICE",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "SystemCallFilter": "@system-service",
        "UMask": "0077",
    }
    for key, value in expected.items():
        assert settings.get(key) == [value], key
    assert "DynamicUser" not in settings  # the keys file must keep its owner
    assert "RestartSec" in settings
    families = settings["RestrictAddressFamilies"][0].split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_UNIX"]  # AF_UNIX: ipc://, admin


def test_sysctl_file_is_key_equals_value_lines() -> None:
    active = {}
    for number, raw in enumerate(SYSCTL.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        match = re.fullmatch(r"([a-z0-9_]+(?:\.[a-z0-9_\-]+)+) = (\S(?:.*\S)?)", line)
        assert match, f"{SYSCTL.name}:{number}: not `key = value`: {raw!r}"
        key, value = match.groups()
        assert key not in active, f"{SYSCTL.name}:{number}: {key} set twice"
        active[key] = value
    assert active == {
        "net.core.somaxconn": "4096",
        "net.ipv4.tcp_max_syn_backlog": "8192",
        "net.ipv4.tcp_migrate_req": "1",
    }
    text = SYSCTL.read_text()
    for advice in ("fs.file-max", "fs.nr_open", "net.ipv4.ip_local_port_range"):
        assert advice in text  # explained, left commented out


def test_sysctl_keys_exist_on_this_kernel() -> None:
    """Catches typos; a key this kernel lacks is reported only if it is not
    the one known to be newer (tcp_migrate_req, Linux >= 5.14)."""
    if not Path("/proc/sys/net/core").is_dir():
        pytest.skip("no /proc/sys/net here")
    for raw in SYSCTL.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key = line.partition("=")[0].strip()
        proc = Path("/proc/sys", *key.split("."))
        if key == "net.ipv4.tcp_migrate_req" and not proc.exists():
            continue  # an older kernel; the file says to delete the line there
        assert proc.exists(), key


def test_operations_guide_documents_every_metric() -> None:
    text = OPERATIONS.read_text()
    missing = [name for name in SPEC_METRICS if f"`{name}`" not in text]
    assert missing == []


def _slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def test_operations_guide_links_resolve() -> None:
    text = OPERATIONS.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    assert targets
    for target in targets:
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (OPERATIONS.parent / path).resolve() if path else OPERATIONS
        assert file.is_file(), target
        if anchor:
            headings = re.findall(r"^#+ (.+)$", file.read_text(), re.MULTILINE)
            assert anchor in {_slug(h) for h in headings}, target
