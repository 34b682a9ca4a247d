"""A private Tox DHT on loopback: a few ``tox-bootstrapd`` nodes without TCP relays.

Clients that have UDP off use DHT nodes only as onion path nodes 2 and 3 (the first
hop is their TCP relay, onion-over-tcp.md); the nodes also store the onion
announcements through which two clients find each other. Node *i* bootstraps off
nodes 0..i-1 (with their real UDP ports, which tox-bootstrapd may have moved), LAN
discovery and IPv6 are off, so nothing leaves 127.0.0.1. The DHT is ready when every
node has logged that it is connected to another node.

Public API:

* :class:`PrivateDht` - the running nodes (``nodes``: what clients bootstrap off); ``stop()``.
* :func:`start_private_dht` - start ``count`` nodes in ``workdir`` and wait until joined.
* :func:`private_dht` - pytest fixture (module scope) of a 3-node DHT; skips without
  ``tox-bootstrapd`` unless ``$CI`` is set.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.bootstrapd import (
    BOOTSTRAPD_PATH,
    DhtNode,
    ReferenceRelay,
    _in_ci,
    bootstrapd_available,
    start_bootstrapd,
)

DHT_SIZE = 3
JOIN_TIMEOUT_S = 20.0
_JOINED_LINE = "Connected to another bootstrap node successfully."


@dataclass
class PrivateDht:
    daemons: list[ReferenceRelay]

    @property
    def nodes(self) -> list[DhtNode]:
        return [daemon.dht_node for daemon in self.daemons]

    @property
    def pids(self) -> list[int]:
        return [daemon.pid for daemon in self.daemons]

    def all_running(self) -> bool:
        return all(daemon.running for daemon in self.daemons)

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()


def start_private_dht(
    workdir: Path,
    count: int = DHT_SIZE,
    join_timeout: float = JOIN_TIMEOUT_S,
    binary: str = BOOTSTRAPD_PATH,
) -> PrivateDht:
    """Start ``count`` DHT nodes (``binary``: Debian's 0.2.18 daemon by default) in
    ``workdir/node-<i>`` and wait until each has joined (raises ``RuntimeError`` with
    the logs otherwise; nothing is left running)."""
    dht = PrivateDht([])
    try:
        for index in range(count):
            dht.daemons.append(
                start_bootstrapd(
                    Path(workdir) / f"node-{index}",
                    tcp_relay=False,
                    bootstrap_nodes=dht.nodes,
                    binary=binary,
                )
            )
        deadline = time.monotonic() + join_timeout
        while not all(_JOINED_LINE in daemon.stdout_text() for daemon in dht.daemons):
            if time.monotonic() > deadline or not dht.all_running():
                logs = "\n".join(
                    f"--- {d.workdir.name} (running={d.running})\n"
                    f"{d.stdout_text()}{d.stderr_text()}"
                    for d in dht.daemons
                )
                raise RuntimeError(f"private DHT did not join within {join_timeout} s:\n{logs}")
            time.sleep(0.05)
    except BaseException:
        dht.stop()
        raise
    return dht


@pytest.fixture(scope="module")
def private_dht(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateDht]:
    """A joined 3-node private DHT shared by the tests of one module."""
    if not bootstrapd_available():
        reason = f"{BOOTSTRAPD_PATH} not installed (apt-get install toxcore-utils)"
        if _in_ci():
            pytest.fail(f"{reason}; required when CI is set")
        pytest.skip(reason)
    dht = start_private_dht(tmp_path_factory.mktemp("private-dht"))
    try:
        yield dht
    finally:
        dht.stop()
