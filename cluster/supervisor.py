"""The supervisor: `cluster start` runs one coordinator and N worker processes.

It loads the configuration and keys once, reserves the ports (so port 0
resolves once for every shard and the ports stay ours across restarts),
hands each worker its specification on stdin, prints the ready lines when the
whole cluster accepts connections, restarts a crashed worker or coordinator
with back-off (telling the coordinator at once that a worker's keys are
gone), replaces workers one at a time on SIGHUP (the ports never close), and
stops everything within 5 s on SIGINT/SIGTERM, at any point of start-up too.

Operator safety (issue 10 finding 9): before any worker starts, it takes a
lock per host and port (a second `cluster start` on the same ports would
otherwise join the first through SO_REUSEPORT and split the clients), checks
with a plain bind that no other process serves them, and binds the admin
socket and the metrics endpoint, so every mistake is a one-line error before
``Listening on`` is printed, and nothing is left behind when one happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import stat
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq
from prometheus_client import CollectorRegistry

from cluster.admin import AdminSocketError, remove_own_socket, serve_admin
from cluster.config import RelayConfig
from cluster.keys import RelayIdentity
from cluster.metrics import ClusterCollector, ClusterStats
from cluster.metrics_http import MetricsAddressError, MetricsServer
from runtime.ipc import pack, router_endpoint, supervisor_endpoint, unpack
from runtime.sockets import bind_reuseport

log = logging.getLogger("cluster.supervisor")

READY_TIMEOUT = 20.0  # seconds for a process to report READY
STOP_TIMEOUT = 4.0  # SIGTERM -> SIGKILL; the whole stop stays under 5 s
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0
STABLE_AFTER = 10.0  # a process that ran this long resets its back-off
FINAL_REPORT_WAIT = 0.5  # seconds to read an exited worker's FINAL line
FINAL_REPORT_LIMIT = 1 << 20  # bytes of its output kept while looking for it
WORKERS_PER_CPU_WARNING = 4  # more workers than this many per CPU only cost memory and start-up


class StartupError(Exception):
    """The cluster could not start; the message says which part failed."""


def _show(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def lock_directory() -> Path:
    """Where the per-address locks live: a directory of our own (0700) under
    the temporary directory, one per user (SO_REUSEPORT only joins sockets of
    the same user, so only the same user can split a relay this way)."""
    path = Path(tempfile.gettempdir()) / f"tox-relay-locks-{os.getuid()}"
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    status = os.lstat(path)
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid():
        raise StartupError(f"lock directory {path} is not a directory owned by this user")
    if status.st_mode & 0o077:
        raise StartupError(f"lock directory {path} is accessible by others; remove it")
    return path


def lock_address(protocol: str, host: str, port: int) -> int:
    """Take the lock of ``protocol`` ``host:port`` (a flock'd file, released
    when this process ends, however it ends); its descriptor."""
    path = lock_directory() / f"{protocol}-{host}-{port}.lock"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as error:
        raise StartupError(f"cannot open the lock {path}: {error.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StartupError(
                f"another cluster already serves {protocol.upper()} {_show(host, port)} "
                f"(it holds {path}); stop it first or choose other ports"
            ) from None
        raise StartupError(f"cannot lock {path}: {error.strerror}") from None
    return fd


def probe_free(kind: int, host: str, port: int) -> None:
    """A plain bind (no SO_REUSEPORT) fails when any other process listens on
    or holds the port, even one that would share it with us (a relay of this
    or another user, tox-bootstrapd). TCP sets SO_REUSEADDR so that closed
    connections in TIME_WAIT do not count; a listener still does."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    protocol = "TCP" if kind == socket.SOCK_STREAM else "UDP"
    with socket.socket(family, kind) as sock:
        if kind == socket.SOCK_STREAM:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        try:
            sock.bind((host, port))
        except OSError as error:
            raise StartupError(
                f"cannot use {protocol} {_show(host, port)}: {error.strerror}"
                + (" (another process serves it)" if error.errno == errno.EADDRINUSE else "")
            ) from None


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (without listening) a SO_REUSEPORT socket: it resolves port 0 and
    keeps the port ours, while only the workers' listening sockets accept."""
    try:
        return bind_reuseport(host, port, socket.SOCK_STREAM)
    except OSError as error:
        raise StartupError(f"cannot listen on {host} port {port}: {error.strerror}") from None


