"""The new group chats of c-toxcore >= 0.2.19 (``tox_group_*`` in ``tox.h``) on top of
:class:`testbed.toxcore.ToxClient`, for a libtoxcore loaded by path (0.2.23).

Only what the group scenario needs: create a public or private group, join a public
one by its chat id, invite a friend to a private one and accept that invite, send
group messages, and the callbacks for joining, peers and messages.

Public API:

* :func:`load_group_toxcore` - a 0.2.23 library by path with the group signatures
  declared; raises :class:`ToxError` for anything else (wrong version, no symbols).
* :class:`ToxGroupClient` - a :class:`ToxClient` with the group calls and callbacks.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

from testbed.toxcore import (
    TOX_MESSAGE_TYPE_NORMAL,
    UINT32_MAX,
    ToxClient,
    ToxError,
    library_version,
    load_toxcore,
    toxcore_error,
)

CHAT_ID_SIZE = 32  # TOX_GROUP_CHAT_ID_SIZE
PRIVACY_PUBLIC = 0  # TOX_GROUP_PRIVACY_STATE_PUBLIC
PRIVACY_PRIVATE = 1  # TOX_GROUP_PRIVACY_STATE_PRIVATE

_tox = ctypes.c_void_p
_u8_p = ctypes.POINTER(ctypes.c_uint8)
_err = ctypes.POINTER(ctypes.c_int)
_u32 = ctypes.c_uint32

#: typedef void tox_group_message_cb(Tox *, group, peer_id, type, const uint8_t *message,
#:                                   size_t length, Tox_Group_Message_Id, void *)
GROUP_MESSAGE_CALLBACK = ctypes.CFUNCTYPE(
    None, _tox, _u32, _u32, ctypes.c_int, _u8_p, ctypes.c_size_t, _u32, ctypes.c_void_p
)
#: typedef void tox_group_peer_join_cb(Tox *, group, peer_id, void *)
GROUP_PEER_JOIN_CALLBACK = ctypes.CFUNCTYPE(None, _tox, _u32, _u32, ctypes.c_void_p)
#: typedef void tox_group_self_join_cb(Tox *, group, void *)
GROUP_SELF_JOIN_CALLBACK = ctypes.CFUNCTYPE(None, _tox, _u32, ctypes.c_void_p)
#: typedef void tox_group_join_fail_cb(Tox *, group, Tox_Group_Join_Fail, void *)
GROUP_JOIN_FAIL_CALLBACK = ctypes.CFUNCTYPE(None, _tox, _u32, ctypes.c_int, ctypes.c_void_p)
#: typedef void tox_group_invite_cb(Tox *, friend, const uint8_t *invite_data, size_t,
#:                                  const uint8_t *group_name, size_t, void *)
GROUP_INVITE_CALLBACK = ctypes.CFUNCTYPE(
    None, _tox, _u32, _u8_p, ctypes.c_size_t, _u8_p, ctypes.c_size_t, ctypes.c_void_p
)

_GROUP_SIGNATURES: dict[str, tuple[object, list[object]]] = {
    "tox_group_new": (
        _u32,
        [_tox, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
         ctypes.c_size_t, _err],
    ),
    "tox_group_join": (
        _u32,
        [_tox, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
         ctypes.c_size_t, _err],
    ),
    "tox_group_is_connected": (ctypes.c_bool, [_tox, _u32, _err]),
    "tox_group_get_chat_id": (ctypes.c_bool, [_tox, _u32, ctypes.c_char_p, _err]),
    "tox_group_send_message": (
        _u32, [_tox, _u32, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, _err]
    ),
    "tox_group_invite_friend": (ctypes.c_bool, [_tox, _u32, _u32, _err]),
    "tox_group_invite_accept": (
        _u32,
        [_tox, _u32, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t,
         ctypes.c_char_p, ctypes.c_size_t, _err],
    ),
    "tox_callback_group_message": (None, [_tox, GROUP_MESSAGE_CALLBACK]),
    "tox_callback_group_peer_join": (None, [_tox, GROUP_PEER_JOIN_CALLBACK]),
    "tox_callback_group_self_join": (None, [_tox, GROUP_SELF_JOIN_CALLBACK]),
    "tox_callback_group_join_fail": (None, [_tox, GROUP_JOIN_FAIL_CALLBACK]),
    "tox_callback_group_invite": (None, [_tox, GROUP_INVITE_CALLBACK]),
}  # fmt: skip


def load_group_toxcore(path: str, version: tuple[int, int, int]) -> ctypes.CDLL:
    """The library at ``path``, checked to be ``version``, with the group API declared."""
    lib = load_toxcore(path)
    if lib is None:
        raise ToxError(toxcore_error(path))
    found = library_version(lib)
    if found != version:
        raise ToxError(f"{path} is toxcore {found}, expected {version}")
    try:
        for symbol, (restype, argtypes) in _GROUP_SIGNATURES.items():
            function = getattr(lib, symbol)
            function.restype = restype
            function.argtypes = argtypes
    except AttributeError as exc:
        raise ToxError(f"{path}: {exc}") from None
    return lib


def _checked(what: str, error: ctypes.c_int) -> None:
    if error.value != 0:
        raise ToxError(f"{what} failed: error {error.value}")


class ToxGroupClient(ToxClient):
    """A TCP-only :class:`ToxClient` of a library from :func:`load_group_toxcore`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library)
        # Python handlers, called from inside iterate(); None = ignore.
        self.on_group_message: Callable[[int, int, bytes], None] | None = None
        self.on_group_peer_join: Callable[[int, int], None] | None = None
        self.on_group_self_join: Callable[[int], None] | None = None
        self.on_group_join_fail: Callable[[int, int], None] | None = None
        self.on_group_invite: Callable[[int, bytes], None] | None = None
        self._install_group_callbacks()

    def _install_group_callbacks(self) -> None:
        lib, tox = self._lib, self._handle
        errors = self._callback_errors

        def guarded(function: Callable[..., None]) -> Callable[..., None]:
            def call(*args: object) -> None:
                try:
                    function(*args)
                except BaseException as exc:
                    errors.append(exc)

            return call

        def message(
            _tox: object, group: int, peer: int, _kind: int, text: object, length: int,
            _message_id: int, _user: object,
        ) -> None:  # fmt: skip
            if self.on_group_message is not None:
                self.on_group_message(group, peer, ctypes.string_at(text, length))

        def peer_join(_tox: object, group: int, peer: int, _user: object) -> None:
            if self.on_group_peer_join is not None:
                self.on_group_peer_join(group, peer)

        def self_join(_tox: object, group: int, _user: object) -> None:
            if self.on_group_self_join is not None:
                self.on_group_self_join(group)

        def join_fail(_tox: object, group: int, reason: int, _user: object) -> None:
            if self.on_group_join_fail is not None:
                self.on_group_join_fail(group, reason)

        def invite(
            _tox: object, friend: int, data: object, length: int, _name: object,
            _name_length: int, _user: object,
        ) -> None:  # fmt: skip
            if self.on_group_invite is not None:
                self.on_group_invite(friend, ctypes.string_at(data, length))

        self._group_callbacks = (
            GROUP_MESSAGE_CALLBACK(guarded(message)),
            GROUP_PEER_JOIN_CALLBACK(guarded(peer_join)),
            GROUP_SELF_JOIN_CALLBACK(guarded(self_join)),
            GROUP_JOIN_FAIL_CALLBACK(guarded(join_fail)),
            GROUP_INVITE_CALLBACK(guarded(invite)),
        )
        registrations = (
            lib.tox_callback_group_message,
            lib.tox_callback_group_peer_join,
            lib.tox_callback_group_self_join,
            lib.tox_callback_group_join_fail,
            lib.tox_callback_group_invite,
        )
        for register, callback in zip(registrations, self._group_callbacks, strict=True):
            register(tox, callback)

    def group_new(self, privacy: int, group_name: bytes, self_name: bytes) -> int:
        """``tox_group_new``; the group number."""
        error = ctypes.c_int(-1)
        number = self._lib.tox_group_new(
            self._handle, privacy, group_name, len(group_name), self_name, len(self_name),
            ctypes.byref(error),
        )  # fmt: skip
        _checked("tox_group_new", error)
        return int(number)

    def group_join(self, chat_id: bytes, self_name: bytes) -> int:
        """``tox_group_join`` by chat id, no password; the group number."""
        if len(chat_id) != CHAT_ID_SIZE:
            raise ValueError("a chat id is 32 bytes")
        error = ctypes.c_int(-1)
        number = self._lib.tox_group_join(
            self._handle, chat_id, self_name, len(self_name), None, 0, ctypes.byref(error)
        )
        _checked("tox_group_join", error)
        return int(number)

    def group_is_connected(self, group: int) -> bool:
        error = ctypes.c_int(-1)
        connected = bool(self._lib.tox_group_is_connected(self._handle, group, ctypes.byref(error)))
        _checked("tox_group_is_connected", error)
        return connected

    def group_chat_id(self, group: int) -> bytes:
        buffer = ctypes.create_string_buffer(CHAT_ID_SIZE)
        error = ctypes.c_int(-1)
        self._lib.tox_group_get_chat_id(self._handle, group, buffer, ctypes.byref(error))
        _checked("tox_group_get_chat_id", error)
        return buffer.raw

    def group_send_message(self, group: int, text: bytes) -> None:
        error = ctypes.c_int(-1)
        self._lib.tox_group_send_message(
            self._handle, group, TOX_MESSAGE_TYPE_NORMAL, text, len(text), ctypes.byref(error)
        )
        _checked("tox_group_send_message", error)

    def group_invite_friend(self, group: int, friend: int) -> None:
        error = ctypes.c_int(-1)
        self._lib.tox_group_invite_friend(self._handle, group, friend, ctypes.byref(error))
        _checked("tox_group_invite_friend", error)

    def group_invite_accept(self, friend: int, invite: bytes, self_name: bytes) -> int:
        """``tox_group_invite_accept`` (no password); the group number."""
        error = ctypes.c_int(-1)
        number = self._lib.tox_group_invite_accept(
            self._handle, friend, invite, len(invite), self_name, len(self_name), None, 0,
            ctypes.byref(error),
        )  # fmt: skip
        _checked("tox_group_invite_accept", error)
        if number == UINT32_MAX:
            raise ToxError("tox_group_invite_accept returned no group")
        return int(number)
