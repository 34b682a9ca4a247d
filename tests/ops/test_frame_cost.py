"""ops/bench/frame_cost.py: both layouts relay every frame they time."""

from __future__ import annotations

import pytest

from ops.bench.frame_cost import measure


@pytest.mark.parametrize("cross", [False, True], ids=["same shard", "cross shard"])
def test_measure_relays_every_frame(cross: bool) -> None:
    # measure() exits when the receiving shard did not relay all 512 frames.
    per_frame = measure(512, 64, cross)
    assert 0 < per_frame < 0.01
