"""How often the coordinator traffic may go out: a token bucket, sans-IO.

Used on both ends of the routing-map protocol (a worker's REGISTER /
UNREGISTER messages, the coordinator's "u" publications). A few messages in a
row leave at once, as they did before batching, so a quiet cluster sees no
added delay (and the tests and the differential scenarios see the same
timing); under a sustained rate, such as a reconnect storm or `cluster
loadtest handshake`, at most one message per ``interval`` leaves and the rest
waits and goes together (issue 5: a ZeroMQ send per connection was a fifth of
a worker's time). Time is a parameter (``now``, any monotonic clock).
"""

from __future__ import annotations

_ROUNDING = 1e-9  # of a token: float sums of (now - then) / interval


class Pacer:
    """Up to ``burst`` messages at once, then one per ``interval`` seconds."""

    __slots__ = ("interval", "burst", "_tokens", "_updated_at")

    def __init__(self, interval: float, burst: int) -> None:
        if interval <= 0 or burst < 1:
            raise ValueError("interval must be > 0 and burst >= 1")
        self.interval = interval
        self.burst = burst
        self._tokens = float(burst)
        self._updated_at: float | None = None

    def _refill(self, now: float) -> None:
        if self._updated_at is not None and now > self._updated_at:
            self._tokens = min(
                float(self.burst), self._tokens + (now - self._updated_at) / self.interval
            )
        if self._updated_at is None or now > self._updated_at:
            self._updated_at = now

    def wait(self, now: float) -> float:
        """Seconds until the next message may leave (0.0: now)."""
        self._refill(now)
        missing = 1.0 - self._tokens
        return 0.0 if missing <= _ROUNDING else missing * self.interval

    def sent(self, now: float) -> None:
        """A message left at ``now`` (also one sent without asking ``wait``)."""
        self._refill(now)
        self._tokens = max(self._tokens - 1.0, 0.0)  # never more than one interval owed
