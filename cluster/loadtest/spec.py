"""What one worker process is asked to do: its share of the load."""

from __future__ import annotations

from dataclasses import dataclass

from cluster.loadtest.options import LoadtestOptions
from cluster.loadtest.payload import process_seed


@dataclass(frozen=True)
class WorkerSpec:
    """One process's share: ``units`` pairs or connections, ``concurrency`` opening lanes."""

    options: LoadtestOptions
    index: int
    units: int
    concurrency: int
    seed: int | None  # this process's own seed, derived from --seed


def split_evenly(total: int, parts: int) -> list[int]:
    """``total`` divided into ``parts`` integers that differ by at most one."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def worker_specs(options: LoadtestOptions) -> list[WorkerSpec]:
    """One spec per process; every process gets at least one unit and one lane."""
    processes = max(1, min(options.processes, options.units))
    units = split_evenly(options.units, processes)
    lanes = split_evenly(options.concurrency, processes)
    return [
        WorkerSpec(
            options=options,
            index=i,
            units=units[i],
            concurrency=max(1, lanes[i]),
            seed=None if options.seed is None else process_seed(options.seed, i),
        )
        for i in range(processes)
    ]
