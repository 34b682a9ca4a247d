"""The relays a toxcore end-to-end scenario can run against, started by name.

Used by ``tests/interop/test_friends_end_to_end.py`` and ``ops/bench/friends_compare.py``:

* ``bootstrapd`` -- Debian's tox-bootstrapd 0.2.18 with its TCP relay on and no
  bootstrap nodes (not part of any DHT; its UDP port still sends and receives the
  onion packets of its TCP clients).
* ``bootstrapd-0.2.23`` -- tox-bootstrapd 0.2.23 built from ``../shared/vendor``
  (``tests/support/toxcore0223.py``), the newest reference, configured alike.
* ``bootstrapd-2ports`` -- Debian's daemon listening on two TCP ports, client A on the first,
  B on the second: one relay key at two addresses, as ``ours-2w-cross`` presents it.
* ``ours-1w`` -- ``cluster start --workers 1``.
* ``ours-2w`` -- ``--workers 2``, both clients on the shared port (the kernel picks
  their shards).
* ``ours-2w-cross`` -- ``--workers 2 --shard-ports``: client A on one shard's direct
  port, client B on the other's, so their traffic has to cross shards.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from testbed.bootstrapd import BOOTSTRAPD_PATH, start_bootstrapd
from testbed.friends import RelayEndpoint
from testbed.relay_process import RelayProcess, start_relay
from testbed.toxcore0223 import toxcore_0223, toxcore_0223_error

RELAY_KINDS = (
    "bootstrapd",
    "bootstrapd-0.2.23",
    "bootstrapd-2ports",
    "ours-1w",
    "ours-2w",
    "ours-2w-cross",
)

_SHARD_RE = re.compile(
    r"^Shard (?P<shard>\d+) \(worker (?P<worker>\d+)\) pid \d+ "
    r"direct address [^:]+:(?P<port>\d+)$"
)


@dataclass
class RelayUnderTest:
    """A started relay and the endpoint each client uses."""

    name: str
    endpoint_a: RelayEndpoint
    endpoint_b: RelayEndpoint
    pid: int
    running: Callable[[], bool]
    logs: Callable[[], str]
    stop: Callable[[], object]
    shard_ports: dict[int, int] = field(default_factory=dict)
    # Ours only: `cluster status --json` totals (what the relay itself counted).
    status_totals: Callable[[], dict] | None = None


def start_relay_under_test(kind: str, workdir: Path) -> RelayUnderTest:
    """Start one of :data:`RELAY_KINDS` in ``workdir`` (random key, loopback)."""
    if kind not in RELAY_KINDS:
        raise ValueError(f"unknown relay kind {kind!r}; one of {RELAY_KINDS}")
    if kind.startswith("bootstrapd"):
        binary = BOOTSTRAPD_PATH
        if kind == "bootstrapd-0.2.23":
            built = toxcore_0223()
            if built is None:
                raise RuntimeError(toxcore_0223_error())
            binary = built.bootstrapd
        daemon = start_bootstrapd(
            workdir / kind, tcp_ports=2 if kind == "bootstrapd-2ports" else 1, binary=binary
        )
        port_a, port_b = daemon.ports[0], daemon.ports[-1]
        return RelayUnderTest(
            kind,
            RelayEndpoint(daemon.host, port_a, daemon.public_key),
            RelayEndpoint(daemon.host, port_b, daemon.public_key),
            pid=daemon.pid,
            running=lambda: daemon.running,
            logs=lambda: daemon.stdout_text() + daemon.stderr_text(),
            stop=daemon.stop,
        )
    workers = 1 if kind == "ours-1w" else 2
    cross = kind == "ours-2w-cross"
    relay = start_relay(
        workdir / kind,
        secret_key=os.urandom(32),
        workers=workers,
        extra_args=["--shard-ports"] if cross else [],
        allow_private_next_hops=True,  # toxcore's DHT nodes here are on loopback
    )
    shared = RelayEndpoint(relay.host, relay.port, relay.public_key)
    shard_ports = _shard_ports(relay) if cross else {}
    endpoint_a = endpoint_b = shared
    if cross:
        if len(shard_ports) != 2:
            relay.stop()
            raise RuntimeError(f"expected 2 'direct address' lines: {relay.stdout_lines!r}")
        port_a, port_b = (shard_ports[shard] for shard in sorted(shard_ports))
        endpoint_a = RelayEndpoint(relay.host, port_a, relay.public_key)
        endpoint_b = RelayEndpoint(relay.host, port_b, relay.public_key)
    return RelayUnderTest(
        kind,
        endpoint_a,
        endpoint_b,
        pid=relay.pid,
        running=lambda: relay.running,
        logs=lambda: "\n".join(relay.stdout_lines) + "\n" + relay.stderr_text(),
        stop=relay.stop,
        shard_ports=shard_ports,
        status_totals=lambda: _status_totals(relay),
    )


def _status_totals(relay: RelayProcess) -> dict:
    return relay.status()["totals"]


def _shard_ports(relay: RelayProcess) -> dict[int, int]:
    """Shard id -> its direct port, from the `--shard-ports` lines of stdout."""
    ports = {}
    for line in relay.stdout_lines:
        match = _SHARD_RE.match(line)
        if match:
            ports[int(match["shard"])] = int(match["port"])
    return ports
