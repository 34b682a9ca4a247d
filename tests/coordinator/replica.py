"""A ReplicaHandler for the coordinator tests that records what it is told."""

from __future__ import annotations

from coordinator.client import CoordinatorHandler


class RecordingHandler(CoordinatorHandler):
    def __init__(self) -> None:
        self.applied: list[tuple] = []
        self.resets: list[tuple[list, bool]] = []  # (entries, merge) per snapshot
        self.reset_requests: list[int | None] = []  # the request number each answered
        self.snapshot_requests: list[int] = []

    def apply_map_update(self, update: tuple, now: float) -> None:
        self.applied.append(update)

    def apply_map_updates(self, updates: list, now: float) -> None:
        for update in updates:
            self.apply_map_update(tuple(update), now)

    def reset_directory(self, entries: list, merge: bool, request: int | None, now: float) -> None:
        self.resets.append((entries, merge))
        self.reset_requests.append(request)

    def snapshot_requested(self, request: int, events_delivered: bool) -> None:
        self.snapshot_requests.append(request)

    def registrations(self) -> list[tuple[bytes, int]]:
        return []

    def set_peer_shards(self, shards: list[int], now: float) -> None:
        pass

    def after_input(self) -> None:
        pass
