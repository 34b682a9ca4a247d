"""A minimal ctypes binding to Debian's libtoxcore 0.2.18 (public ``tox.h`` API only).

Just enough to run a real toxcore client that talks to one TCP relay: options with
UDP, LAN discovery, IPv6 and the client's own TCP relay server switched off,
``tox_add_tcp_relay``, the ``tox_iterate`` loop, the client's DHT key (the key a
toxcore client presents on TCP relays, tcp-relay-protocol.md §14) and its log.

No C compiler is needed: the library is loaded with :func:`ctypes.CDLL`.

Public API:

* :func:`load_toxcore` - the loaded library, or ``None`` when it is not installed.
* :class:`ToxClient` - one ``Tox`` instance; not thread-safe, use it from one thread.
* :class:`ToxLoop` - a :class:`ToxClient` created, iterated and killed in a worker thread
  (so an in-process relay on the test's event loop keeps running meanwhile).
* :func:`tcp_sockets_to` - this process's TCP sockets connected to a loopback port,
  read from ``/proc`` (for relays we cannot observe from inside, e.g. tox-bootstrapd).
* :func:`tcp_byte_counts` - bytes sent/received on one of those sockets (``TCP_INFO``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

LIBRARY_NAME = "libtoxcore.so.2"
PUBLIC_KEY_SIZE = 32  # TOX_PUBLIC_KEY_SIZE

# enum values from tox.h (0.2.18); C enums are passed as int.
TOX_ERR_NEW_OK = 0
TOX_ERR_OPTIONS_NEW_OK = 0
TOX_ERR_BOOTSTRAP_OK = 0
LOG_LEVEL_NAMES = ("TRACE", "DEBUG", "INFO", "WARNING", "ERROR")

_c_tox_p = ctypes.c_void_p
_c_options_p = ctypes.c_void_p
_c_int_p = ctypes.POINTER(ctypes.c_int)

#: typedef void tox_log_cb(Tox *, Tox_Log_Level, const char *file, uint32_t line,
#:                         const char *func, const char *message, void *user_data)
LOG_CALLBACK = ctypes.CFUNCTYPE(
    None,
    _c_tox_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint32,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_void_p,
)

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "tox_options_new": (_c_options_p, [_c_int_p]),
    "tox_options_free": (None, [_c_options_p]),
    "tox_options_set_ipv6_enabled": (None, [_c_options_p, ctypes.c_bool]),
    "tox_options_set_udp_enabled": (None, [_c_options_p, ctypes.c_bool]),
    "tox_options_set_local_discovery_enabled": (None, [_c_options_p, ctypes.c_bool]),
    "tox_options_set_hole_punching_enabled": (None, [_c_options_p, ctypes.c_bool]),
    "tox_options_set_tcp_port": (None, [_c_options_p, ctypes.c_uint16]),
    "tox_options_set_log_callback": (None, [_c_options_p, LOG_CALLBACK]),
    "tox_new": (_c_tox_p, [_c_options_p, _c_int_p]),
    "tox_kill": (None, [_c_tox_p]),
    "tox_iterate": (None, [_c_tox_p, ctypes.c_void_p]),
    "tox_iteration_interval": (ctypes.c_uint32, [_c_tox_p]),
    "tox_add_tcp_relay": (
        ctypes.c_bool,
        [_c_tox_p, ctypes.c_char_p, ctypes.c_uint16, ctypes.c_char_p, _c_int_p],
    ),
    "tox_self_get_dht_id": (None, [_c_tox_p, ctypes.c_char_p]),
    "tox_self_get_public_key": (None, [_c_tox_p, ctypes.c_char_p]),
}

_library: ctypes.CDLL | None = None
_library_error: str | None = None


def load_toxcore() -> ctypes.CDLL | None:
    """Load ``libtoxcore.so.2`` once and declare the signatures used here.

    Returns ``None`` when the library (package ``libtoxcore2``) is not installed;
    :func:`toxcore_error` then says why.
    """
    global _library, _library_error
    if _library is not None or _library_error is not None:
        return _library
    candidates = [LIBRARY_NAME]
    found = ctypes.util.find_library("toxcore")
    if found and found not in candidates:
        candidates.append(found)
    errors = []
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            errors.append(f"{name}: {exc}")
            continue
        try:
            for symbol, (restype, argtypes) in _SIGNATURES.items():
                function = getattr(lib, symbol)
                function.restype = restype
                function.argtypes = argtypes
        except AttributeError as exc:
            errors.append(f"{name}: {exc}")
            continue
        _library = lib
        return lib
    _library_error = "; ".join(errors) or f"{LIBRARY_NAME} not found"
    return None


def toxcore_error() -> str:
    """Why :func:`load_toxcore` returned ``None`` (empty when it did not)."""
    load_toxcore()
    return _library_error or ""


@dataclass(frozen=True)
class LogRecord:
    """One message of toxcore's logger (levels as compiled into the library)."""

    at: float  # time.monotonic()
    level: str
    file: str
    line: int
    func: str
    message: str


