"""The state of one client connection on the relay (tcp-relay-protocol.md
§3-§6): its handshake progress, session channel, the 240 routing slots and
what it has to send. Plain data: the rules that change it are the relay's
(``relaycore.relay``), and for links to other shards ``relaycore.crossshard``.
"""

from __future__ import annotations

from enum import Enum

from relaycore.constants import NUM_CLIENT_CONNECTIONS, SERVER_PING_ID_SIZE
from relaycore.framing import SecureChannel
from relaycore.limits import address_key
from relaycore.onion import TokenBucket
from relaycore.shardlink import Epoch, RemotePeer

ZERO_PING_ID = bytes(SERVER_PING_ID_SIZE)


class ConnectionState(Enum):
    INCOMING = "incoming"  # waiting for the 128-byte hello
    UNCONFIRMED = "unconfirmed"  # replied; waiting for the first valid frame
    CONFIRMED = "confirmed"  # registered under its key, visible to others
    CLOSED = "closed"


class SlotState(Enum):
    REQUESTED = "requested"  # the owner asked for this key; not linked
    LINKED = "linked"  # both sides asked for each other


class Slot:
    """One of a connection's 240 routing slots (a free slot is ``None``).

    A LINKED slot points either at a local connection (``peer``, ``peer_slot``)
    or at a client on another shard (``remote``).
    """

    __slots__ = ("public_key", "state", "peer", "peer_slot", "remote")

    def __init__(self, public_key: bytes) -> None:
        self.public_key = public_key
        self.state = SlotState.REQUESTED
        self.peer: ServerConnection | None = None
        self.peer_slot = -1
        self.remote: RemotePeer | None = None

    def unlink(self) -> None:
        self.state = SlotState.REQUESTED
        self.peer = None
        self.peer_slot = -1
        self.remote = None


class ServerConnection:
    """Server-side state of one client connection."""

    __slots__ = (
        "serial",
        "peer_ip",
        "address",
        "opened_at",
        "state",
        "public_key",
        "channel",
        "_hello",
        "slots",
        "slot_of_key",
        "identifier",
        "epoch",
        "waiting_for",
        "waiting_since",
        "last_pinged",
        "ping_id",
        "outbox",
        "outbox_size",
        "transport_backlog",
        "peer_closed",
        "close_reason",
        "handle",
        "onion_budget",
        "over_limit",
        "more_input",
    )

    def __init__(self, serial: int, peer_ip: str, now: float) -> None:
        self.serial = serial
        self.peer_ip = peer_ip
        self.address = address_key(peer_ip)  # what per-address limits count
        self.opened_at = now
        self.state = ConnectionState.INCOMING
        self.public_key: bytes | None = None
        self.channel: SecureChannel | None = None
        self._hello = bytearray()
        self.slots: list[Slot | None] = [None] * NUM_CLIENT_CONNECTIONS
        self.slot_of_key: dict[bytes, int] = {}
        self.identifier = 0  # R-CONF-4, set on confirmation
        # Cluster-unique id of this connection: set on confirmation, renewed when
        # the coordinator dropped our shard while we lived (_renew_after_own_drop).
        self.epoch: Epoch = 0
        # While a routing request waits for the other shard's answer, this
        # connection's later frames stay unread, so its clients sees events in
        # the order one process would produce them (equivalence invariant).
        self.waiting_for: RemotePeer | None = None
        self.waiting_since = 0.0
        self.last_pinged = now
        self.ping_id = ZERO_PING_ID
        self.outbox: list[bytes] = []  # bytes for the adapter to write, in order
        self.outbox_size = 0
        self.transport_backlog = 0  # bytes the adapter's transport still holds
        self.peer_closed = False
        self.close_reason: str | None = None
        self.handle: object = None  # the adapter's own reference (its transport)
        self.onion_budget: TokenBucket | None = None  # made at its first type 8/10
        # Its unsent output would have passed output_hard_limit: nothing more
        # is queued for it, and it is killed when the current call ends.
        self.over_limit = False
        # receive() stopped at FRAMES_PER_RECEIVE with complete frames left.
        self.more_input = False

    def __repr__(self) -> str:
        key = self.public_key.hex()[:8] if self.public_key else "-"
        return f"<ServerConnection #{self.serial} {self.state.value} {key}>"

    @property
    def unsent(self) -> int:
        return self.outbox_size + self.transport_backlog

    def data_to_send(self) -> bytes:
        """What to write to this connection's socket now, in order (the
        adapter's one output call, for each connection ``take_dirty`` lists,
        and before it closes one of ``take_closed``); empty when nothing."""
        outbox = self.outbox
        if not outbox:
            return b""
        data = outbox[0] if len(outbox) == 1 else b"".join(outbox)
        outbox.clear()
        self.outbox_size = 0
        return data


class ConnectionRefused(Exception):
    """A new connection is over a configured limit; ``reason`` names it."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
