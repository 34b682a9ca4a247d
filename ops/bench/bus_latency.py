"""Where a cross-shard crossing's time goes: ping-pong between two processes.

    PYTHONPATH=$PWD python3 ops/bench/bus_latency.py [--count N] [--rounds R] [--size B]

Each mode runs a ping process and an echo process (forked) that pass one
``--size``-byte message back and forth ``--count`` times (after 200 untimed);
the table shows the round trip's median and p90 in microseconds and the CPU
both processes spent per round trip (all threads), median over
``--rounds`` interleaved rounds (the order of modes rotates every round, so
background load on a shared machine hits them alike). A round trip crosses
twice, as a cross-shard pair's data RTT does.

Modes:

- ``unix-uvloop``: the floor -- an AF_UNIX stream socketpair, both ends uvloop
  protocols (``data_received`` writes back). One wake-up per crossing.
- ``zmq-block``: ZeroMQ ipc PUSH/PULL (one pair per direction, as the peer bus
  has), blocking ``recv``. Each crossing also wakes the sender's and the
  receiver's libzmq I/O threads.
- ``zmq-uvloop``: the same sockets read from a uvloop ``add_reader`` on
  ``ZMQ_FD`` and written from the callback at once.
- ``peerbus``: ``worker.bus.PeerBus`` itself on uvloop, the echo sending back
  through ``PeerBus.send`` from its ``deliver`` (as a worker does).
- ``peerbus-baseline``: the same with the ``PeerBus`` of ``--baseline``'s file
  (``git show REV:worker/bus.py > FILE``), for a before/after in one run.
- ``zmq-block-pinned``/``peerbus-pinned``: as above with each process and its
  libzmq I/O thread pinned to one CPU (ping on CPU 0, echo on the last CPU):
  the I/O thread's wake-up is then on the CPU that woke it.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import multiprocessing
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file: the repo

import uvloop
import zmq

from ops.bench import proctree

WARMUP = 200
BASELINE: str | None = None  # set in the parent before a mode's processes fork
ECHO_PID = 0  # likewise: the echo process, whose CPU the ping process reads too
TOTAL = 0  # likewise: round trips per run, untimed ones included
_cpu_start = _cpu_end = 0.0


def _cpu_now() -> float:
    """CPU seconds of both processes, every thread (libzmq's I/O threads too)."""
    return (proctree.cpu_seconds(os.getpid()) or 0.0) + (proctree.cpu_seconds(ECHO_PID) or 0.0)


def _mark(done: int) -> None:
    """After each round trip: the CPU clocks start after the untimed ones and
    stop at the last one (before the run's libzmq threads end with it)."""
    global _cpu_start, _cpu_end
    if done == WARMUP:
        _cpu_start = _cpu_now()
    if done == TOTAL:
        _cpu_end = _cpu_now()


def _pin(cpu: int | None, context: zmq.Context | None = None) -> None:
    if cpu is None:
        return
    os.sched_setaffinity(0, {cpu})
    if context is not None:
        context.set(zmq.THREAD_AFFINITY_CPU_ADD, cpu)


def _report(times: list[float], out) -> None:  # type: ignore[no-untyped-def]
    out.send(times)
    out.close()


# -- unix socketpair, uvloop both ends ---------------------------------------


class _Echo(asyncio.Protocol):
    def __init__(self, size: int) -> None:
        self.size = size
        self.buffer = b""

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while len(self.buffer) >= self.size:
            self.transport.write(self.buffer[: self.size])
            self.buffer = self.buffer[self.size :]


class _Ping(asyncio.Protocol):
    def __init__(self, size: int, count: int, done: asyncio.Future) -> None:
        self.size, self.count, self.done = size, count, done
        self.buffer = b""
        self.times: list[float] = []
        self.started = 0.0
        self.sent = 0

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport
        self._send()

    def _send(self) -> None:
        self.started = time.perf_counter()
        self.transport.write(b"x" * self.size)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) < self.size:
            return
        self.buffer = self.buffer[self.size :]
        self.times.append(time.perf_counter() - self.started)
        _mark(len(self.times))
        if len(self.times) >= self.count:
            self.done.set_result(self.times)
        else:
            self._send()


def _unix_echo(sock: socket.socket, size: int, cpu: int | None) -> None:
    _pin(cpu)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(lambda: _Echo(size), sock)
        await asyncio.Future()

    uvloop.run(main())


def _unix_ping(sock: socket.socket, size: int, count: int, cpu: int | None) -> list[float]:
    _pin(cpu)

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        await loop.connect_accepted_socket(lambda: _Ping(size, count, done), sock)
        return await done

    return uvloop.run(main())