def worker_count_warning(workers: int, cpus: int) -> str | None:
    """A warning when ``workers`` is far above what ``cpus`` can run."""
    if workers <= WORKERS_PER_CPU_WARNING * cpus:
        return None
    return (
        f"workers = {workers} on {cpus} CPU(s): more than {WORKERS_PER_CPU_WARNING} per CPU "
        "only costs memory and start-up time (each worker is one process on one core); "
        "0 means one per CPU"
    )


@dataclass
class ManagedProcess:
    """One child (the coordinator or a worker in a slot) and its history."""

    name: str
    process: asyncio.subprocess.Process | None = None
    shard: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    direct_address: str | None = None
    index: int = -1  # worker slot; -1 for the coordinator


def resolve_udp_port(host: str, port: int) -> int:
    """``port``, or for 0 a free UDP port picked now. Unlike the TCP ports it
    cannot stay reserved here: a bound UDP socket in the workers' SO_REUSEPORT
    group would take its share of the replies and never read them."""
    if port:
        return port
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind((host, 0))
        except OSError as error:
            raise StartupError(f"cannot bind a UDP port on {host}: {error.strerror}") from None
        return sock.getsockname()[1]


async def read_final_report(process: asyncio.subprocess.Process) -> dict | None:
    """The ``FINAL <json>`` report an exited worker printed after a clean stop
    (None after a crash or a kill: no such line)."""
    if process.stdout is None:
        return None
    rest = b""
    try:
        async with asyncio.timeout(FINAL_REPORT_WAIT):
            while chunk := await process.stdout.read(FINAL_REPORT_LIMIT):
                rest = (rest + chunk)[-FINAL_REPORT_LIMIT:]  # the FINAL line is the last
    except (TimeoutError, OSError):
        return None
    finals = [line for line in rest.splitlines() if line.startswith(b"FINAL ")]
    if not finals:
        return None
    try:
        report = json.loads(finals[-1].removeprefix(b"FINAL "))
    except ValueError:
        log.warning("undecodable final report of pid %d dropped", process.pid)
        return None
    return report if isinstance(report, dict) and "counters" in report else None