class ToxError(RuntimeError):
    """A tox.h call reported an error code."""


class ToxClient:
    """One ``Tox`` instance restricted to TCP: no UDP, no LAN discovery, IPv4 only,
    no own TCP server (``tcp_port`` 0). Every method must be called from the
    thread that created it (toxcore instances are not thread-safe)."""

    def __init__(self) -> None:
        lib = load_toxcore()
        if lib is None:
            raise ToxError(toxcore_error())
        self._lib = lib
        self.logs: list[LogRecord] = []
        self._logs_lock = threading.Lock()
        # Keep the callback object alive as long as the Tox instance (or ctypes frees it).
        self._log_callback = LOG_CALLBACK(self._on_log)
        error = ctypes.c_int(-1)
        options = lib.tox_options_new(ctypes.byref(error))
        if not options or error.value != TOX_ERR_OPTIONS_NEW_OK:
            raise ToxError(f"tox_options_new failed: error {error.value}")
        try:
            lib.tox_options_set_ipv6_enabled(options, False)
            lib.tox_options_set_udp_enabled(options, False)
            lib.tox_options_set_local_discovery_enabled(options, False)
            lib.tox_options_set_hole_punching_enabled(options, False)
            lib.tox_options_set_tcp_port(options, 0)
            lib.tox_options_set_log_callback(options, self._log_callback)
            error.value = -1
            tox = lib.tox_new(options, ctypes.byref(error))
        finally:
            lib.tox_options_free(options)
        if not tox or error.value != TOX_ERR_NEW_OK:
            raise ToxError(f"tox_new failed: Tox_Err_New {error.value}")
        self._tox: int | None = tox

    def _on_log(
        self,
        _tox: int | None,
        level: int,
        file: bytes | None,
        line: int,
        func: bytes | None,
        message: bytes | None,
        _user_data: int | None,
    ) -> None:
        record = LogRecord(
            time.monotonic(),
            LOG_LEVEL_NAMES[level] if 0 <= level < len(LOG_LEVEL_NAMES) else str(level),
            (file or b"").decode(errors="replace"),
            line,
            (func or b"").decode(errors="replace"),
            (message or b"").decode(errors="replace"),
        )
        with self._logs_lock:
            self.logs.append(record)

    @property
    def _handle(self) -> int:
        if self._tox is None:
            raise ToxError("the Tox instance was killed")
        return self._tox

    @property
    def dht_id(self) -> bytes:
        """The DHT public key: the key this client presents to TCP relays."""
        buffer = ctypes.create_string_buffer(PUBLIC_KEY_SIZE)
        self._lib.tox_self_get_dht_id(self._handle, buffer)
        return buffer.raw

    @property
    def public_key(self) -> bytes:
        """The long-term Tox public key (not used on relays)."""
        buffer = ctypes.create_string_buffer(PUBLIC_KEY_SIZE)
        self._lib.tox_self_get_public_key(self._handle, buffer)
        return buffer.raw

    def add_tcp_relay(self, host: str, port: int, public_key: bytes) -> None:
        """``tox_add_tcp_relay``; raises :class:`ToxError` on a Tox_Err_Bootstrap."""
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise ValueError("relay public key must be 32 bytes")
        error = ctypes.c_int(-1)
        ok = self._lib.tox_add_tcp_relay(
            self._handle, host.encode(), port, public_key, ctypes.byref(error)
        )
        if not ok or error.value != TOX_ERR_BOOTSTRAP_OK:
            raise ToxError(f"tox_add_tcp_relay failed: Tox_Err_Bootstrap {error.value}")

    def iteration_interval(self) -> float:
        """Seconds toxcore wants until the next :meth:`iterate`."""
        return float(self._lib.tox_iteration_interval(self._handle)) / 1000.0

    def iterate(self) -> None:
        """One ``tox_iterate`` (network I/O, timers, callbacks)."""
        self._lib.tox_iterate(self._handle, None)

    def kill(self) -> None:
        """``tox_kill``: closes every socket at once. Idempotent."""
        tox, self._tox = self._tox, None
        if tox is not None:
            self._lib.tox_kill(tox)

    def log_lines(self) -> list[str]:
        """The log so far, one formatted line per record."""
        with self._logs_lock:
            records = list(self.logs)
        return [f"{r.level} {r.file}:{r.line} {r.func}: {r.message}" for r in records]


