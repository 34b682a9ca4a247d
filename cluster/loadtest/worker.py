"""One load-generating process: a uvloop event loop running one mode's runner.

Started by ``pool`` with the spawn context; talks to the parent over a
``multiprocessing`` pipe. Parent -> worker: ``("go", t0)``, ``("stop",)``,
``("close",)``. Worker -> parent: ``("ready", progress)``, ``("progress",
progress)`` a few times a second, ``("result", WorkerResult)`` and, if the
process fails, ``("error", traceback)``. The worker ignores SIGINT: Ctrl-C
reaches the whole process group, and the parent decides (it sends "stop");
the parent starts it with SIGINT ignored, so not even its imports see one.
A closed pipe (the parent died) means stop and close.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

from cluster.loadtest.spec import WorkerSpec

PROGRESS_INTERVAL_S = 0.25
CLOSE_WAIT_S = 60.0  # how long to hold connections open after reporting, for RSS readings


class Control:
    """The parent's messages as asyncio events (the pipe is read by the event loop)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        loop = asyncio.get_running_loop()
        self.go: asyncio.Future[float] = loop.create_future()
        self.stop = asyncio.Event()
        self.close = asyncio.Event()
        self._loop = loop
        loop.add_reader(conn.fileno(), self._readable)

    def _readable(self) -> None:
        try:
            while self.conn.poll():
                self._handle(self.conn.recv())
        except (EOFError, OSError):  # the parent is gone
            self._loop.remove_reader(self.conn.fileno())
            self.stop.set()
            self.close.set()

    def _handle(self, message: tuple[Any, ...]) -> None:
        match message:
            case ("go", t0):
                if not self.go.done():
                    self.go.set_result(float(t0))
            case ("stop",):
                self.stop.set()
            case ("close",):
                self.stop.set()
                self.close.set()

    def send(self, *message: Any) -> None:
        with contextlib.suppress(OSError):  # the parent is gone: nothing to tell
            self.conn.send(message)

    def detach(self) -> None:
        with contextlib.suppress(Exception):
            self._loop.remove_reader(self.conn.fileno())


async def _first(*awaitables: Any) -> None:
    """Wait until the first of several awaitables is done; cancel the rest."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def serve(spec: WorkerSpec, conn: Connection) -> None:
    """Set up, wait for go, run, report, hold until told to close, close."""
    from cluster.loadtest.modes import make_runner

    control = Control(conn)
    runner = make_runner(spec)

    async def report_progress() -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL_S)
            control.send("progress", runner.progress())

    reporter = asyncio.ensure_future(report_progress())
    try:
        setup = asyncio.ensure_future(runner.setup())
        await _first(setup, control.stop.wait())
        if setup.done() and not setup.cancelled():
            setup.result()  # a bug in setup is this process's error
            control.send("ready", runner.progress())
            await _first(control.go, control.stop.wait())
            if control.go.done() and not control.go.cancelled() and not control.stop.is_set():
                await runner.run(control.go.result(), control.stop)
        runner.result.interrupted = control.stop.is_set()
        reporter.cancel()
        control.send("result", runner.result)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(control.close.wait(), CLOSE_WAIT_S)
    finally:
        reporter.cancel()
        control.detach()
        await runner.close()


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point (picklable for the spawn context)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # already ignored since exec (see pool)
    import uvloop

    try:
        uvloop.run(serve(spec, conn))
    except BaseException:
        with contextlib.suppress(Exception):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()
