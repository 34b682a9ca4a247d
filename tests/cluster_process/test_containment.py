"""Issue 10 finding 2 with real processes: a worker whose relay table breaks
exits (status 70) and the supervisor replaces it, instead of running on
wedged while it heartbeats; the other worker's clients are not disturbed."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from nacl.bindings import crypto_scalarmult_base

from tests.cluster_process.support import Cluster, check_data, link, run
from worker.faults import EXIT_INVARIANT_BROKEN

# Loaded by every Python process of the cluster through PYTHONPATH: the one
# client key below makes the relay table of the worker it confirms on
# contradict itself (one connection counted twice), as a bug could.
SITECUSTOMIZE = """
import os

_key = os.environ.get("TOXRELAY_TEST_BREAKING_KEY")
if _key:
    import relaycore.relay as _relay

    _confirm = _relay.RelayServer._confirm

    def _breaking_confirm(self, connection, now):
        _confirm(self, connection, now)
        if connection.public_key == bytes.fromhex(_key):
            self.connection_count += 1

    _relay.RelayServer._confirm = _breaking_confirm
"""


def test_a_worker_whose_table_breaks_exits_and_is_replaced(
    make_cluster: Callable[..., Cluster], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    breaking_sk = bytes(range(7, 39))
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(inject), os.environ.get("PYTHONPATH", ""), *sys.path]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(p for p in paths if p))
    monkeypatch.setenv("TOXRELAY_TEST_BREAKING_KEY", crypto_scalarmult_base(breaking_sk).hex())
    cluster = make_cluster(2)

    async def body() -> None:
        first, second = cluster.shards()
        # An honest pair on the other worker, linked, before and after.
        a, b = await cluster.connect(second), await cluster.connect(second)
        id_a, id_b = await link(a, b)
        breaking = await cluster.connect(first, secret_key=breaking_sk)
        replaced = await cluster.wait_for_shard(first.worker, first.shard, timeout=10)
        assert replaced.pid != first.pid
        await breaking.closed  # its worker is gone
        stderr = cluster.relay.stderr_text()
        assert "relay table broken" in stderr
        assert f"exited with {EXIT_INVARIANT_BROKEN}" in stderr
        await check_data(a, id_a, b, id_b, b"still linked")
        # The new worker serves, and links across to the other one.
        c = await cluster.connect(replaced)
        d = await cluster.connect(second)
        id_c, id_d = await link(c, d)
        await check_data(c, id_c, d, id_d, b"across")
        for client in (a, b, c, d):
            await client.close()

    run(body(), timeout=40)
    assert cluster.relay.status()["totals"]["worker_restarts"] == 1
