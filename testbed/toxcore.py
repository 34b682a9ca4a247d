"""A minimal ctypes binding to libtoxcore (public ``tox.h`` API only): Debian's 0.2.18
by default, or another build loaded by its full path (``load_toxcore(path)``; the group
chat calls of 0.2.19+ are in :mod:`testbed.toxgroups`).

Just enough to run real toxcore clients that talk through one TCP relay: options with
UDP, LAN discovery, IPv6 and the client's own TCP relay server switched off,
``tox_add_tcp_relay``, ``tox_bootstrap`` (with UDP off, bootstrap nodes only serve as
onion path nodes 2 and 3), the ``tox_iterate`` loop, the client's DHT key (the key a
toxcore client presents on TCP relays, tcp-relay-protocol.md §14), its log, and what
two clients need to become friends and talk: address, friend requests, connection
status, messages and file transfers (see ``testbed/friends.py``).

No C compiler is needed: the library is loaded with :func:`ctypes.CDLL`.

Public API:

* :func:`load_toxcore` - the loaded library, or ``None`` when it is not installed.
* :func:`library_version` - ``(major, minor, patch)`` of a loaded library.
* :class:`ToxClient` - one ``Tox`` instance; not thread-safe, use it from one thread.
  Its ``on_*`` attributes receive toxcore's callbacks (set them before iterating).
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
ADDRESS_SIZE = 38  # TOX_ADDRESS_SIZE: public key, 4-byte nospam, 2-byte checksum
FILE_ID_LENGTH = 32  # TOX_FILE_ID_LENGTH
MAX_MESSAGE_LENGTH = 1372  # TOX_MAX_MESSAGE_LENGTH
MAX_CUSTOM_PACKET_SIZE = 1373  # TOX_MAX_CUSTOM_PACKET_SIZE

# enum values from tox.h (0.2.18); C enums are passed as int.
TOX_ERR_NEW_OK = 0
TOX_ERR_OPTIONS_NEW_OK = 0
TOX_ERR_BOOTSTRAP_OK = 0
TOX_CONNECTION_NONE = 0
TOX_CONNECTION_TCP = 1
TOX_CONNECTION_UDP = 2
CONNECTION_NAMES = ("NONE", "TCP", "UDP")
TOX_MESSAGE_TYPE_NORMAL = 0
TOX_FILE_KIND_DATA = 0
TOX_FILE_CONTROL_RESUME = 0
TOX_FILE_CONTROL_PAUSE = 1
TOX_FILE_CONTROL_CANCEL = 2
TOX_ERR_FILE_SEND_CHUNK_SENDQ = 7
UINT32_MAX = 0xFFFFFFFF  # the error return of tox_friend_add, tox_file_send, ...
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

_u8_p = ctypes.POINTER(ctypes.c_uint8)

#: typedef void tox_self_connection_status_cb(Tox *, Tox_Connection, void *)
SELF_CONNECTION_STATUS_CALLBACK = ctypes.CFUNCTYPE(None, _c_tox_p, ctypes.c_int, ctypes.c_void_p)
#: typedef void tox_friend_request_cb(Tox *, const uint8_t *public_key,
#:                                    const uint8_t *message, size_t length, void *)
FRIEND_REQUEST_CALLBACK = ctypes.CFUNCTYPE(
    None, _c_tox_p, _u8_p, _u8_p, ctypes.c_size_t, ctypes.c_void_p
)
#: typedef void tox_friend_connection_status_cb(Tox *, uint32_t friend_number,
#:                                              Tox_Connection, void *)
FRIEND_CONNECTION_STATUS_CALLBACK = ctypes.CFUNCTYPE(
    None, _c_tox_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
)
#: typedef void tox_friend_message_cb(Tox *, uint32_t friend_number, Tox_Message_Type,
#:                                    const uint8_t *message, size_t length, void *)
FRIEND_MESSAGE_CALLBACK = ctypes.CFUNCTYPE(
    None, _c_tox_p, ctypes.c_uint32, ctypes.c_int, _u8_p, ctypes.c_size_t, ctypes.c_void_p
)
#: typedef void tox_file_recv_cb(Tox *, uint32_t friend_number, uint32_t file_number,
#:     uint32_t kind, uint64_t file_size, const uint8_t *filename, size_t length, void *)
FILE_RECV_CALLBACK = ctypes.CFUNCTYPE(
    None,
    _c_tox_p,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_uint64,
    _u8_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
)
#: typedef void tox_file_recv_control_cb(Tox *, uint32_t friend_number,
#:                                       uint32_t file_number, Tox_File_Control, void *)
FILE_RECV_CONTROL_CALLBACK = ctypes.CFUNCTYPE(
    None, _c_tox_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int, ctypes.c_void_p
)
#: typedef void tox_file_chunk_request_cb(Tox *, uint32_t friend_number,
#:     uint32_t file_number, uint64_t position, size_t length, void *)
FILE_CHUNK_REQUEST_CALLBACK = ctypes.CFUNCTYPE(
    None,
    _c_tox_p,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_uint64,
    ctypes.c_size_t,
    ctypes.c_void_p,
)
#: typedef void tox_file_recv_chunk_cb(Tox *, uint32_t friend_number, uint32_t file_number,
#:     uint64_t position, const uint8_t *data, size_t length, void *)
FILE_RECV_CHUNK_CALLBACK = ctypes.CFUNCTYPE(
    None,
    _c_tox_p,
    ctypes.c_uint32,
    ctypes.c_uint32,
    ctypes.c_uint64,
    _u8_p,
    ctypes.c_size_t,
    ctypes.c_void_p,
)

_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "tox_version_major": (ctypes.c_uint32, []),
    "tox_version_minor": (ctypes.c_uint32, []),
    "tox_version_patch": (ctypes.c_uint32, []),
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
    "tox_bootstrap": (
        ctypes.c_bool,
        [_c_tox_p, ctypes.c_char_p, ctypes.c_uint16, ctypes.c_char_p, _c_int_p],
    ),
    "tox_self_get_address": (None, [_c_tox_p, ctypes.c_char_p]),
    "tox_self_get_connection_status": (ctypes.c_int, [_c_tox_p]),
    "tox_friend_add": (
        ctypes.c_uint32,
        [_c_tox_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, _c_int_p],
    ),
    "tox_friend_add_norequest": (ctypes.c_uint32, [_c_tox_p, ctypes.c_char_p, _c_int_p]),
    "tox_friend_get_connection_status": (ctypes.c_int, [_c_tox_p, ctypes.c_uint32, _c_int_p]),
    "tox_friend_send_message": (
        ctypes.c_uint32,
        [_c_tox_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, _c_int_p],
    ),
    "tox_file_send": (
        ctypes.c_uint32,
        [
            _c_tox_p,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_uint64,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            _c_int_p,
        ],
    ),
    "tox_file_control": (
        ctypes.c_bool,
        [_c_tox_p, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_int, _c_int_p],
    ),
    "tox_file_send_chunk": (
        ctypes.c_bool,
        [
            _c_tox_p,
            ctypes.c_uint32,
            ctypes.c_uint32,
            ctypes.c_uint64,
            ctypes.c_char_p,
            ctypes.c_size_t,
            _c_int_p,
        ],
    ),
    "tox_callback_self_connection_status": (None, [_c_tox_p, SELF_CONNECTION_STATUS_CALLBACK]),
    "tox_callback_friend_request": (None, [_c_tox_p, FRIEND_REQUEST_CALLBACK]),
    "tox_callback_friend_connection_status": (
        None,
        [_c_tox_p, FRIEND_CONNECTION_STATUS_CALLBACK],
    ),
    "tox_callback_friend_message": (None, [_c_tox_p, FRIEND_MESSAGE_CALLBACK]),
    "tox_callback_file_recv": (None, [_c_tox_p, FILE_RECV_CALLBACK]),
    "tox_callback_file_recv_control": (None, [_c_tox_p, FILE_RECV_CONTROL_CALLBACK]),
    "tox_callback_file_chunk_request": (None, [_c_tox_p, FILE_CHUNK_REQUEST_CALLBACK]),
    "tox_callback_file_recv_chunk": (None, [_c_tox_p, FILE_RECV_CHUNK_CALLBACK]),
}

# Loaded libraries by what was asked for (None = the installed one), and why not.
_libraries: dict[str | None, ctypes.CDLL] = {}
_library_errors: dict[str | None, str] = {}


def load_toxcore(path: str | None = None) -> ctypes.CDLL | None:
    """Load libtoxcore once and declare the signatures used here.

    ``path`` None: the installed ``libtoxcore.so.2`` (Debian's 0.2.18). A full path
    loads that file instead (e.g. a c-toxcore 0.2.23 build: the same soname, so it is
    never looked up by name; ``ctypes`` loads it with ``RTLD_LOCAL``, so two versions
    can live in one process); check :func:`library_version` of the result.
    Returns ``None`` when it cannot be loaded; :func:`toxcore_error` then says why.
    """
    if path in _libraries or path in _library_errors:
        return _libraries.get(path)
    candidates = [path] if path is not None else [LIBRARY_NAME]
    found = ctypes.util.find_library("toxcore") if path is None else None
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
        _libraries[path] = lib
        return lib
    _library_errors[path] = "; ".join(errors) or f"{LIBRARY_NAME} not found"
    return None


def toxcore_error(path: str | None = None) -> str:
    """Why :func:`load_toxcore` returned ``None`` (empty when it did not)."""
    load_toxcore(path)
    return _library_errors.get(path, "")


def library_version(lib: ctypes.CDLL) -> tuple[int, int, int]:
    """``tox_version_major/minor/patch()`` of a loaded library."""
    return (lib.tox_version_major(), lib.tox_version_minor(), lib.tox_version_patch())


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
    thread that created it (toxcore instances are not thread-safe). ``library``: a
    library from :func:`load_toxcore` (default: the installed one)."""

    def __init__(self, library: ctypes.CDLL | None = None) -> None:
        lib = library or load_toxcore()
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
        # Python handlers of toxcore's callbacks, called from inside iterate();
        # None = ignore the event. An exception in a handler is kept and raised by
        # iterate() (ctypes would otherwise print and swallow it).
        self.on_self_connection_status: Callable[[int], None] | None = None
        self.on_friend_request: Callable[[bytes, bytes], None] | None = None
        self.on_friend_connection_status: Callable[[int, int], None] | None = None
        self.on_friend_message: Callable[[int, int, bytes], None] | None = None
        self.on_file_recv: Callable[[int, int, int, int, bytes], None] | None = None
        self.on_file_recv_control: Callable[[int, int, int], None] | None = None
        self.on_file_chunk_request: Callable[[int, int, int, int], None] | None = None
        self.on_file_recv_chunk: Callable[[int, int, int, bytes], None] | None = None
        self._callback_errors: list[BaseException] = []
        self._install_callbacks()

    def _install_callbacks(self) -> None:
        """Register one C callback per event; the CFUNCTYPE objects are kept on
        ``self`` because toxcore keeps only the raw function pointer."""
        lib, tox = self._lib, self._handle

        def guarded(function: Callable[..., None]) -> Callable[..., None]:
            def call(*args: object) -> None:
                try:
                    function(*args)
                except BaseException as exc:
                    self._callback_errors.append(exc)

            return call

        def self_status(_tox: int | None, status: int, _user: int | None) -> None:
            if self.on_self_connection_status is not None:
                self.on_self_connection_status(status)

        def friend_request(
            _tox: int | None, public_key: object, message: object, length: int, _user: object
        ) -> None:
            if self.on_friend_request is not None:
                self.on_friend_request(
                    ctypes.string_at(public_key, PUBLIC_KEY_SIZE), ctypes.string_at(message, length)
                )

        def friend_status(_tox: int | None, friend: int, status: int, _user: object) -> None:
            if self.on_friend_connection_status is not None:
                self.on_friend_connection_status(friend, status)

        def friend_message(
            _tox: int | None, friend: int, kind: int, message: object, length: int, _user: object
        ) -> None:
            if self.on_friend_message is not None:
                self.on_friend_message(friend, kind, ctypes.string_at(message, length))

        def file_recv(
            _tox: int | None,
            friend: int,
            file: int,
            kind: int,
            size: int,
            name: object,
            name_length: int,
            _user: object,
        ) -> None:
            if self.on_file_recv is not None:
                filename = ctypes.string_at(name, name_length) if name_length else b""
                self.on_file_recv(friend, file, kind, size, filename)

        def file_control(
            _tox: int | None, friend: int, file: int, control: int, _user: object
        ) -> None:
            if self.on_file_recv_control is not None:
                self.on_file_recv_control(friend, file, control)

        def chunk_request(
            _tox: int | None, friend: int, file: int, position: int, length: int, _user: object
        ) -> None:
            if self.on_file_chunk_request is not None:
                self.on_file_chunk_request(friend, file, position, length)

        def recv_chunk(
            _tox: int | None,
            friend: int,
            file: int,
            position: int,
            data: object,
            length: int,
            _user: object,
        ) -> None:
            if self.on_file_recv_chunk is not None:
                chunk = ctypes.string_at(data, length) if length else b""
                self.on_file_recv_chunk(friend, file, position, chunk)

        self._callbacks = (
            SELF_CONNECTION_STATUS_CALLBACK(guarded(self_status)),
            FRIEND_REQUEST_CALLBACK(guarded(friend_request)),
            FRIEND_CONNECTION_STATUS_CALLBACK(guarded(friend_status)),
            FRIEND_MESSAGE_CALLBACK(guarded(friend_message)),
            FILE_RECV_CALLBACK(guarded(file_recv)),
            FILE_RECV_CONTROL_CALLBACK(guarded(file_control)),
            FILE_CHUNK_REQUEST_CALLBACK(guarded(chunk_request)),
            FILE_RECV_CHUNK_CALLBACK(guarded(recv_chunk)),
        )
        registrations = (
            lib.tox_callback_self_connection_status,
            lib.tox_callback_friend_request,
            lib.tox_callback_friend_connection_status,
            lib.tox_callback_friend_message,
            lib.tox_callback_file_recv,
            lib.tox_callback_file_recv_control,
            lib.tox_callback_file_chunk_request,
            lib.tox_callback_file_recv_chunk,
        )
        for register, callback in zip(registrations, self._callbacks, strict=True):
            register(tox, callback)

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

    def _self_bytes(self, function: str, size: int) -> bytes:
        """The ``size`` bytes a ``tox_self_get_*(tox, buffer)`` function writes."""
        buffer = ctypes.create_string_buffer(size)
        getattr(self._lib, function)(self._handle, buffer)
        return buffer.raw

    @property
    def dht_id(self) -> bytes:
        """The DHT public key: the key this client presents to TCP relays."""
        return self._self_bytes("tox_self_get_dht_id", PUBLIC_KEY_SIZE)

    @property
    def public_key(self) -> bytes:
        """The long-term Tox public key (not used on relays)."""
        return self._self_bytes("tox_self_get_public_key", PUBLIC_KEY_SIZE)

    def add_tcp_relay(self, host: str, port: int, public_key: bytes) -> None:
        """``tox_add_tcp_relay``; raises :class:`ToxError` on a Tox_Err_Bootstrap."""
        self._bootstrap_call("tox_add_tcp_relay", "relay", host, port, public_key)

    def iteration_interval(self) -> float:
        """Seconds toxcore wants until the next :meth:`iterate`."""
        return float(self._lib.tox_iteration_interval(self._handle)) / 1000.0

    def iterate(self) -> None:
        """One ``tox_iterate`` (network I/O, timers, callbacks); re-raises the first
        exception a Python callback handler raised during it."""
        self._lib.tox_iterate(self._handle, None)
        if self._callback_errors:
            error = self._callback_errors[0]
            self._callback_errors.clear()
            raise error

    def bootstrap(self, host: str, port: int, public_key: bytes) -> None:
        """``tox_bootstrap`` to a DHT node (UDP port). With UDP disabled the node is
        not contacted directly; it becomes a candidate onion path node."""
        self._bootstrap_call("tox_bootstrap", "node", host, port, public_key)

    def _bootstrap_call(
        self, function: str, what: str, host: str, port: int, public_key: bytes
    ) -> None:
        """``tox_bootstrap`` / ``tox_add_tcp_relay``: same arguments, same
        Tox_Err_Bootstrap; raises :class:`ToxError` when it fails."""
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise ValueError(f"{what} public key must be 32 bytes")
        error = ctypes.c_int(-1)
        ok = getattr(self._lib, function)(
            self._handle, host.encode(), port, public_key, ctypes.byref(error)
        )
        if not ok or error.value != TOX_ERR_BOOTSTRAP_OK:
            raise ToxError(f"{function} failed: Tox_Err_Bootstrap {error.value}")

    @property
    def address(self) -> bytes:
        """The 38-byte Tox address (public key, nospam, checksum) for friend requests."""
        return self._self_bytes("tox_self_get_address", ADDRESS_SIZE)

    @property
    def connection_status(self) -> int:
        """``tox_self_get_connection_status``: TOX_CONNECTION_NONE/TCP/UDP."""
        return int(self._lib.tox_self_get_connection_status(self._handle))

    def friend_add(self, address: bytes, message: bytes) -> int:
        """``tox_friend_add`` (sends a friend request); the friend number."""
        if len(address) != ADDRESS_SIZE:
            raise ValueError("a Tox address is 38 bytes")
        error = ctypes.c_int(-1)
        number = self._lib.tox_friend_add(
            self._handle, address, message, len(message), ctypes.byref(error)
        )
        if number == UINT32_MAX or error.value != 0:
            raise ToxError(f"tox_friend_add failed: Tox_Err_Friend_Add {error.value}")
        return int(number)

    def friend_add_norequest(self, public_key: bytes) -> int:
        """``tox_friend_add_norequest`` (accepts a request); the friend number."""
        if len(public_key) != PUBLIC_KEY_SIZE:
            raise ValueError("a public key is 32 bytes")
        error = ctypes.c_int(-1)
        number = self._lib.tox_friend_add_norequest(self._handle, public_key, ctypes.byref(error))
        if number == UINT32_MAX or error.value != 0:
            raise ToxError(f"tox_friend_add_norequest failed: Tox_Err_Friend_Add {error.value}")
        return int(number)

    def friend_connection_status(self, friend: int) -> int:
        """``tox_friend_get_connection_status``: TOX_CONNECTION_NONE/TCP/UDP."""
        error = ctypes.c_int(-1)
        status = self._lib.tox_friend_get_connection_status(
            self._handle, friend, ctypes.byref(error)
        )
        if error.value != 0:
            raise ToxError(f"tox_friend_get_connection_status: Tox_Err_Friend_Query {error.value}")
        return int(status)

    def send_message(self, friend: int, message: bytes) -> int:
        """``tox_friend_send_message`` (normal type); the message id."""
        error = ctypes.c_int(-1)
        message_id = self._lib.tox_friend_send_message(
            self._handle,
            friend,
            TOX_MESSAGE_TYPE_NORMAL,
            message,
            len(message),
            ctypes.byref(error),
        )
        if error.value != 0:
            raise ToxError(f"tox_friend_send_message failed: error {error.value}")
        return int(message_id)

    def file_send(
        self, friend: int, size: int, filename: bytes, file_id: bytes | None = None
    ) -> int:
        """``tox_file_send`` of a data file; the file number. Chunks are then asked
        for through ``on_file_chunk_request``."""
        if file_id is not None and len(file_id) != FILE_ID_LENGTH:
            raise ValueError("a file id is 32 bytes")
        error = ctypes.c_int(-1)
        number = self._lib.tox_file_send(
            self._handle,
            friend,
            TOX_FILE_KIND_DATA,
            size,
            file_id,
            filename,
            len(filename),
            ctypes.byref(error),
        )
        if number == UINT32_MAX or error.value != 0:
            raise ToxError(f"tox_file_send failed: Tox_Err_File_Send {error.value}")
        return int(number)

    def file_control(self, friend: int, file: int, control: int) -> None:
        """``tox_file_control`` (TOX_FILE_CONTROL_RESUME accepts an incoming file)."""
        error = ctypes.c_int(-1)
        ok = self._lib.tox_file_control(self._handle, friend, file, control, ctypes.byref(error))
        if not ok or error.value != 0:
            raise ToxError(f"tox_file_control failed: Tox_Err_File_Control {error.value}")

    def file_send_chunk(self, friend: int, file: int, position: int, data: bytes) -> bool:
        """``tox_file_send_chunk``; False when toxcore's send queue is full
        (TOX_ERR_FILE_SEND_CHUNK_SENDQ, 7): the same chunk is asked for again later."""
        error = ctypes.c_int(-1)
        ok = self._lib.tox_file_send_chunk(
            self._handle, friend, file, position, data, len(data), ctypes.byref(error)
        )
        if ok and error.value == 0:
            return True
        if error.value == TOX_ERR_FILE_SEND_CHUNK_SENDQ:
            return False
        raise ToxError(f"tox_file_send_chunk failed: Tox_Err_File_Send_Chunk {error.value}")

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


def own_socket_fds() -> dict[int, int]:
    """inode -> fd for every socket descriptor of this process (/proc/self/fd)."""
    found = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found[int(target[8:-1])] = int(fd)
    return found


def tcp_sockets_to(
    port: int, predicate: Callable[[TcpSocket], bool] | None = None
) -> list[TcpSocket]:
    """IPv4 TCP sockets of *this process* whose remote port is ``port`` (from /proc)."""
    own = own_socket_fds()
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
