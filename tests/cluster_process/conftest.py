"""Fixtures of the real-process cluster tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.cluster_process.support import Cluster, ClusterSet
from tests.support.outcome import CALL_FAILED


@pytest.fixture
def make_cluster(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., Cluster]]:
    """Start `cluster start --shard-ports --workers N`; every one is stopped (by PID) after.

    When the test failed, the clusters' stdout and stderr are printed."""
    clusters = ClusterSet(tmp_path)
    yield clusters.start
    clusters.stop_all(request.node.stash.get(CALL_FAILED, False))
