"""Fixtures of the attack tests: a real `--workers 2` cluster with chosen config."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster_process.support import Cluster, ClusterSet
from tests.support.outcome import CALL_FAILED


@pytest.fixture
def attack_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    """Start `cluster start --shard-ports --workers N` with ``config`` (TOML text).

    Every cluster is stopped by PID afterwards; on failure its output is printed."""
    clusters = ClusterSet(tmp_path)

    def start(config: str | None = None, workers: int = 2) -> Cluster:
        return clusters.start(workers, config=config)

    yield start
    clusters.stop_all(request.node.stash.get(CALL_FAILED, False))