class Supervisor:
    def __init__(
        self, config: RelayConfig, identity: RelayIdentity, output: Callable[[str], None]
    ) -> None:
        self.config = config
        self.identity = identity
        self.output = output
        self.workers = config.workers or (os.cpu_count() or 1)
        # The onion / forwarding keys of every shard derive from this; it lives
        # only in memory and on the workers' stdin pipes (onion-over-tcp.md R-ONION-8).
        self.onion_secret = os.urandom(32)
        self.coordinator = ManagedProcess("coordinator")
        self.slots = [ManagedProcess(f"worker {i}", index=i) for i in range(self.workers)]
        self.stats = ClusterStats()
        self._next_shard = 1
        self._stopping = False
        self._reloading = False
        self._ready = False
        # Taken by _acquire (each released by _release, whatever was taken).
        self._locks: list[int] = []
        self.reserved: list[socket.socket] = []
        self.ports: list[int] = []
        self.udp_port: int | None = None
        self.runtime_dir: Path | None = None
        self._context = zmq.Context.instance()
        self._control: zmq.Socket | None = None
        self._reports: zmq.Socket | None = None
        self._admin: asyncio.AbstractServer | None = None
        self._admin_inode: int | None = None
        self._metrics_server: MetricsServer | None = None
        self._metrics_address = ""
        self._tasks: set[asyncio.Task] = set()
        # Worker starts at once: many more than the CPUs only time each other out.
        self._spawning = asyncio.Semaphore(max(2, os.cpu_count() or 1))

    def _acquire(self) -> None:
        """Locks, port checks and reservations, the runtime directory and the
        ZeroMQ sockets; on any failure, everything taken so far is released."""
        config = self.config
        try:
            for port in config.ports:
                if port:
                    self._locks.append(lock_address("tcp", config.host, port))
                    probe_free(socket.SOCK_STREAM, config.host, port)
            if config.onion and config.udp_port:
                self._locks.append(lock_address("udp", config.host, config.udp_port))
                probe_free(socket.SOCK_DGRAM, config.host, config.udp_port)
            for port in config.ports:
                self.reserved.append(reserve_port(config.host, port))
            self.ports = [sock.getsockname()[1] for sock in self.reserved]
            if config.onion:
                self.udp_port = resolve_udp_port(config.host, config.udp_port)
            self.runtime_dir = Path(tempfile.mkdtemp(prefix="tox-relay-"))  # mode 0700
            self._control = self._context.socket(zmq.DEALER)
            self._control.setsockopt(zmq.LINGER, 0)
            self._control.connect(router_endpoint(self.runtime_dir))
            self._reports = self._context.socket(zmq.PULL)  # workers' and coordinator's stats
            self._reports.setsockopt(zmq.LINGER, 0)
            self._reports.setsockopt(zmq.RCVHWM, 1000)
            self._reports.bind(supervisor_endpoint(self.runtime_dir))
        except BaseException:
            self._release()
            raise

    def _release(self) -> None:
        for zmq_socket in (self._control, self._reports):
            if zmq_socket is not None:
                zmq_socket.close()
        self._control = self._reports = None
        for sock in self.reserved:
            sock.close()
        self.reserved = []
        if self.runtime_dir is not None:
            shutil.rmtree(self.runtime_dir, ignore_errors=True)
            self.runtime_dir = None
        for fd in self._locks:
            os.close(fd)  # releases the flock
        self._locks = []

    # -- children --------------------------------------------------------------

    def _worker_spec(self, shard: int) -> dict:
        config = self.config
        return {
            "shard": shard,
            "secret_key": self.identity.secret_key.hex(),
            "options": asdict(config.relay_options()),
            "host": config.host,
            "ports": self.ports,
            "backlog": config.listen_backlog,
            "runtime_dir": str(self.runtime_dir),
            "min_open_files": config.min_open_files,
            "log_level": config.log_level,
            "log_format": config.log_format,
            "private_port": config.shard_ports,
            "udp_port": self.udp_port,
            "onion_secret": self.onion_secret.hex(),
        }

    async def _spawn(self, managed: ManagedProcess, args: list[str], stdin: bytes | None) -> str:
        """Start a child and wait for its READY line (returned)."""
        loop = asyncio.get_running_loop()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            # A session of its own: a terminal's Ctrl-C reaches only the
            # supervisor, which stops the children in order (SIGINT in a child
            # still importing printed a KeyboardInterrupt traceback). A child
            # whose supervisor dies notices and stops; systemd kills the cgroup.
            start_new_session=True,
        )
        managed.process = process
        managed.started_at = loop.time()
        if stdin is not None:
            assert process.stdin is not None
            process.stdin.write(stdin)
            await process.stdin.drain()
            process.stdin.close()
        assert process.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                while True:
                    raw = await process.stdout.readline()
                    if not raw:
                        raise StartupError(f"{managed.name} exited before it was ready")
                    line = raw.decode(errors="replace").rstrip("\n")
                    if line.startswith("READY"):
                        break
                    if line.startswith("ERROR "):  # the child's one-line reason
                        raise StartupError(f"{managed.name}: {line.removeprefix('ERROR ')}")
        except (TimeoutError, StartupError):
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        self._watch(managed, process)
        return line

    def _watch(self, managed: ManagedProcess, process: asyncio.subprocess.Process) -> None:
        task = asyncio.get_running_loop().create_task(self._wait_for_exit(managed, process))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wait_for_exit(
        self, managed: ManagedProcess, process: asyncio.subprocess.Process
    ) -> None:
        code = await process.wait()
        if self._stopping or managed.process is not process:
            return  # stopped on purpose, or already replaced
        loop = asyncio.get_running_loop()
        log.error("%s (pid %d) exited with %s; restarting", managed.name, process.pid, code)
        if managed is self.coordinator:
            self.stats.coordinator_restarts += 1
        elif managed.shard is not None:
            await self._hand_over(managed.shard, process)
            self.stats.worker_restarts += 1
            self.stats.restarts_by_slot[managed.index] += 1
            self._tell_coordinator(["drop", managed.shard])
        if loop.time() - managed.started_at > STABLE_AFTER:
            managed.backoff = BACKOFF_FIRST
        delay = managed.backoff
        managed.backoff = min(managed.backoff * 2, BACKOFF_MAX)
        managed.restarts += 1
        await asyncio.sleep(delay)
        while not self._stopping:
            try:
                if managed is self.coordinator:
                    await self._start_coordinator()
                else:
                    await self._start_worker(managed)
                return
            except (StartupError, TimeoutError, OSError) as error:
                log.error("restarting %s failed: %s", managed.name, error)
                await asyncio.sleep(managed.backoff)
                managed.backoff = min(managed.backoff * 2, BACKOFF_MAX)

    def _tell_coordinator(self, message: list) -> None:
        if self._control is not None:
            with contextlib.suppress(zmq.Again):
                self._control.send(pack(message), zmq.NOBLOCK)

    async def _start_coordinator(self) -> None:
        config = self.config
        args = ["-m", "coordinator", str(self.runtime_dir), config.log_level, config.log_format]
        await self._spawn(self.coordinator, args, None)
        if self._ready:
            self._announce_coordinator()

    async def _start_worker(self, managed: ManagedProcess) -> str:
        shard = self._next_shard
        self._next_shard += 1
        spec = json.dumps(self._worker_spec(shard)).encode() + b"\n"
        managed.shard = shard
        self.stats.slot_of_shard[shard] = managed.index
        async with self._spawning:
            line = await self._spawn(managed, ["-m", "worker"], spec)
        private = [part.removeprefix("private=") for part in line.split() if "=" in part]
        if private:
            managed.direct_address = private[0]
            if self._ready:  # a restart: announce the new shard at once
                self._announce_direct(managed)
        return line

    def _announce_direct(self, managed: ManagedProcess) -> None:
        pid = managed.process.pid if managed.process else 0
        self.output(
            f"Shard {managed.shard} ({managed.name}) pid {pid} "
            f"direct address {managed.direct_address}"
        )

    def _announce_coordinator(self) -> None:
        if self.config.shard_ports and self.coordinator.process is not None:
            self.output(f"Coordinator pid {self.coordinator.process.pid}")

    # -- life cycle ------------------------------------------------------------

    async def run(self) -> int:
        """Start, serve until SIGINT/SIGTERM, stop; StartupError if it cannot start.

        A signal at any point of start-up stops it: the children started so
        far are terminated and everything taken is released."""
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._request_reload)
        try:
            self._acquire()
            await self._bind_local_endpoints()
            warning = worker_count_warning(self.workers, os.cpu_count() or 1)
            if warning:
                log.warning("%s", warning)
            starting = loop.create_task(self._start_children())
            stopped = loop.create_task(stop.wait())
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not starting.done():
                log.info("stop requested during start-up")
                starting.cancel()
                with contextlib.suppress(
                    asyncio.CancelledError, StartupError, TimeoutError, OSError
                ):
                    await starting
                return 0
            stopped.cancel()
            try:
                starting.result()
            except (StartupError, TimeoutError, OSError) as error:
                raise StartupError(f"cluster did not start: {error}") from None
            self._announce_ready()
            await stop.wait()
            log.info("stopping the cluster")
            return 0
        finally:
            loop.remove_signal_handler(signal.SIGHUP)
            await self._stop_children()
            if self._ready:
                # The last numbers, since nothing can scrape them any more.
                totals = dict(sorted(self.stats.totals().items()))
                self.output(f"Final counters: {json.dumps(totals, separators=(',', ':'))}")

    async def _bind_local_endpoints(self) -> None:
        """The admin socket and the metrics endpoint, before any worker starts."""
        try:
            self._admin = await serve_admin(self.config.admin_socket, self.stats.status)
        except AdminSocketError as error:
            raise StartupError(str(error)) from None
        except OSError as error:
            raise StartupError(
                f"admin_socket: {self.config.admin_socket}: {error.strerror or error}"
            ) from None
        self._admin_inode = os.lstat(self.config.admin_socket).st_ino
        if self.config.metrics:
            host, _, port = self.config.metrics.rpartition(":")
            host = host.removeprefix("[").removesuffix("]")
            registry = CollectorRegistry()
            registry.register(ClusterCollector(self.stats))
            self._metrics_server = MetricsServer(registry)
            try:
                self._metrics_address = await self._metrics_server.start(host, int(port))
            except MetricsAddressError as error:
                raise StartupError(str(error)) from None

    async def _start_children(self) -> None:
        assert self._reports is not None
        asyncio.get_running_loop().add_reader(self._reports.getsockopt(zmq.FD), self._read_reports)
        await self._start_coordinator()
        await asyncio.gather(*(self._start_worker(slot) for slot in self.slots))

    def _announce_ready(self) -> None:
        host = self.config.host
        shown = f"[{host}]" if ":" in host else host
        self.output(f"Public Key: {self.identity.public_key_hex}")
        for port in self.ports:
            self.output(f"Listening on {shown}:{port}")
        if self.udp_port is not None:
            self.output(f"Onion and forwarding over UDP on {shown}:{self.udp_port}")
        if self._metrics_server is not None:
            self.output(f"Metrics on http://{self._metrics_address}/metrics")
        for slot in self.slots:
            if slot.direct_address is not None:
                self._announce_direct(slot)
        self._announce_coordinator()
        self._ready = True
        self.output(
            f"Relay ready: {self.workers} worker(s), {len(self.ports)} listening address(es)"
        )

    def _read_reports(self) -> None:
        if self._reports is None:
            return
        for _ in range(1000):
            try:
                payload = self._reports.recv(zmq.NOBLOCK)
            except (zmq.Again, zmq.ZMQError):
                return
            try:
                message = unpack(payload)
                if message[0] == "stats":
                    _, shard, pid, report = message
                    if any(slot.shard == shard for slot in self.slots):
                        self.stats.record(shard, pid, report)
                elif message[0] == "coordinator":
                    self.stats.coordinator = message[1]
            except (ValueError, TypeError, KeyError, IndexError):
                log.warning("undecodable report dropped")

    def _request_reload(self) -> None:
        if not self._ready:
            log.warning("SIGHUP ignored: the cluster is still starting")
            return
        if self._reloading or self._stopping:
            return
        task = asyncio.get_running_loop().create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> None:
        """Replace the workers one at a time; the ports stay open throughout."""
        self._reloading = True
        log.info("rolling reload of %d workers", len(self.slots))
        try:
            for index, slot in enumerate(self.slots):
                if self._stopping:
                    return
                old, old_shard = slot.process, slot.shard
                try:
                    await self._start_worker(slot)  # listening before the old one goes
                except (StartupError, TimeoutError, OSError):
                    slot.process, slot.shard = old, old_shard
                    raise
                slot.backoff = BACKOFF_FIRST
                if old is not None and old.returncode is None:
                    await self._terminate(old)
                if old_shard is not None:
                    self._tell_coordinator(["drop", old_shard])
                    if old is not None:
                        await self._hand_over(old_shard, old)
                log.info("worker %d replaced (shard %s -> %s)", index, old_shard, slot.shard)
            self.output("Reload complete")
        finally:
            self._reloading = False

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()

    async def _hand_over(self, shard: int, process: asyncio.subprocess.Process) -> None:
        """Fold an exited worker's counts into the retired totals: its FINAL
        report after a clean stop (SIGTERM: reload, stop), else its last
        periodic report (a worker killed by a signal loses at most the counts
        of the second since that report)."""
        report = await read_final_report(process)
        if report is not None and shard in self.stats.slot_of_shard:
            self.stats.record(shard, process.pid, report)
        self.stats.retire(shard)

    async def _stop_children(self) -> None:
        """Terminate every child and release everything; safe at any point."""
        self._stopping = True
        workers = [(slot.shard, slot.process) for slot in self.slots if slot.process]
        children = [slot.process for slot in [*self.slots, self.coordinator] if slot.process]
        await asyncio.gather(*(self._terminate(process) for process in children))
        for task in list(self._tasks):
            task.cancel()
        for shard, process in workers:
            if shard is not None:
                await self._hand_over(shard, process)
        for sample in list(self.stats.workers):
            self.stats.retire(sample)
        if self._reports is not None:
            with contextlib.suppress(zmq.ZMQError, ValueError):
                asyncio.get_running_loop().remove_reader(self._reports.getsockopt(zmq.FD))
        if self._metrics_server is not None:
            self._metrics_server.close()
            self._metrics_server = None
        if self._admin is not None:
            self._admin.close()
            self._admin = None
            if self._admin_inode is not None:
                remove_own_socket(self.config.admin_socket, self._admin_inode)
        self._release()
