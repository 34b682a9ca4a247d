"""The authoritative routing map of a cluster, sans-IO: public key ->
(shard, epoch), and the sequenced updates every shard applies to its replica.

The coordinator process (``coordinator.service``) feeds it the workers'
REGISTER / UNREGISTER events and shard deaths and publishes what it returns.
Same key registered twice: the later registration wins and the update names
the one it replaced, so the shard holding that one closes it (R-CONF-3).
"""

from __future__ import annotations

from relaycore.shardlink import Epoch, MapUpdate, Registry, ShardId


class Directory:
    def __init__(self) -> None:
        self.entries: dict[bytes, tuple[ShardId, Epoch]] = {}
        self.sequence = 0  # number of the last update published
        self.resyncs = 0

    def _publish(self, update: tuple) -> tuple[int, tuple]:
        self.sequence += 1
        return self.sequence, update

    def apply_event(self, shard: ShardId, event: tuple) -> list[tuple[int, tuple]]:
        """A REGISTER / UNREGISTER from ``shard``; returns the updates to publish."""
        kind, public_key, epoch = event
        if kind == Registry.REGISTER:
            return self.register(shard, public_key, epoch)
        if kind == Registry.UNREGISTER:
            return self.unregister(shard, public_key, epoch)
        raise ValueError(f"unknown registry event {kind!r}")

    def register(self, shard: ShardId, public_key: bytes, epoch: Epoch) -> list[tuple[int, tuple]]:
        current = self.entries.get(public_key)
        if current == (shard, epoch):
            return []  # a re-registration after a coordinator restart
        self.entries[public_key] = (shard, epoch)
        replaced_shard, replaced_epoch = current if current is not None else (None, None)
        return [
            self._publish((MapUpdate.SET, public_key, shard, epoch, replaced_shard, replaced_epoch))
        ]

    def unregister(
        self, shard: ShardId, public_key: bytes, epoch: Epoch
    ) -> list[tuple[int, tuple]]:
        if self.entries.get(public_key) != (shard, epoch):
            return []  # already replaced by a newer connection
        del self.entries[public_key]
        return [self._publish((MapUpdate.DEL, public_key, shard, epoch))]

    def drop_shard(self, shard: ShardId, exited: bool) -> list[tuple[int, tuple]]:
        """A worker died (``exited``: its process is gone) or fell silent:
        every key it held goes, in one update."""
        for public_key in [k for k, (s, _) in self.entries.items() if s == shard]:
            del self.entries[public_key]
        return [self._publish((MapUpdate.DROP_SHARD, shard, exited))]

    def snapshot(self) -> tuple[int, list[tuple[bytes, ShardId, Epoch]]]:
        """(sequence, entries) for a replica that missed updates."""
        return self.sequence, [(k, s, e) for k, (s, e) in self.entries.items()]
