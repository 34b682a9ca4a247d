"""Resident memory of a process and all its descendants, from /proc.

Children are read from ``/proc/<pid>/task/<tid>/children`` where the kernel
offers it (CONFIG_PROC_CHILDREN) and otherwise from the parent pid field of
every ``/proc/<pid>/stat``. The sum of VmRSS counts pages shared between the
processes once per process, as ``ps`` does.
"""

from __future__ import annotations

from pathlib import Path

PROC = Path("/proc")


def _children_from_tasks(pid: int) -> list[int] | None:
    """Children via task/*/children; None when the kernel does not provide the file."""
    tasks = list((PROC / str(pid) / "task").glob("*/children"))
    if not tasks:
        return None
    children: list[int] = []
    for path in tasks:
        try:
            children += [int(p) for p in path.read_text().split()]
        except OSError:  # the thread or process ended
            continue
    return children


def _parent_map() -> dict[int, list[int]]:
    """ppid -> child pids, for every process in /proc."""
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        parents.setdefault(int(fields[1]), []).append(int(entry.name))
    return parents


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant that is alive now (pid first)."""
    if not (PROC / str(pid)).is_dir():
        return []
    parent_map: dict[int, list[int]] | None = None
    seen = [pid]
    index = 0
    while index < len(seen):
        current = seen[index]
        index += 1
        children = _children_from_tasks(current)
        if children is None:
            if parent_map is None:
                parent_map = _parent_map()
            children = parent_map.get(current, [])
        seen += [c for c in children if c not in seen]
    return seen


def rss_kib(pid: int) -> int:
    """VmRSS of one process in KiB (0 for a kernel thread or a process that ended)."""
    try:
        for line in (PROC / str(pid) / "status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def tree_rss_kib(pid: int) -> tuple[int, int]:
    """(summed VmRSS in KiB, number of processes) of ``pid`` and its descendants."""
    tree = process_tree(pid)
    return sum(rss_kib(p) for p in tree), len(tree)
