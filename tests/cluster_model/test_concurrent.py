"""The cluster model without quiescence between client actions.

``test_model.py`` runs every step to quiescence, so only one client acts at a
time and the cluster can be compared with one server (invariant 1). Real
clients act concurrently: requests cross on the bus, a map update lags behind
a registration, a worker dies with messages in flight. Here the same rules
(inherited from ``ClusterModel``) act on the cluster alone, each followed by a
few deliveries only (their number and order drawn from ``schedule``); the
``settle`` rule sends a coordinator heartbeat, runs everything to quiescence,
lets the timers expire (unlink grace, a requester's wait for an answer) and
quiesces again. Two more faults only make sense here: ``stall`` (a live worker
dropped by the coordinator) and ``lose_update`` (a lost map update: gap,
snapshot, Clone resync); ``restart_coordinator`` strikes at any moment here.
Most bugs in test_regressions.py came from here.

There is no serial order to compare with, so no invariant 1. Checked:

* per packet, always (invariants 3, 4): data only on an id the client sees as
  linked, carrying its peer's identity; an 02 only for a requested id, a 03
  only for a linked one (ids the client has just given up excepted, as their
  03 may still be unread by a server that holds the client's frames);
* after ``settle`` (and at the end of every example) invariant 2 and the map
  (``simulation.link_problems``), and: every live client's view of its slots
  equals the server's table (it was told of every link made and ended:
  invariant 4 again), and no connection still waits for an answer.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import rule

from tests.cluster_model.simulation import ScheduleChooser, SimulatedCluster, link_problems
from tests.cluster_model.test_model import EXAMPLES, STEPS, ClusterModel, schedules, shards

#: Most deliveries after one client action (drawn per step from its schedule).
MAX_DELIVERIES_PER_STEP = 8


class ConcurrentClusterModel(ClusterModel):
    """The rules of ``ClusterModel``; steps do not quiesce; no reference."""

    settled = False

    def _new_worlds(self, n_shards: int) -> None:
        self.cluster = SimulatedCluster(n_shards)
        self.reference = self.cluster  # type: ignore[assignment]  # rules pick from its clients

    def _run(self, action, schedule: int, *, unordered: bool = False) -> None:
        cluster = self.cluster
        assert cluster is not None
        cluster.begin_step()
        action(cluster)
        chooser = random.Random(schedule)
        for _ in range(chooser.randrange(MAX_DELIVERIES_PER_STEP + 1)):
            if not cluster.deliver_one(chooser.randrange(1 << 16)):
                break
        self.settled = False

    @rule(shard=shards, schedule=schedules)
    def stall(self, shard: int, schedule: int) -> None:
        """The coordinator drops a live worker (silent 3 s: SIGSTOP, overload);
        it reads its own DROP_SHARD later, ends its side of its links and
        registers its clients again (docs/architecture.md, failure table)."""
        where = shard % self.n_shards
        self._run(lambda world: world.stall(where), schedule)

    @rule(shard=shards, schedule=schedules)
    def lose_update(self, shard: int, schedule: int) -> None:
        """A map update to one worker is lost (PUB/SUB past its high-water
        mark); the next update or heartbeat shows the gap, the worker fetches a
        snapshot and replaces its replica (Clone pattern, coordinator/client.py)."""
        where = shard % self.n_shards
        self._run(lambda world: world.lose_update(where), schedule)

    @rule(schedule=schedules)
    def restart_coordinator(self, schedule: int) -> None:
        """A new coordinator with an empty map, at any moment: replicas see a
        new incarnation, register again and merge (Clone pattern)."""
        self._run(lambda world: world.restart_coordinator(), schedule)

    @rule(schedule=schedules)
    def settle(self, schedule: int) -> None:
        """Heartbeat, quiesce, let every timer expire, quiesce again, one more
        timer round; check."""
        assert self.cluster is not None
        self.cluster.begin_step()
        self.cluster.heartbeat()
        self.cluster.quiesce(ScheduleChooser(schedule))
        self.cluster.tick(self.cluster.now + 3.0)
        self.cluster.quiesce(ScheduleChooser(schedule))
        # The next timer round (a second later at most): re-WANTs that the
        # 0.1 s pacing per key (REWANT_INTERVAL) held back go now.
        self.cluster.tick(self.cluster.now + 1.0)
        self.cluster.quiesce(ScheduleChooser(schedule))
        self.settled = True
        self._check_settled()

    def _check_settled(self) -> None:
        """Invariant 2, the map, and clients' views equal to the servers'."""
        cluster = self.cluster
        assert cluster is not None
        problems = link_problems(cluster)
        for record in cluster.clients:
            if not record.live:
                continue
            view = sorted(
                (i, v.peer, "linked" if v.linked else "requested") for i, v in record.slots.items()
            )
            table = cluster.slot_table(record.index)
            if view != table:
                problems.append(f"{record!r}: client's view {view}, server's slots {table}")
        for shard, server in sorted(cluster.servers.items()):
            if server.cluster._waiting:
                problems.append(f"shard {shard}: still waiting {server.cluster._waiting}")
        assert not problems, "\n".join(problems)

    def _check(self) -> None:
        self.clients_see_consistent_slots()

    # Invariant 1 has no meaning here; invariant 2 only after ``settle``.
    def equivalent_to_one_server(self) -> None:
        pass

    def links_symmetric(self) -> None:
        pass

    def teardown(self) -> None:
        """Every example ends settled and checked."""
        if self.cluster is not None and not self.settled:
            self.settle(0)
        super().teardown()


ConcurrentClusterModel.TestCase.settings = settings(
    max_examples=EXAMPLES,
    stateful_step_count=STEPS,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestConcurrentClusterModel = pytest.mark.timeout(1800)(ConcurrentClusterModel.TestCase)


class BatchedConcurrentClusterModel(ConcurrentClusterModel):
    """The same, with consecutive publications delivered together as the
    coordinator sends them when its pacing held them back: each replica
    applies them as one batch (``CrossShard.apply_map_updates``: one settle
    per batch, issue 13), a lost one among them as a gap."""

    def _new_worlds(self, n_shards: int) -> None:
        super()._new_worlds(n_shards)
        assert self.cluster is not None
        self.cluster.coalesce_updates = True


BatchedConcurrentClusterModel.TestCase.settings = ConcurrentClusterModel.TestCase.settings
TestBatchedConcurrentClusterModel = pytest.mark.timeout(1800)(
    BatchedConcurrentClusterModel.TestCase
)
