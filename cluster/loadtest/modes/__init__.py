"""One runner per mode, all with the ``ModeRunner`` interface (``base``)."""

from __future__ import annotations

from cluster.loadtest.modes.base import ModeRunner
from cluster.loadtest.spec import WorkerSpec


def make_runner(spec: WorkerSpec) -> ModeRunner:
    """The runner of ``spec.options.mode``."""
    mode = spec.options.mode
    if mode in ("throughput", "oob"):
        from cluster.loadtest.modes.traffic import TrafficRunner

        return TrafficRunner(spec)
    if mode == "handshake":
        from cluster.loadtest.modes.handshake import HandshakeRunner

        return HandshakeRunner(spec)
    if mode == "idle":
        from cluster.loadtest.modes.idle import IdleRunner

        return IdleRunner(spec)
    raise ValueError(f"unknown mode {mode!r}")
