"""CPU seconds of a process tree, read from ``/proc``, split per process kind.

``snapshot(root_pid, kind_of)`` walks ``/proc`` once, keeps the root and its
descendants, and returns ``{pid: Sample(kind, cpu_s)}`` with ``cpu_s`` = the CPU
time of that process (all its threads, not its children). ``delta(before,
after)`` turns two snapshots into CPU seconds per kind; a process that started
between them counts from zero, one that ended is lost (the ledger reports how
many processes changed, so a restart mid-phase is visible).

Resolution: nanoseconds (``schedstat``), but a thread that ended between two
snapshots takes its time with it (the relay's threads live as long as it does).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True, slots=True)
class Sample:
    kind: str
    cpu_s: float


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the ``(comm)``; index 0 = state (field 3)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    return raw[raw.rindex(b")") + 2 :].decode().split()


def cpu_seconds(pid: int) -> float | None:
    """CPU time of ``pid`` (all its live threads, user + system) in seconds; None when
    it is gone. From ``/proc/<pid>/task/*/schedstat`` (nanoseconds on the CPU), so
    small shares such as the coordinator's per handshake are not lost in 10 ms clock
    ticks; ``stat``'s utime + stime (ticks) where schedstat is missing."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    total_ns = 0
    for task in tasks:
        try:
            total_ns += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            break
    else:
        return total_ns / 1e9
    fields = _stat_fields(pid)
    if fields is None:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S  # fields 14, 15


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def descendants(root_pid: int) -> list[int]:
    """``root_pid`` and every process below it (one pass over /proc)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry))  # field 4: ppid
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def snapshot(root_pid: int, kind_of: Callable[[int, list[str]], str]) -> dict[int, Sample]:
    """CPU seconds of every live process in the tree, with its kind."""
    samples = {}
    for pid in descendants(root_pid):
        cpu = cpu_seconds(pid)
        if cpu is not None:
            samples[pid] = Sample(kind_of(pid, cmdline(pid)), cpu)
    return samples


def delta(before: dict[int, Sample], after: dict[int, Sample]) -> dict[str, float]:
    """CPU seconds spent per kind between two snapshots."""
    spent: dict[str, float] = {}
    for pid, sample in after.items():
        start = before[pid].cpu_s if pid in before else 0.0
        spent[sample.kind] = spent.get(sample.kind, 0.0) + max(0.0, sample.cpu_s - start)
    return spent


def changed_processes(before: dict[int, Sample], after: dict[int, Sample]) -> int:
    """Processes that started or ended between the snapshots."""
    return len(before.keys() ^ after.keys())


def cluster_kind(root_pid: int) -> Callable[[int, list[str]], str]:
    """Kinds of a ``cluster start`` tree: supervisor (the root), coordinator, worker."""

    def kind_of(pid: int, argv: list[str]) -> str:
        if pid == root_pid:
            return "supervisor"
        joined = " ".join(argv)
        if "-m coordinator" in joined:
            return "coordinator"
        if "-m worker" in joined:
            return "worker"
        return "other"

    return kind_of
