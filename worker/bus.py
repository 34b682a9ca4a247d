"""The peer bus: link messages between shards over ZeroMQ ipc:// sockets.

Each shard binds one PULL socket (``shard-<id>.sock`` in the cluster's private
runtime directory) and connects one PUSH socket per destination shard, on
first use; one socket per direction keeps the messages of a pair of shards in
order. Messages produced during one event-loop turn are batched per
destination (msgpack) and sent once, without blocking: when a destination is
stuck past the high-water mark the batch is dropped and counted, never
waited for. Same-shard traffic never gets here.

The reader survives anything a batch holds: what does not decode is counted
(``undecodable``), an exception from ``deliver`` is contained (``on_error``)
and the next batch is read. ZeroMQ's descriptor only signals a change, so a
reader that stopped early would never be woken again: it drains the socket,
or comes back on the next loop turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import msgpack
import zmq

from runtime.ipc import bind_ipc, shard_endpoint

log = logging.getLogger("worker.bus")

# Bounds: a batch holds at most MAX_BATCH_BYTES of payload (larger turns are
# split), and at most SEND_HIGH_WATER_MARK batches wait per destination (plus
# RECEIVE_HIGH_WATER_MARK at a receiver), so a stuck peer costs a sender at
# most about 256 x 64 KiB = 16 MiB before its batches are dropped and counted.
MAX_BATCH_BYTES = 64 * 1024
SEND_HIGH_WATER_MARK = 256
RECEIVE_HIGH_WATER_MARK = 1024
RECEIVE_BATCHES_PER_TURN = 256


def _payload_size(last: object) -> int:
    """Bytes a message's last field carries: bytes, or the payloads of a
    DATA message (relaycore.crossshard.send_data)."""
    if isinstance(last, bytes):
        return len(last)
    if isinstance(last, list | tuple):
        return sum(len(part) for part in last if isinstance(part, bytes))
    return 0


def _split(messages: list) -> list[list]:
    """Cut one turn's messages into batches of about MAX_BATCH_BYTES payload."""
    batches, batch, size = [], [], 0
    for message in messages:
        batch.append(message)
        size += 64 + _payload_size(message[-1])
        if size >= MAX_BATCH_BYTES:
            batches.append(batch)
            batch, size = [], 0
    if batch:
        batches.append(batch)
    return batches


class PeerBus:
    def __init__(
        self,
        runtime_dir: Path,
        shard: int,
        loop: asyncio.AbstractEventLoop,
        deliver: Callable[[int, list], None],
        context: zmq.Context | None = None,
        on_error: Callable[[str], None] | None = None,
    ) -> None:
        """``on_error(where)`` is called from an ``except`` block for an
        exception ``deliver`` raised (default: counted as ``deliver_errors``)."""
        self.runtime_dir = runtime_dir
        self.shard = shard
        self.loop = loop
        self.deliver = deliver
        self.context = context or zmq.Context.instance()
        self.pull = self.context.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        self.pull.setsockopt(zmq.RCVHWM, RECEIVE_HIGH_WATER_MARK)
        bind_ipc(self.pull, shard_endpoint(runtime_dir, shard))
        self._push: dict[int, zmq.Socket] = {}
        self._gone: set[int] = set()  # exited shards (ids grow; a few ints per restart)
        self._outgoing: dict[int, list] = {}
        self._flush_scheduled = False
        self._packer = msgpack.Packer(use_bin_type=True)
        self.stats: Counter[str] = Counter()
        self.on_error = on_error or self._count_error
        loop.add_reader(self.pull.getsockopt(zmq.FD), self._readable)

    def send(self, messages: list[tuple[int, tuple]]) -> None:
        """Queue (destination, message) pairs; they leave at the end of this turn."""
        outgoing = self._outgoing
        for destination, message in messages:
            batch = outgoing.get(destination)
            if batch is None:
                outgoing[destination] = [message]
            else:
                batch.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush)

    def _socket_for(self, destination: int) -> zmq.Socket | None:
        """The PUSH socket to ``destination``, connected on first use; None
        for a shard that is gone (``forget``)."""
        if destination in self._gone:
            return None
        sock = self._push.get(destination)
        if sock is None:
            sock = self.context.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, SEND_HIGH_WATER_MARK)
            sock.setsockopt(zmq.IMMEDIATE, 0)
            sock.connect(shard_endpoint(self.runtime_dir, destination))
            self._push[destination] = sock
        return sock

    def _flush(self) -> None:
        self._flush_scheduled = False
        outgoing, self._outgoing = self._outgoing, {}
        pack = self._packer.pack
        for destination, messages in outgoing.items():
            sock = self._socket_for(destination)
            if sock is None:
                self.stats["messages_to_gone_shard"] += len(messages)  # its process exited
                continue
            # One turn's messages usually fit one batch: pack them once and
            # look at the size, rather than weigh every message in Python.
            payload = pack([self.shard, messages])
            if len(payload) <= MAX_BATCH_BYTES or len(messages) == 1:
                self._send_batch(sock, destination, payload, len(messages))
                continue
            for batch in _split(messages):
                self._send_batch(sock, destination, pack([self.shard, batch]), len(batch))

    def _send_batch(self, sock: zmq.Socket, destination: int, payload: bytes, count: int) -> None:
        try:
            sock.send(payload, zmq.NOBLOCK)
        except zmq.Again:
            self.stats["messages_dropped"] += count  # destination stuck
            if self.stats["drop_events"] % 1000 == 0:
                log.warning("peer bus to shard %d is full: dropping", destination)
            self.stats["drop_events"] += 1
            return
        self.stats["messages_sent"] += count
        self.stats["batches_sent"] += 1

    def forget(self, shard: int) -> None:
        """A shard's process is gone (the supervisor saw it exit; shard ids are
        never reused): close its socket, and drop and count what is still
        sent to it rather than connect again to an endpoint nobody will
        serve. Not for a shard dropped for silence: it may come back."""
        self._gone.add(shard)
        sock = self._push.pop(shard, None)
        if sock is not None:
            sock.close()

    def _count_error(self, where: str) -> None:
        self.stats["deliver_errors"] += 1

    def _readable(self) -> None:
        pull = self.pull
        for _ in range(RECEIVE_BATCHES_PER_TURN):
            try:
                payload = pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return  # a wake-up for a command, not a message; the recv re-armed it
            except zmq.ZMQError:
                return  # closed
            self._receive(payload)
            try:
                # Asking ZMQ_EVENTS re-arms the descriptor as a failing recv
                # would, without raising zmq.Again (~5 us) on every wake-up.
                if not pull.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    return
            except zmq.ZMQError:
                return  # closed by deliver
        self.loop.call_soon(self._readable)  # more may be queued; let others run first

    def _receive(self, payload: bytes) -> None:
        try:
            from_shard, batch = msgpack.unpackb(payload, raw=False, use_list=False)
            count = len(batch)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, TypeError):
            self.stats["undecodable"] += 1
            return
        self.stats["messages_received"] += count
        try:
            self.deliver(from_shard, batch)
        except Exception:
            self.on_error("bus_batch")

    def close(self, linger_ms: int = 0) -> None:
        """Close; with ``linger_ms`` queued batches get that long to leave."""
        if self._flush_scheduled:
            self._flush()
        with contextlib.suppress(zmq.ZMQError, ValueError):
            self.loop.remove_reader(self.pull.getsockopt(zmq.FD))
        self.pull.close()
        for sock in self._push.values():
            sock.close(linger=linger_ms)
        self._push.clear()
