"""What a relay process asks of the clients' world beyond it.

``Neighbours`` is the set of hooks ``relaycore.relay.RelayServer`` calls when
a connection is confirmed or closed, a slot requested or released, data or
an OOB is for a key not held here, or a UDP reply names another shard. In a
cluster ``relaycore.crossshard.CrossShard`` implements them; a stand-alone
relay's neighbour is ``Alone``: no other shard holds any client.
"""

from __future__ import annotations

from collections import Counter
from typing import Protocol

from relaycore.connection import ServerConnection, Slot
from relaycore.errors import InvariantBroken
from relaycore.onion import ReturnPath
from relaycore.shardlink import RemotePeer


class Neighbours(Protocol):
    """What the relay tells the clients' world beyond this process, and asks
    of it (``relaycore.crossshard.CrossShard`` in a cluster)."""

    def next_epoch(self) -> int: ...
    @property
    def epochs_left(self) -> int: ...
    def confirmed(self, connection: ServerConnection) -> None: ...
    def closed(self, connection: ServerConnection) -> None: ...
    def slot_requested(self, connection: ServerConnection, public_key: bytes) -> None: ...
    def request_remote(
        self, connection: ServerConnection, public_key: bytes, now: float
    ) -> None: ...
    def slot_released(self, connection: ServerConnection, slot: Slot) -> None: ...
    def take_over(self, connection: ServerConnection, index: int) -> None: ...
    def send_data(
        self, connection: ServerConnection, remote: RemotePeer, payloads: list[bytes]
    ) -> None: ...
    def send_oob(
        self, connection: ServerConnection, destination: bytes, data: bytes, now: float
    ) -> None: ...
    def reply_elsewhere(self, path: ReturnPath, plain: bytes) -> bool: ...
    def tick(self, now: float) -> None: ...
    def check_invariants(self) -> None: ...


class Alone:
    """A stand-alone relay's neighbour: no other shard holds any client."""

    def __init__(self, stats: Counter[str]) -> None:
        self.stats = stats
        self._epochs = 0  # a connection's id for UDP return paths

    def next_epoch(self) -> int:
        self._epochs += 1
        return self._epochs

    @property
    def epochs_left(self) -> int:
        return (1 << 64) - 1 - self._epochs

    def send_oob(
        self, connection: ServerConnection, destination: bytes, data: bytes, now: float
    ) -> None:
        self.stats["dropped.oob_offline"] += 1  # R-OOB-3

    def reply_elsewhere(self, path: ReturnPath, plain: bytes) -> bool:
        return False

    def send_data(
        self, connection: ServerConnection, remote: RemotePeer, payloads: list[bytes]
    ) -> None:
        raise InvariantBroken("a link to another shard in a stand-alone relay")

    def take_over(self, connection: ServerConnection, index: int) -> None:
        raise InvariantBroken("a link to another shard in a stand-alone relay")

    def confirmed(self, connection: ServerConnection) -> None:
        pass

    def closed(self, connection: ServerConnection) -> None:
        pass

    def slot_requested(self, connection: ServerConnection, public_key: bytes) -> None:
        pass

    def request_remote(self, connection: ServerConnection, public_key: bytes, now: float) -> None:
        pass

    def slot_released(self, connection: ServerConnection, slot: Slot) -> None:
        pass

    def tick(self, now: float) -> None:
        pass

    def check_invariants(self) -> None:
        pass