def run_unix(size: int, count: int, pinned: bool) -> tuple[list[float], float]:
    global ECHO_PID
    one, two = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    cpus = _cpus(pinned)
    child = multiprocessing.Process(target=_unix_echo, args=(two, size, cpus[1]), daemon=True)
    child.start()
    ECHO_PID = child.pid  # type: ignore[assignment]
    two.close()
    try:
        return _in_child(_unix_ping, (one, size, count, cpus[0]))
    finally:
        child.kill()
        child.join()


# -- ZeroMQ ipc PUSH/PULL ------------------------------------------------------


def _zmq_pair(directory: str, me: str, other: str, context: zmq.Context):  # type: ignore[no-untyped-def]
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.LINGER, 0)
    pull.bind(f"ipc://{directory}/{me}.sock")
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(f"ipc://{directory}/{other}.sock")
    return pull, push


def _zmq_block_echo(directory: str, cpu: int | None, ready) -> None:  # type: ignore[no-untyped-def]
    _pin(cpu)
    context = zmq.Context()
    _pin(cpu, context)
    pull, push = _zmq_pair(directory, "echo", "ping", context)
    ready.set()
    while True:
        push.send(pull.recv())


def _zmq_block_ping(directory: str, size: int, count: int, cpu: int | None) -> list[float]:
    _pin(cpu)
    context = zmq.Context()
    _pin(cpu, context)
    pull, push = _zmq_pair(directory, "ping", "echo", context)
    payload = b"x" * size
    times = []
    for _ in range(count):
        started = time.perf_counter()
        push.send(payload)
        pull.recv()
        times.append(time.perf_counter() - started)
        _mark(len(times))
    return times


def _zmq_uvloop_echo(directory: str, cpu: int | None, ready) -> None:  # type: ignore[no-untyped-def]
    _pin(cpu)
    context = zmq.Context()
    _pin(cpu, context)
    pull, push = _zmq_pair(directory, "echo", "ping", context)

    def readable() -> None:
        while True:
            try:
                message = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            push.send(message, zmq.NOBLOCK)

    async def main() -> None:
        asyncio.get_running_loop().add_reader(pull.getsockopt(zmq.FD), readable)
        readable()
        ready.set()
        await asyncio.Future()

    uvloop.run(main())


def _zmq_uvloop_ping(directory: str, size: int, count: int, cpu: int | None) -> list[float]:
    _pin(cpu)
    context = zmq.Context()
    _pin(cpu, context)
    pull, push = _zmq_pair(directory, "ping", "echo", context)
    payload = b"x" * size

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        times: list[float] = []
        started = [0.0]

        def send() -> None:
            started[0] = time.perf_counter()
            push.send(payload, zmq.NOBLOCK)

        def readable() -> None:
            while True:
                try:
                    pull.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                times.append(time.perf_counter() - started[0])
                _mark(len(times))
                if len(times) >= count:
                    if not done.done():
                        done.set_result(times)
                    return
                send()

        loop.add_reader(pull.getsockopt(zmq.FD), readable)
        send()
        return await done

    return uvloop.run(main())


def _peer_bus_class():  # type: ignore[no-untyped-def]
    """worker.bus.PeerBus, or the one in --baseline's file (mode ``peerbus-baseline``)."""
    if BASELINE is None:
        from worker.bus import PeerBus

        return PeerBus
    spec = importlib.util.spec_from_file_location("bus_baseline", BASELINE)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module.PeerBus


def _peerbus_echo(directory: str, cpu: int | None, ready) -> None:  # type: ignore[no-untyped-def]
    PeerBus = _peer_bus_class()

    _pin(cpu)
    context = zmq.Context()
    _pin(cpu, context)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        bus: PeerBus  # type: ignore[valid-type]

        def deliver(from_shard: int, batch: list) -> None:
            bus.send([(from_shard, message) for message in batch])

        bus = PeerBus(Path(directory), 2, loop, deliver, context)
        ready.set()
        await asyncio.Future()

    uvloop.run(main())


def _peerbus_ping(directory: str, size: int, count: int, cpu: int | None) -> list[float]:
    PeerBus = _peer_bus_class()

    _pin(cpu)
    context = zmq.Context()
    _pin(cpu, context)
    message = (1, b"a" * 32, 1 << 32 | 1, b"x" * size)

    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        times: list[float] = []
        started = [0.0]

        def send() -> None:
            started[0] = time.perf_counter()
            bus.send([(2, message)])

        def deliver(from_shard: int, batch: list) -> None:
            times.append(time.perf_counter() - started[0])
            _mark(len(times))
            if len(times) >= count:
                if not done.done():
                    done.set_result(times)
                return
            send()

        bus = PeerBus(Path(directory), 1, loop, deliver, context)
        send()
        return await done

    return uvloop.run(main())


