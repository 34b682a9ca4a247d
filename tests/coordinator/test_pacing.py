"""coordinator.pacing.Pacer with a fake clock: a burst at once, then paced."""

from __future__ import annotations

import pytest

from coordinator.pacing import Pacer


def test_a_burst_leaves_at_once_then_one_per_interval() -> None:
    pacer = Pacer(interval=0.005, burst=3)
    now = 100.0
    for _ in range(3):
        assert pacer.wait(now) == 0.0
        pacer.sent(now)
    assert pacer.wait(now) == pytest.approx(0.005)
    assert pacer.wait(now + 0.002) == pytest.approx(0.003)
    now += 0.005
    assert pacer.wait(now) == 0.0
    pacer.sent(now)
    assert pacer.wait(now) == pytest.approx(0.005)


def test_a_quiet_spell_refills_the_burst_but_not_beyond() -> None:
    pacer = Pacer(interval=0.005, burst=2)
    for _ in range(2):
        pacer.sent(0.0)
    now = 10.0  # long quiet: two at once again, not two thousand
    for _ in range(2):
        assert pacer.wait(now) == 0.0
        pacer.sent(now)
    assert pacer.wait(now) > 0


def test_forced_sends_never_owe_more_than_one_interval() -> None:
    """Heartbeats and snapshots flush without asking: the next wait stays bounded."""
    pacer = Pacer(interval=0.005, burst=2)
    for _ in range(50):
        pacer.sent(1.0)
    assert pacer.wait(1.0) == pytest.approx(0.005)


def test_a_clock_that_steps_back_changes_nothing() -> None:
    pacer = Pacer(interval=0.005, burst=1)
    pacer.sent(5.0)
    assert pacer.wait(4.0) == pytest.approx(0.005)
    assert pacer.wait(5.005) == 0.0


@pytest.mark.parametrize(("interval", "burst"), [(0.0, 1), (-1.0, 1), (0.005, 0)])
def test_nonsense_settings_are_refused(interval: float, burst: int) -> None:
    with pytest.raises(ValueError):
        Pacer(interval, burst)
