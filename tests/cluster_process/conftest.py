"""Fixtures of the real-process cluster tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster_process.support import Cluster, start_cluster

CALL_FAILED = pytest.StashKey[bool]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture
def make_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    """Start `cluster start --shard-ports --workers N`; every one is stopped (by PID) after.

    When the test failed, the clusters' stdout and stderr are printed (pytest
    shows them with the failure)."""
    clusters: list[Cluster] = []

    def factory(workers: int = 2, allow_private_next_hops: bool = False) -> Cluster:
        cluster = start_cluster(
            tmp_path / f"relay-{len(clusters)}", workers, allow_private_next_hops
        )
        clusters.append(cluster)
        return cluster

    yield factory
    for cluster in clusters:
        cluster.stop()
    if request.node.stash.get(CALL_FAILED, False):
        for cluster in clusters:
            print("---- cluster stdout ----", *cluster.lines, sep="\n")
            print("---- cluster stderr ----\n" + cluster.relay.stderr_text())
