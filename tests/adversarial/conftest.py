"""Fixtures of the attack tests: a real `--workers 2` cluster with chosen config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.relay_process import start_relay
from tests.cluster_process.support import Cluster

CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture
def attack_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    """Start `cluster start --shard-ports --workers N` with ``config`` (TOML text).

    Every cluster is stopped by PID afterwards; on failure its output is printed."""
    clusters: list[Cluster] = []

    def factory(config: str | None = None, workers: int = 2) -> Cluster:
        relay = start_relay(
            tmp_path / f"relay-{len(clusters)}",
            extra_args=["--shard-ports"],
            workers=workers,
            config=config,
        )
        cluster = Cluster(relay)
        clusters.append(cluster)
        assert len(cluster.shards()) == workers, relay.stdout_lines
        return cluster

    yield factory
    for cluster in clusters:
        cluster.stop()
    if request.node.stash.get(CALL_FAILED, False):
        for cluster in clusters:
            print("---- cluster stdout ----", *cluster.lines, sep="\n")
            print("---- cluster stderr ----\n" + cluster.relay.stderr_text())
