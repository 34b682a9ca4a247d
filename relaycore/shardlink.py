"""Messages between relay shards and the routing map, as plain tuples
(msgpack-friendly; tcp-relay-protocol.md has no say here, the design card's
"Links across shards" section does).

Link messages travel on the peer bus between two shards, in order per pair
of shards; each names the epochs of both ends, so a message about an old
connection never reaches a newer one with the same key:

    (WANT,   from_pk, from_epoch, to_pk, to_epoch)           my client wants yours
    (LINKED, from_pk, from_epoch, to_pk, to_epoch)           yours is linked to mine
    (NOLINK, from_pk, from_epoch, to_pk, to_epoch)           no link (answers a WANT)
    (UNLINK, from_pk, from_epoch, to_pk, to_epoch)           that link has ended
    (DATA,   from_pk, from_epoch, to_pk, to_epoch, payload)  routed data (R-DATA-4)
    (OOB,    from_pk, to_pk, to_epoch, data)                 OOB (R-OOB-2)
    (OOB_FORWARDED, from_pk, to_pk, to_epoch, data)          the same, sent on by the shard
                                                              of a replaced to_epoch to the
                                                              key's current one (once)
    (REPLY,  to_epoch, plain)                                 a UDP onion/forward reply,
                                                              as type 9/11 (R-ORET-5, R-FWD-5)

Registry events go from a shard to the coordinator:

    (REGISTER, pk, epoch)      a connection was confirmed
    (UNREGISTER, pk, epoch)    it ended

Map updates come from the coordinator, in sequence, to every shard:

    (SET, pk, shard, epoch, replaced_shard, replaced_epoch)   (replaced_* None if new)
    (DEL, pk, shard, epoch)
    (DROP_SHARD, shard, exited)                               every key of a dead shard

``exited`` is True when the supervisor saw the worker process end (it never
comes back: its peers' buses may forget it), False when the coordinator
dropped a shard that fell silent (it may be alive, e.g. SIGSTOPped, and
speak again with the same id).
"""

from dataclasses import dataclass
from enum import IntEnum

ShardId = int
# A cluster-unique id of one client connection: (shard << 32) | counter. A shard
# id is never reused: a restarted worker is a new shard.
Epoch = int

EPOCH_COUNTER_BITS = 32
# Epochs are u64 on the wire (the onion / forward sendback, msgpack on the
# bus): the shard id takes the high 32 bits, the counter the low 32. The
# counter never carries into the shard id (issue 10 finding 9): a server
# whose counter is spent confirms no one more, and its worker is replaced by
# a fresh shard well before that (EPOCH_RENEW_MARGIN).
EPOCH_COUNTER_MAX = (1 << EPOCH_COUNTER_BITS) - 1
SHARD_ID_MAX = (1 << (64 - EPOCH_COUNTER_BITS)) - 1
EPOCH_RENEW_MARGIN = 1 << 24  # epochs left when a worker asks to be replaced


class Link(IntEnum):
    WANT = 1
    LINKED = 2
    UNLINK = 3
    DATA = 4
    OOB = 5
    NOLINK = 6
    REPLY = 7
    OOB_FORWARDED = 8


class Registry(IntEnum):
    REGISTER = 1
    UNREGISTER = 2


class MapUpdate(IntEnum):
    SET = 1
    DEL = 2
    DROP_SHARD = 3


@dataclass(frozen=True, slots=True)
class RemotePeer:
    """The far end of a link to a client on another shard."""

    shard: ShardId
    public_key: bytes
    epoch: Epoch
