"""The README's quick start works as written (issue 14, point 4).

Its test command runs as root without sudo and as a user with sudo: the
install step, ``ops/install-test-deps``, is run here with a PATH of fake
``id``, ``dpkg``, ``apt-get`` and ``sudo`` that record what they were asked,
so every branch of its privilege handling is exercised without installing
anything. ``.ci/run`` runs the same steps; the command list names every
subcommand and the flags the issue found missing; the sample start output
matches what `cluster start` prints.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from testbed.relay_process import start_relay

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"
INSTALL = ROOT / "ops" / "install-test-deps"

# What ops/install-test-deps installs: the oracles, real clients, and the tools
# that build c-toxcore 0.2.23 from ../shared/vendor.
TEST_PACKAGES = (
    "toxcore-utils libtoxcore-dev cmake ninja-build pkg-config libsodium-dev libconfig-dev"
)


def quick_start_commands() -> dict[str, str]:
    """The numbered commands of the Quick start block ("1", "2")."""
    block = README.read_text().split("## Quick start", 1)[1].split("```sh\n", 1)[1]
    block = block.split("```", 1)[0]
    commands, number = {}, None
    for line in block.splitlines():
        match = re.match(r"# (\d)\. ", line)
        if match:
            number = match[1]
        elif line.strip() and number is not None:
            commands[number] = line.strip()
    return commands


def fake_path(tmp_path: Path, uid: int, installed: bool, with_sudo: bool) -> tuple[str, Path]:
    """A PATH with only the tools the script may call, each faked; the log file."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    fakes = {
        "id": f'[ "$1" = -u ] && echo {uid}',
        "dpkg": f"exit {0 if installed else 1}",
        "python3": "exit 0",  # python3 -m venv works: python3-venv not needed
        "apt-get": f'echo "apt-get $* DEBIAN_FRONTEND=$DEBIAN_FRONTEND" >> {log}',
    }
    if with_sudo:
        fakes["sudo"] = f'echo "sudo" >> {log}; exec "$@"'
    for name, body in fakes.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    os.symlink(shutil.which("env") or "/usr/bin/env", bin_dir / "env")
    return str(bin_dir), log


def run_install(tmp_path: Path, uid: int, installed: bool = False, with_sudo: bool = False):
    path, log = fake_path(tmp_path, uid, installed, with_sudo)
    result = subprocess.run(
        ["/bin/sh", str(INSTALL)], env={"PATH": path}, capture_output=True, text=True, timeout=30
    )
    calls = log.read_text().splitlines() if log.exists() else []
    return result, calls


def test_readme_test_command_starts_with_the_install_script_and_no_sudo() -> None:
    commands = quick_start_commands()
    assert set(commands) == {"1", "2"}
    assert "sudo" not in commands["1"] + commands["2"]
    steps = [step.strip() for step in commands["2"].split("&&")]
    assert steps[0] == "ops/install-test-deps"
    assert steps[-1] == "python3 -m pytest"
    assert os.access(INSTALL, os.X_OK)


def test_install_as_root_without_sudo(tmp_path: Path) -> None:
    """The issue's failure: `sudo` does not exist on a root-only machine (exit 127)."""
    result, calls = run_install(tmp_path, uid=0)
    assert result.returncode == 0, result.stderr
    assert calls == [
        "apt-get update -qq DEBIAN_FRONTEND=noninteractive",
        f"apt-get install -y -qq {TEST_PACKAGES} DEBIAN_FRONTEND=noninteractive",
    ]


def test_install_as_a_user_uses_sudo(tmp_path: Path) -> None:
    result, calls = run_install(tmp_path, uid=1000, with_sudo=True)
    assert result.returncode == 0, result.stderr
    assert calls == [
        "sudo",
        "apt-get update -qq DEBIAN_FRONTEND=noninteractive",
        "sudo",
        f"apt-get install -y -qq {TEST_PACKAGES} DEBIAN_FRONTEND=noninteractive",
    ]
    assert "(with sudo)" in result.stdout


def test_install_as_a_user_without_sudo_says_what_to_do(tmp_path: Path) -> None:
    result, calls = run_install(tmp_path, uid=1000)
    assert result.returncode == 1 and calls == []
    assert "run this as root, or install sudo" in result.stderr


def test_nothing_to_install_needs_no_privileges(tmp_path: Path) -> None:
    result, calls = run_install(tmp_path, uid=1000, installed=True)
    assert result.returncode == 0 and calls == []
    assert "already installed" in result.stdout


def test_ci_runs_the_readme_test_command() -> None:
    lines = [
        line.split("#", 1)[0].strip()
        for line in CI_RUN.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    steps = [step.strip() for step in quick_start_commands()["2"].split("&&")]
    assert "ops/install-test-deps" in lines
    assert lines[-1] == steps[-1] == "python3 -m pytest"
    pip = next(line for line in lines if "pip install" in line)
    assert "-e '.[test]'" in pip and "pip install -e '.[test]'" in steps


@pytest.mark.parametrize(
    "text",
    ["--udp-port", "--log-level", "--shard-ports", "cluster loadtest", "cluster probe"],
)
def test_command_list_names_it(text: str) -> None:
    commands = README.read_text().split("## Commands", 1)[1].split("```", 2)[1]
    assert text in commands


def test_sample_start_output_is_what_cluster_start_prints(tmp_path: Path) -> None:
    readme = README.read_text()
    sample = readme.split("`cluster start` prints", 1)[1].split("```\n", 1)[1].split("```")[0]
    relay = start_relay(tmp_path / "relay", workers=1)
    try:
        printed = list(relay.stdout_lines)
    finally:
        relay.stop()

    def shape(line: str) -> str:  # addresses, ports, keys and counts vary
        return re.sub(r"[0-9A-F]{64}|\d+", "N", line)

    assert [shape(line) for line in sample.splitlines()] == [shape(line) for line in printed]
    assert any(line.startswith("Onion and forwarding over UDP on") for line in printed)
    assert shlex.split(quick_start_commands()["1"])[-2:] == ["cluster", "start"]
