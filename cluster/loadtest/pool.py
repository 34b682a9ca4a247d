"""The parent process: start the workers, keep them in step, merge what they report.

Phases: every worker sets up its connections and reports ready (within
``--setup-timeout``); the parent then sends one start time t0 to all, so
warm-up, measured window and timeline bins line up across processes
(``time.perf_counter`` is CLOCK_MONOTONIC on Linux, the same clock in every
process). Results arrive when the workers finish; the parent reads the
relay's memory (``--server-pid``) while the connections are still open, then
tells the workers to close. SIGINT/SIGTERM (or the overall deadline) send
"stop": workers end their window early and still report, so the report is
partial, not lost. A second signal abandons the workers.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import resource
import signal
import time
from dataclasses import dataclass, field
from multiprocessing import resource_tracker
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from cluster.loadtest.options import TRAFFIC_MODES, LoadtestOptions
from cluster.loadtest.procmem import tree_rss_kib
from cluster.loadtest.progress import ProgressLine
from cluster.loadtest.results import WorkerResult, merge_results
from cluster.loadtest.spec import WorkerSpec, worker_specs
from cluster.loadtest.worker import worker_main

GO_DELAY_S = 0.1  # t0 is this far ahead of the "go" message, so all workers start together
POLL_S = 0.1
STOP_GRACE_S = 15.0  # after "stop", how long workers have to report
JOIN_TIMEOUT_S = 10.0


@dataclass
class Member:
    """One worker process as the parent sees it."""

    spec: WorkerSpec
    process: BaseProcess
    conn: Connection
    ready: bool = False
    progress: dict[str, int] = field(default_factory=dict)
    result: WorkerResult | None = None
    error: str | None = None

    @property
    def open(self) -> bool:
        return self.result is None and self.error is None


@dataclass
class PoolOutcome:
    """The merged result plus what only the parent knows."""

    result: WorkerResult
    processes: int
    started: float  # perf_counter when the pool started
    finished: float
    t0: float | None  # the common start time, if the run got that far
    ready_units: int
    failure: str | None = None
    stop_signal: int | None = None
    memory: dict[str, tuple[int, int]] = field(default_factory=dict)  # phase -> (KiB, procs)
    worker_errors: list[str] = field(default_factory=list)
    generator_cpu_s: float = 0.0  # user + system time of the worker processes


def _children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of children reaped so far
    return usage.ru_utime + usage.ru_stime


class Pool:
    """Runs one load test over ``options.processes`` worker processes."""

    def __init__(self, options: LoadtestOptions, progress: ProgressLine) -> None:
        self.options = options
        self.progress = progress
        self.members: list[Member] = []
        self.stop_signal: int | None = None
        self.stop_sent_at: float | None = None
        self.failure: str | None = None
        self.memory: dict[str, tuple[int, int]] = {}
        self.t0: float | None = None
        self._last_events = 0
        self._last_time = 0.0
        self._rate = 0.0

    # -- public ----------------------------------------------------------------

    def run(self) -> PoolOutcome:
        started = time.perf_counter()
        cpu_before = _children_cpu_s()
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            self._sample_memory("before")
            self._start(worker_specs(self.options))
            self._supervise(started)
            self._sample_memory("end")
        finally:
            self._shutdown()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            self.progress.finish()
        results = [m.result for m in self.members if m.result is not None]
        return PoolOutcome(
            result=merge_results(results),
            processes=len(self.members),
            started=started,
            finished=time.perf_counter(),
            t0=self.t0,
            ready_units=self._sum("ready"),
            failure=self.failure,
            stop_signal=self.stop_signal,
            memory=self.memory,
            worker_errors=[f"worker {m.spec.index}: {m.error}" for m in self.members if m.error],
            generator_cpu_s=_children_cpu_s() - cpu_before,
        )

    # -- processes -------------------------------------------------------------

    def _start(self, specs: list[WorkerSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        # A terminal's Ctrl-C reaches the workers too, and must not kill one that is
        # still importing. Children inherit an ignored SIGINT across exec (and the
        # worker keeps it ignored); meanwhile the parent's SIGINT is blocked, so one
        # that arrives now is kept pending for our handler (Linux queues a blocked
        # signal even while it is ignored). The resource tracker is started first:
        # starting it unblocks SIGINT in the parent, which would open the window.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            for spec in specs:
                parent_end, child_end = context.Pipe()
                process = context.Process(
                    target=worker_main,
                    args=(spec, child_end),
                    name=f"loadtest-worker-{spec.index}",
                    daemon=True,
                )
                process.start()
                child_end.close()
                self.members.append(Member(spec, process, parent_end))
        finally:
            signal.signal(signal.SIGINT, handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})

    def _send(self, member: Member, *message: Any) -> None:
        with contextlib.suppress(OSError):  # it is gone; noticed by _receive / is_alive
            member.conn.send(message)

    def _shutdown(self) -> None:
        for member in self.members:
            self._send(member, "close")
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for member in self.members:
            member.process.join(max(0.0, deadline - time.monotonic()))
        for member in self.members:
            if member.process.is_alive():
                member.process.terminate()  # by its pid; we started it
                member.process.join(2.0)
            if member.process.is_alive():
                member.process.kill()
                member.process.join()
            member.conn.close()

    # -- the supervising loop -----------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stop_signal is not None:
            raise KeyboardInterrupt(f"signal {signum} again")
        self.stop_signal = signum

    def _stop(self, failure: str | None = None) -> None:
        if failure is not None and self.failure is None:
            self.failure = failure
        if self.stop_sent_at is None:
            self.stop_sent_at = time.perf_counter()
            for member in self.members:
                if member.open:
                    self._send(member, "stop")

    def _receive(self, member: Member) -> None:
        try:
            while member.conn.poll():
                kind, *payload = member.conn.recv()
                if kind == "progress":
                    member.progress = payload[0]
                elif kind == "ready":
                    member.ready, member.progress = True, payload[0]
                elif kind == "result":
                    member.result = payload[0]
                elif kind == "error":
                    member.error = payload[0].strip()
        except (EOFError, OSError):
            if member.open:
                member.error = f"exited with code {member.process.exitcode} before reporting"

    def _supervise(self, started: float) -> None:
        options = self.options
        setup_deadline = started + options.setup_timeout
        deadline = started + options.deadline
        while True:
            live = [m for m in self.members if m.open]
            if not live:
                return
            for conn in wait([m.conn for m in live], timeout=POLL_S):
                self._receive(next(m for m in live if m.conn is conn))
            now = time.perf_counter()
            for member in live:
                if member.open and not member.process.is_alive() and not member.conn.poll():
                    member.error = f"exited with code {member.process.exitcode} before reporting"
            if any(m.error for m in self.members):
                self._stop("a worker process failed")
            if self.stop_signal is not None:
                self._stop()
            if self.t0 is None and self.stop_sent_at is None:
                if all(m.ready or not m.open for m in self.members):
                    self._go()
                elif now > setup_deadline:
                    self._stop(f"setup not done within --setup-timeout {options.setup_timeout:g} s")
            if now > deadline:
                self._stop(f"overall --deadline of {options.deadline:g} s passed")
            if self.stop_sent_at is not None and now > self.stop_sent_at + STOP_GRACE_S:
                for member in self.members:
                    if member.open:
                        member.error = "no report after stop"
                return
            if self.progress.due(now):
                self.progress.show(self._status(now, started), now)

    def _go(self) -> None:
        if self.options.mode != "handshake" and self._sum("ready") == 0:
            self._stop("no connection could be set up")
            return
        self._sample_memory("connected")
        self.t0 = time.perf_counter() + GO_DELAY_S
        for member in self.members:
            if member.ready and member.open:
                self._send(member, "go", self.t0)

    def _sample_memory(self, phase: str) -> None:
        if self.options.server_pid is not None:
            self.memory[phase] = tree_rss_kib(self.options.server_pid)

    # -- the live line -------------------------------------------------------

    def _sum(self, key: str) -> int:
        return sum(m.progress.get(key, 0) for m in self.members)

    def _phase(self, now: float) -> str:
        options, t0 = self.options, self.t0
        if self.stop_sent_at is not None:
            return "stopping"
        if t0 is None:
            return "setup"
        if options.mode in TRAFFIC_MODES:
            if now < t0 + options.warmup:
                return "warmup"
            return "measuring" if now < t0 + options.warmup + options.duration else "draining"
        if options.mode == "idle":
            return "holding" if now < t0 + options.duration else "pinging"
        return "running"

    def _status(self, now: float, started: float) -> str:
        options = self.options
        events = self._sum("events")
        if self._last_time:
            elapsed = now - self._last_time
            self._rate = (events - self._last_events) / elapsed if elapsed > 0 else self._rate
        self._last_events, self._last_time = events, now
        head = f"loadtest {options.mode}  {self._phase(now):<9} {now - started:6.1f} s"
        errors = f"errors {self._sum('errors'):,}"
        if self.t0 is None:
            noun = "pairs linked" if options.mode in TRAFFIC_MODES else "connections open"
            return f"{head}  {noun} {self._sum('ready'):,}/{options.units:,}  {errors}"
        if options.mode in TRAFFIC_MODES:
            return f"{head}  frames/s {self._rate:,.0f}  {errors}"
        if options.mode == "handshake":
            return (
                f"{head}  handshakes/s {self._rate:,.0f}  done {events:,}/{options.units:,}  "
                f"{errors}"
            )
        return (
            f"{head}  alive {self._sum('alive'):,}/{options.units:,}  server pings {events:,}  "
            f"{errors}"
        )
