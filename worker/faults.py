"""Containing the unexpected in a worker (issue 10 finding 2).

Every callback the event loop or a socket reader runs catches what the relay
core or an adapter raised where it arose: per client connection, that
connection is killed; per bus or coordinator message, the message is skipped;
the timer always fires again. Each contained exception is counted by where it
was caught (``internal_errors.<where>``, the metric
``toxrelay_internal_errors_total{where}``) and logged, the first of each kind
and every thousandth with its traceback.

What cannot be contained is a relay table that contradicts itself
(``RelayServer.check_invariants``): the worker then exits with
``EXIT_INVARIANT_BROKEN`` and its supervisor starts a clean process, instead
of one that keeps heartbeating while its clients are wedged.
"""

from __future__ import annotations

import logging
import os
from collections import Counter

log = logging.getLogger("worker.faults")

# The exit status of a worker whose relay table is broken (EX_SOFTWARE).
EXIT_INVARIANT_BROKEN = 70


class Faults:
    """Counts contained exceptions into the shard's counters."""

    def __init__(self, stats: Counter[str]) -> None:
        self.stats = stats

    def contained(self, where: str) -> None:
        """Call from an ``except Exception`` block: count and log it."""
        key = f"internal_errors.{where}"
        self.stats[key] += 1
        count = self.stats[key]
        if count == 1 or count % 1000 == 0:
            log.exception("internal error in %s (%d so far); contained", where, count)


def exit_broken(reason: str) -> None:
    """End the process at once: its state cannot be trusted to stop cleanly.
    Its clients' sockets close with it; the supervisor starts a new worker."""
    log.critical("relay table broken (%s): exiting for a clean restart", reason)
    logging.shutdown()
    os._exit(EXIT_INVARIANT_BROKEN)