class ToxLoop:
    """A :class:`ToxClient` living in its own thread: created there, bootstrapped
    to one TCP relay, iterated every ``tox_iteration_interval`` until :meth:`stop`
    or ``max_seconds`` (a hard bound), then killed there.

    ``dht_id`` and ``killed_at`` (``time.monotonic()`` right after ``tox_kill``
    returned) become available through :meth:`wait_started` / :meth:`stop`.
    """

    def __init__(
        self,
        host: str,
        port: int,
        relay_public_key: bytes,
        max_seconds: float = 25.0,
    ) -> None:
        self.host = host
        self.port = port
        self.relay_public_key = relay_public_key
        self.max_seconds = max_seconds
        self.dht_id: bytes | None = None
        self.killed_at: float | None = None
        self.iterations = 0
        self.max_interval = 0.0
        self._client: ToxClient | None = None
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._stop = threading.Event()
        self._resume_at = 0.0  # time.monotonic() before which the loop does not iterate
        self._thread = threading.Thread(target=self._run, name="tox-loop", daemon=True)

    def start(self) -> ToxLoop:
        self._thread.start()
        return self

    def __enter__(self) -> ToxLoop:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        client: ToxClient | None = None
        try:
            client = self._client = ToxClient()
            self.dht_id = client.dht_id
            client.add_tcp_relay(self.host, self.port, self.relay_public_key)
            self._started.set()
            deadline = time.monotonic() + self.max_seconds
            while not self._stop.is_set() and time.monotonic() < deadline:
                if time.monotonic() < self._resume_at:
                    self._stop.wait(0.01)
                    continue
                client.iterate()
                self.iterations += 1
                interval = client.iteration_interval()
                self.max_interval = max(self.max_interval, interval)
                self._stop.wait(min(interval, 0.05))
        except BaseException as exc:  # reported to the test thread by wait_started/stop
            self.error = exc
        finally:
            if client is not None:
                client.kill()
                self.killed_at = time.monotonic()
            self._started.set()

    def wait_started(self, timeout: float = 5.0) -> bytes:
        """Block until the client exists and has the relay; its DHT key."""
        if not self._started.wait(timeout):
            raise TimeoutError("toxcore client did not start")
        if self.error is not None:
            raise self.error
        assert self.dht_id is not None
        return self.dht_id

    def pause(self, seconds: float) -> None:
        """Stop calling ``tox_iterate`` for ``seconds`` (the client then neither reads
        nor answers anything: a client that hangs, as seen by the relay)."""
        self._resume_at = time.monotonic() + seconds

    @property
    def log_lines(self) -> list[str]:
        """toxcore's log so far (Debian's build logs nothing in these tests'
        normal runs; kept for failure messages)."""
        client = self._client
        return client.log_lines() if client is not None else []

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self, timeout: float = 5.0) -> float:
        """Ask the thread to kill the client and wait; ``killed_at``."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("toxcore loop did not stop")
        if self.error is not None:
            raise self.error
        assert self.killed_at is not None
        return self.killed_at


@dataclass(frozen=True)
class TcpSocket:
    """One row of ``/proc/net/tcp`` for a socket owned by this process."""

    local_port: int
    remote_port: int
    state: str  # "ESTABLISHED", "SYN_SENT", ...
    tx_queue: int
    rx_queue: int
    inode: int


_TCP_STATES = {
    "01": "ESTABLISHED",
    "02": "SYN_SENT",
    "03": "SYN_RECV",
    "04": "FIN_WAIT1",
    "05": "FIN_WAIT2",
    "06": "TIME_WAIT",
    "07": "CLOSE",
    "08": "CLOSE_WAIT",
    "09": "LAST_ACK",
    "0A": "LISTEN",
    "0B": "CLOSING",
}


def _own_socket_inodes() -> set[int]:
    inodes: set[int] = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def tcp_sockets_to(
    port: int, predicate: Callable[[TcpSocket], bool] | None = None
) -> list[TcpSocket]:
    """IPv4 TCP sockets of *this process* whose remote port is ``port`` (from /proc)."""
    own = _own_socket_inodes()
    result = []
    for line in Path("/proc/self/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10:
            continue
        inode = int(cols[9])
        if inode not in own:
            continue
        remote_port = int(cols[2].rpartition(":")[2], 16)
        if remote_port != port:
            continue
        tx, _, rx = cols[4].partition(":")
        sock = TcpSocket(
            local_port=int(cols[1].rpartition(":")[2], 16),
            remote_port=remote_port,
            state=_TCP_STATES.get(cols[3], cols[3]),
            tx_queue=int(tx, 16),
            rx_queue=int(rx, 16),
            inode=inode,
        )
        if predicate is None or predicate(sock):
            result.append(sock)
    return result


# struct tcp_info (linux/tcp.h): u64 tcpi_bytes_received at offset 128 (Linux >= 4.1),
# u64 tcpi_bytes_sent at offset 200 (Linux >= 5.5). Both count payload bytes only.
_TCPI_BYTES_RECEIVED = 128
_TCPI_BYTES_SENT = 200
_TCP_INFO_SIZE = 256


def tcp_byte_counts(inode: int) -> tuple[int, int] | None:
    """``(bytes_sent, bytes_received)`` of this process's socket ``inode``, from
    ``getsockopt(TCP_INFO)`` on a duplicate of its descriptor; ``None`` when the
    socket is gone or the kernel's ``tcp_info`` is too old to carry both fields."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != f"socket:[{inode}]":
                continue
            duplicate = os.dup(int(fd))
        except OSError:
            continue
        try:
            if os.fstat(duplicate).st_ino != inode:  # fd number reused meanwhile
                continue
            with socket.socket(fileno=duplicate) as sock:
                duplicate = -1  # owned (and closed) by ``sock``; the original stays open
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
        except OSError:
            continue
        finally:
            if duplicate >= 0:
                os.close(duplicate)
        if len(info) < _TCPI_BYTES_SENT + 8:
            return None
        (received,) = struct.unpack_from("=Q", info, _TCPI_BYTES_RECEIVED)
        (sent,) = struct.unpack_from("=Q", info, _TCPI_BYTES_SENT)
        return sent, received
    return None