MODES = {
    "unix-uvloop": (None, None),
    "zmq-block": (_zmq_block_echo, _zmq_block_ping),
    "zmq-uvloop": (_zmq_uvloop_echo, _zmq_uvloop_ping),
    "peerbus": (_peerbus_echo, _peerbus_ping),
    "peerbus-baseline": (_peerbus_echo, _peerbus_ping),
    "zmq-block-pinned": (_zmq_block_echo, _zmq_block_ping),
    "peerbus-pinned": (_peerbus_echo, _peerbus_ping),
}


def _burn() -> None:
    while True:
        pass


def _cpus(pinned: bool) -> tuple[int | None, int | None]:
    if not pinned:
        return None, None
    cpus = sorted(os.sched_getaffinity(0))
    return cpus[0], cpus[-1]


def _call_and_send(function, args, out) -> None:  # type: ignore[no-untyped-def]
    times = function(*args)
    out.send((times, _cpu_end - _cpu_start))
    out.close()


def _in_child(function, args) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    """Run the ping side in a fresh process too (its own libzmq context)."""
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.Process(target=_call_and_send, args=(function, args, send))
    child.start()
    send.close()
    result = receive.recv()
    child.join()
    return result


def run_mode(
    mode: str, size: int, count: int, baseline: str | None = None
) -> tuple[list[float], float]:
    """The timed round trips (seconds) and the CPU seconds both processes spent on them."""
    global BASELINE, ECHO_PID, TOTAL
    TOTAL = count + WARMUP
    BASELINE = baseline if mode == "peerbus-baseline" else None
    pinned = mode.endswith("-pinned")
    if mode == "unix-uvloop":
        times, cpu = run_unix(size, count + WARMUP, pinned)
        return times[WARMUP:], cpu
    echo, ping = MODES[mode]
    cpus = _cpus(pinned)
    with tempfile.TemporaryDirectory(prefix="bus-latency-") as directory:
        ready = multiprocessing.Event()
        child = multiprocessing.Process(target=echo, args=(directory, cpus[1], ready), daemon=True)
        child.start()
        ECHO_PID = child.pid  # type: ignore[assignment]
        try:
            ready.wait(10)
            times, cpu = _in_child(ping, (directory, size, count + WARMUP, cpus[0]))
        finally:
            child.kill()
            child.join()
    return times[WARMUP:], cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=100)
    parser.add_argument("--modes", default=",".join(m for m in MODES if m != "peerbus-baseline"))
    parser.add_argument(
        "--baseline",
        help="a worker/bus.py to compare with (git show REV:worker/bus.py > FILE): adds"
        " mode peerbus-baseline",
    )
    parser.add_argument(
        "--load",
        type=int,
        default=0,
        help="busy-looping processes during the runs (a shared machine)",
    )
    args = parser.parse_args(argv)
    burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for burner in burners:
        burner.start()
    modes = args.modes.split(",")
    if args.baseline and "peerbus-baseline" not in modes:
        modes.append("peerbus-baseline")
    results: dict[str, list[tuple[float, float, float]]] = {mode: [] for mode in modes}
    for number in range(args.rounds):
        order = modes[number % len(modes) :] + modes[: number % len(modes)]
        for mode in order:
            times, cpu = run_mode(mode, args.size, args.count, args.baseline)
            times.sort()
            median = times[len(times) // 2] * 1e6
            p90 = times[int(len(times) * 0.9)] * 1e6
            results[mode].append((median, p90, cpu / len(times) * 1e6))
    for burner in burners:
        burner.kill()
        burner.join()
    print(f"{'mode':<18} {'RTT p50 us':>10} {'p90 us':>8} {'CPU us/RTT':>10}   per round (p50)")
    for mode in modes:
        medians = [m for m, _, _ in results[mode]]
        p90s = [p for _, p, _ in results[mode]]
        cpus = [c for _, _, c in results[mode]]
        rounds = " ".join(f"{m:.0f}" for m in medians)
        print(
            f"{mode:<18} {statistics.median(medians):>10.0f} {statistics.median(p90s):>8.0f}"
            f" {statistics.median(cpus):>10.1f}   {rounds}"
        )
    return 0


if __name__ == "__main__":
    multiprocessing.set_start_method("fork")
    sys.exit(main())
