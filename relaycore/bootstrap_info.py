"""The bootstrap-info answer on the relay's UDP port, as tox-bootstrapd gives it:
status pages send a 78-byte packet starting with 0xF0 and read back the node's
version number and its message of the day (MOTD). Sans-IO: the worker's UDP
adapter decides where the answer goes (to the sender) and how often
(``RelayOptions.info_rate_per_worker``).

Facts (c-toxcore v0.2.23, ``other/bootstrap_node_packets.c`` ``handle_info_request``,
``other/bootstrap_daemon/src/global.h``, ``config.c``): a request is exactly 78
bytes, anything else is ignored; the answer is ``0xF0 || version (u32 big-endian) ||
MOTD bytes || NUL``, the MOTD with its NUL at most 256 bytes; the daemon's version
number is 1000000000 + major * 1000000 + minor * 1000 + patch.
"""

from __future__ import annotations

import string
import struct
from collections.abc import Mapping

BOOTSTRAP_INFO_PACKET_ID = 0xF0
INFO_REQUEST_LENGTH = 78
MAX_MOTD_LENGTH = 256  # bytes, the terminating NUL included
MAX_VERSION = 0xFFFFFFFF

#: Names a MOTD template may use ($name or ${name}); anything else stays as written.
#: Counters are those of the worker that answers (SO_REUSEPORT picks it by the
#: sender's address), not of the whole cluster.
MOTD_FIELDS = ("worker_uptime", "worker_connections", "worker_relayed")


def version_number(major: int, minor: int, patch: int) -> int:
    """tox-bootstrapd's version number, e.g. 1000002023 for 0.2.23."""
    return 1_000_000_000 + major * 1_000_000 + minor * 1_000 + patch


#: What we announce by default: the reference whose wire behaviour we follow.
DEFAULT_VERSION = version_number(0, 2, 23)


def is_info_request(datagram: bytes) -> bool:
    """A bootstrap-info request: 0xF0 and exactly 78 bytes (contents unused)."""
    return len(datagram) == INFO_REQUEST_LENGTH and datagram[0] == BOOTSTRAP_INFO_PACKET_ID


def render_motd(template: str, values: Mapping[str, object]) -> bytes:
    """The MOTD bytes (UTF-8, cut to 255 bytes at a character boundary, NUL added).
    ``$field`` placeholders of :data:`MOTD_FIELDS` are replaced; any other ``$``
    text is left as it is (string.Template.safe_substitute: no attribute access)."""
    text = string.Template(template).safe_substitute(
        {name: values[name] for name in MOTD_FIELDS if name in values}
    )
    encoded = text.encode("utf-8")[: MAX_MOTD_LENGTH - 1]
    encoded = encoded.decode("utf-8", errors="ignore").encode("utf-8")  # no half character
    return encoded + b"\x00"


def info_response(version: int, motd: bytes) -> bytes:
    """``0xF0 || version (u32 big-endian) || motd`` (``motd`` from :func:`render_motd`)."""
    if not 0 <= version <= MAX_VERSION:
        raise ValueError("version must fit in 32 bits")
    if not motd.endswith(b"\x00") or len(motd) > MAX_MOTD_LENGTH:
        raise ValueError("motd must end with NUL and be at most 256 bytes")
    return struct.pack(">BI", BOOTSTRAP_INFO_PACKET_ID, version) + motd


def format_uptime(seconds: float) -> str:
    """``"3d 4h 5m"`` style, whole minutes."""
    minutes = int(max(0.0, seconds)) // 60
    days, minutes = divmod(minutes, 24 * 60)
    hours, minutes = divmod(minutes, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m"
