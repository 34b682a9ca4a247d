"""Differential scenarios: tox-bootstrapd vs our relay (`cluster start`), against both
references: Debian's 0.2.18 (our relay with ``compat = "0.2.18"``) and 0.2.23 built from
../shared/vendor (our relay's default), each with 1 and 4 workers.

One reference daemon and one relay of ours (same server key, bytes 0x40..0x5f) serve each
group of tests. Every scenario runs against both at the same time; the test asserts that
the two transcripts are equal (scenario.py) and that our relay's transcript meets the
expectations written next to each step, so a test cannot pass when both relays are wrong
in the same way. Rule ids refer to /work/shared/spec/tcp-relay-protocol.md (R-FWD and
R-ONION to onion-over-tcp.md).

Not covered here on purpose: a client closing its own socket (our relay notices at once,
tox-bootstrapd only 10-40 s later through its ping timeout, R-KILL-4 - a documented
difference tested elsewhere), server keep-alive pings and timeouts (> 30 s), rings of 256
waiting sockets, and our relay's handshake timeout (tox-bootstrapd has none, R-TIME-2).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path

import pytest

from relaycore.packets import (
    DisconnectNotification,
    OobSend,
    Ping,
    Pong,
    RoutingRequest,
    encode,
)
from testbed.bootstrapd import (
    BOOTSTRAPD_PATH,
    ReferenceRelay,
    bootstrapd_available,
    start_bootstrapd,
)
from testbed.relay_process import RelayProcess, start_relay
from testbed.toxcore0223 import require_toxcore_0223
from tests.differential.scenario import (
    Endpoint,
    Event,
    Recorder,
    ScenarioClient,
    ScenarioFn,
    Transcript,
    connected,
    data,
    disconnected,
    expectation_failures,
    format_record,
    onion,
    oob,
    pong,
    route,
    run_on_all,
    transcript_diff,
)

pytestmark = pytest.mark.reference

SERVER_SK = bytes(range(0x40, 0x60))
REFERENCE = "tox-bootstrapd"
OURS = "ours"
#: Every scenario runs against both references; our relay follows the one it faces.
REFERENCE_VERSIONS = ("0.2.18", "0.2.23")
#: The version of the reference a scenario runs against (for version-specific
#: expectations; set by the test, read inside the scenario's event loop).
REFERENCE_VERSION: ContextVar[str] = ContextVar("REFERENCE_VERSION", default="0.2.23")

# ---------------------------------------------------------------------------
# Plaintext helpers
# ---------------------------------------------------------------------------


def req(public_key: bytes) -> bytes:
    return encode(RoutingRequest(public_key))


def ping(ping_id: bytes) -> bytes:
    return encode(Ping(ping_id))


def pong_plain(ping_id: bytes) -> bytes:
    return encode(Pong(ping_id))


def disc(connection_id: int) -> bytes:
    return encode(DisconnectNotification(connection_id))


def oob_send(public_key: bytes, payload: bytes) -> bytes:
    return encode(OobSend(public_key, payload))


def routed(connection_id: int, payload: bytes = b"") -> bytes:
    return bytes((connection_id,)) + payload


def pattern(length: int, seed: int = 0) -> bytes:
    """Deterministic payload bytes (transcripts keep payloads exactly)."""
    return bytes((seed + i * 7) % 256 for i in range(length))


def ping_id(number: int) -> bytes:
    return number.to_bytes(8, "big")


ZERO_ID = bytes(8)
ZERO_KEY = bytes(32)  # never an identity, so transcripts show it as below
ZERO_KEY_NAME = "unknown-key:" + "00" * 32


async def link_with_decoy(rec: Recorder, a: str, b: str) -> None:
    """Connect ``a`` and ``b`` and link them with different ids on the two sides.

    ``a`` first requests an offline decoy (its slot 16), so afterwards ``a`` knows ``b``
    as 17 and ``b`` knows ``a`` as 16 (R-ROUTE-5, R-ROUTE-6, R-ROUTE-8).
    """
    await rec.connect_all(a, b)
    rec[a].route_request(rec.key(f"{a}-decoy"))
    rec[b].route_request(rec.key(a))
    await rec.settle(
        f"{a} requests an offline decoy, {b} requests {a}",
        expect={a: [route(16, f"{a}-decoy")], b: [route(16, a)]},
        closed=set(),
    )
    rec[a].route_request(rec.key(b))
    await rec.settle(
        f"{a} requests {b}: linked ({a}:17, {b}:16)",
        expect={a: [route(17, b), connected(17)], b: [connected(16)]},
        closed=set(),
    )


# ---------------------------------------------------------------------------
# Case tables: many independent one-shot clients in one step
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One client that sends ``build(client, rec)`` (one write) and then a PING.

    ``kill``: the relay must close it without answering the PING; otherwise the PING's
    PONG proves that the connection survived and that the bytes before it were handled.
    ``before``: events expected before the kill or the PONG. ``confirm=False``: the
    bytes are the first frames of an UNCONFIRMED connection. ``setup``: plaintexts sent
    in an earlier step (answered by ``setup_events``), so that a kill never coincides
    with replies to earlier frames of the same write (see ``kill_discards_earlier_replies``).
    """

    name: str
    build: Callable[[ScenarioClient, Recorder], bytes]
    kill: bool
    before: tuple[Event, ...] = ()
    confirm: bool = True
    setup: tuple[bytes, ...] = ()
    setup_events: tuple[Event, ...] = ()


def frames(name: str, *plains: bytes, kill: bool, **kwargs: object) -> Case:
    """A case that sends fixed plaintexts as valid frames."""
    return Case(name, lambda c, _rec: b"".join(c.frame(p) for p in plains), kill, **kwargs)  # type: ignore[arg-type]


def raw(name: str, stream: bytes, *, kill: bool, **kwargs: object) -> Case:
    """A case that writes raw stream bytes (malformed frames)."""
    return Case(name, lambda _c, _rec: stream, kill, **kwargs)  # type: ignore[arg-type]


async def run_cases(rec: Recorder, cases: Sequence[Case], label: str) -> None:
    names = [case.name for case in cases]
    assert len(set(names)) == len(names), "case names must be unique"
    await asyncio.gather(*(rec.connect(case.name, confirm=case.confirm) for case in cases))
    if any(case.setup for case in cases):
        for case in cases:
            if case.setup:
                rec[case.name].send_frames(*case.setup)
        await rec.settle(
            "setup",
            expect={case.name: case.setup_events for case in cases},
            closed=set(),
        )
    expect: dict[str, list[Event]] = {}
    for number, case in enumerate(cases, start=1):
        client = rec[case.name]
        client.send_raw(case.build(client, rec) + client.frame(ping(ping_id(number))))
        expect[case.name] = [*case.before] + ([] if case.kill else [pong(ping_id(number))])
    await rec.settle(label, expect=expect, closed={c.name for c in cases if c.kill})


def cases_scenario(label: str, cases: Sequence[Case]) -> ScenarioFn:
    async def run(_ep: Endpoint, rec: Recorder) -> None:
        await run_cases(rec, cases, label)

    return run


# ---------------------------------------------------------------------------
# Scenarios
# ---------------------------------------------------------------------------

SCENARIOS: dict[str, ScenarioFn] = {}


def scenario(fn: ScenarioFn) -> ScenarioFn:
    SCENARIOS[fn.__name__] = fn  # type: ignore[attr-defined]
    return fn


def register(name: str, fn: ScenarioFn, doc: str) -> None:
    fn.__doc__ = doc
    SCENARIOS[name] = fn


# -- routing -------------------------------------------------------------------


@scenario
async def routing_a_then_b(_ep: Endpoint, rec: Recorder) -> None:
    """A requests B, then B requests A (R-ROUTE-5, R-ROUTE-6, R-ROUTE-7).

    The first request only gets a ROUTING_RESPONSE; the second links both slots: B gets
    the response and then the CONNECTION_NOTIFICATION (wire order), A gets its notification.
    """
    await rec.connect_all("A", "B")
    rec["A"].route_request(rec.key("B"))
    await rec.settle("A requests B", expect={"A": [route(16, "B")], "B": []}, closed=set())
    rec["B"].route_request(rec.key("A"))
    await rec.settle(
        "B requests A",
        expect={"A": [connected(16)], "B": [route(16, "A"), connected(16)]},
        closed=set(),
    )


@scenario
async def routing_b_then_a_different_ids(_ep: Endpoint, rec: Recorder) -> None:
    """Reverse order with different slot ids on the two ends (R-ROUTE-6, R-ROUTE-8).

    A holds a decoy in slot 16; B requests A first (B:16), then A requests B (A:17):
    A gets response + notification 17, B gets notification 16.
    """
    await link_with_decoy(rec, "A", "B")


@scenario
async def routing_simultaneous_and_immediate_data(_ep: Endpoint, rec: Recorder) -> None:
    """A and B request each other in the same instant: whichever is handled first, each
    side sees response then notification (R-ROUTE-6, R-ORDER-4). C's request for A and
    its data in the same write: the link exists when the data is handled (R-ORDER-2)."""
    await rec.connect_all("A", "B", "C")
    rec["A"].route_request(rec.key("B"))
    rec["B"].route_request(rec.key("A"))
    await rec.settle(
        "A and B request each other at once",
        expect={"A": [route(16, "B"), connected(16)], "B": [route(16, "A"), connected(16)]},
        closed=set(),
    )
    rec["A"].route_request(rec.key("C"))
    await rec.settle("A requests C", expect={"A": [route(17, "C")], "C": []}, closed=set())
    rec["C"].send_frames(req(rec.key("A")), routed(16, b"first"))
    await rec.settle(
        "C requests A and sends data in one write",
        expect={"A": [connected(17), data(17, b"first")], "C": [route(16, "A"), connected(16)]},
        closed=set(),
    )


@scenario
async def routing_peer_offline_then_online(_ep: Endpoint, rec: Recorder) -> None:
    """A peer coming online triggers nothing; only its routing request links (R-ROUTE-7)."""
    await rec.connect("A")
    rec["A"].route_request(rec.key("B"))
    await rec.settle("A requests offline B", expect={"A": [route(16, "B")]}, closed=set())
    await rec.connect("B")
    await rec.settle("B comes online silently", expect={"A": [], "B": []}, closed=set())
    rec["B"].route_request(rec.key("A"))
    await rec.settle(
        "B requests A",
        expect={"A": [connected(16)], "B": [route(16, "A"), connected(16)]},
        closed=set(),
    )


@scenario
async def routing_own_key(_ep: Endpoint, rec: Recorder) -> None:
    """A routing request for the sender's own key gets rpid 0 and takes no slot (R-ROUTE-2)."""
    await rec.connect("A")
    rec["A"].send_frames(req(rec.key("A")), req(rec.key("B")), req(rec.key("A")))
    await rec.settle(
        "A requests itself, B (offline), itself",
        expect={"A": [route(0, "A"), route(16, "B"), route(0, "A")]},
        closed=set(),
    )


@scenario
async def routing_repeat_same_slot(_ep: Endpoint, rec: Recorder) -> None:
    """Repeated requests answer the existing slot and notify nobody (R-ROUTE-3).

    Holds for a LINKED slot (both ends repeat) and for a REQUESTED one (offline X).
    """
    await link_with_decoy(rec, "A", "B")
    rec["A"].route_request(rec.key("B"))
    rec["B"].route_request(rec.key("A"))
    await rec.settle(
        "A and B repeat their requests",
        expect={"A": [route(17, "B")], "B": [route(16, "A")]},
        closed=set(),
    )
    rec["B"].send_frames(req(rec.key("X")), req(rec.key("X")))
    await rec.settle(
        "B requests offline X twice",
        expect={"A": [], "B": [route(17, "X"), route(17, "X")]},
        closed=set(),
    )


@scenario
async def routing_table_full(_ep: Endpoint, rec: Recorder) -> None:
    """240 slots full: a new key gets rpid 0, existing keys still answered (R-ROUTE-3/4).

    241 requests go out in one write, followed by a repeat of K005. Then K007 comes online
    and requests A: it links to A's slot 23 although A's table is full (R-ROUTE-6).
    """
    await rec.connect("A")
    keys = [f"K{i:03d}" for i in range(241)]
    rec["A"].send_frames(*(req(rec.key(k)) for k in keys), req(rec.key("K005")))
    await rec.settle(
        "A requests 241 keys in bulk, then K005 again",
        expect={
            "A": [route(16 + i, keys[i]) for i in range(240)]
            + [route(0, "K240"), route(21, "K005")]
        },
        closed=set(),
    )
    await rec.connect("K007")
    rec["K007"].route_request(rec.key("A"))
    await rec.settle(
        "K007 connects and requests A",
        expect={"A": [connected(23)], "K007": [route(16, "A"), connected(16)]},
        closed=set(),
    )
    rec["A"].send_frames(req(rec.key("K007")), req(rec.key("Z")))
    await rec.settle(
        "A repeats K007, requests new Z",
        expect={"A": [route(23, "K007"), route(0, "Z")], "K007": []},
        closed=set(),
    )


@scenario
async def routing_lowest_free_slot(_ep: Endpoint, rec: Recorder) -> None:
    """Freed slots are reused lowest first: free 20 then 18 -> 18, 20, 22 (R-ROUTE-5, R-DISC-3).

    Disconnecting a REQUESTED slot sends nothing to anybody and kills nobody.
    """
    await rec.connect("A")
    rec["A"].send_frames(*(req(rec.key(f"K{i}")) for i in range(6)))
    await rec.settle(
        "A requests K0..K5",
        expect={"A": [route(16 + i, f"K{i}") for i in range(6)]},
        closed=set(),
    )
    rec["A"].send_frames(disc(20), disc(18), ping(ping_id(1)))
    await rec.settle("A disconnects 20 and 18", expect={"A": [pong(ping_id(1))]}, closed=set())
    rec["A"].send_frames(req(rec.key("N0")), req(rec.key("N1")), req(rec.key("N2")))
    await rec.settle(
        "A requests N0, N1, N2",
        expect={"A": [route(18, "N0"), route(20, "N1"), route(22, "N2")]},
        closed=set(),
    )


# -- routed data -----------------------------------------------------------------


@scenario
async def data_relay_id_rewrite(_ep: Endpoint, rec: Recorder) -> None:
    """Routed data both ways with id rewrite, 1..2032-byte plaintexts (R-DATA-1, R-DATA-4).

    Data on a REQUESTED slot (the offline decoy) is dropped silently (R-DATA-3).
    """
    await link_with_decoy(rec, "A", "B")
    big_a, big_b = pattern(2031, 1), pattern(2031, 2)
    rec["A"].send_frames(routed(17), routed(17, b"hello"), routed(17, big_a))
    await rec.settle(
        "A sends 1-, 6- and 2032-byte plaintexts to B",
        expect={"A": [], "B": [data(16, b""), data(16, b"hello"), data(16, big_a)]},
        closed=set(),
    )
    rec["B"].send_frames(routed(16, b"x"), routed(16, big_b), routed(16))
    await rec.settle(
        "B answers",
        expect={"A": [data(17, b"x"), data(17, big_b), data(17, b"")], "B": []},
        closed=set(),
    )
    rec["A"].send_frames(routed(16, b"to the decoy"), ping(ping_id(7)))
    await rec.settle(
        "A sends data on its REQUESTED decoy slot",
        expect={"A": [pong(ping_id(7))], "B": []},
        closed=set(),
    )


register(
    "data_unused_slot_kills",
    cases_scenario(
        "data on unused slots",
        [
            frames("d16-fresh", routed(16, b"x"), kill=True),
            frames("d255-1byte", routed(255), kill=True),
            frames("d16-unconfirmed-first-frame", routed(16, b"x"), kill=True, confirm=False),
            frames(
                "d17-next-to-requested",
                routed(17, b"x"),
                kill=True,
                setup=(req(ZERO_KEY),),
                setup_events=(route(16, ZERO_KEY_NAME),),
            ),
            frames(
                "d16-requested",
                routed(16, b"x"),
                kill=False,
                setup=(req(ZERO_KEY),),
                setup_events=(route(16, ZERO_KEY_NAME),),
            ),
        ],
    ),
    """Data on a slot that is not in use kills (R-DATA-2); on a REQUESTED slot it is
    dropped (R-DATA-3).""",
)


# -- disconnect notifications ----------------------------------------------------------


@scenario
async def disconnect_notification_and_relink(_ep: Endpoint, rec: Recorder) -> None:
    """A disconnects B: B gets 03 with its own id, A nothing (R-DISC-3); B's slot is
    REQUESTED again (its data is dropped, R-DATA-3) and relinks with the same id when A
    requests B again (R-DISC-4); A gets the lowest free slot, 17 again (R-ROUTE-5)."""
    await link_with_decoy(rec, "A", "B")
    rec["A"].disconnect(17)
    await rec.settle("A disconnects B", expect={"A": [], "B": [disconnected(16)]}, closed=set())
    rec["B"].send_frames(routed(16, b"lost"), ping(ping_id(2)))
    await rec.settle(
        "B sends on its REQUESTED slot",
        expect={"A": [], "B": [pong(ping_id(2))]},
        closed=set(),
    )
    rec["A"].route_request(rec.key("B"))
    await rec.settle(
        "A requests B again",
        expect={"A": [route(17, "B"), connected(17)], "B": [connected(16)]},
        closed=set(),
    )
    rec["A"].send_data(17, b"back")
    await rec.settle("A sends data", expect={"B": [data(16, b"back")]}, closed=set())


register(
    "disconnect_kills",
    cases_scenario(
        "bad disconnect notifications",
        [
            frames("id0", disc(0), kill=True),
            frames("id5", disc(5), kill=True),
            frames("id15", disc(15), kill=True),
            frames("id16-unused", disc(16), kill=True),
            frames("id200-unused", disc(200), kill=True),
            frames(
                "id17-unused-next-to-requested",
                disc(17),
                kill=True,
                setup=(req(ZERO_KEY),),
                setup_events=(route(16, ZERO_KEY_NAME),),
            ),
            frames(
                "id16-requested-freed-twice",
                disc(16),
                disc(16),
                kill=True,
                setup=(req(ZERO_KEY),),
                setup_events=(route(16, ZERO_KEY_NAME),),
            ),
            frames(
                "id16-requested-freed-once",
                disc(16),
                kill=False,
                setup=(req(ZERO_KEY),),
                setup_events=(route(16, ZERO_KEY_NAME),),
            ),
        ],
    ),
    """DISCONNECT_NOTIFICATION with id < 16 or for a slot not in use kills (R-DISC-2);
    freeing a REQUESTED slot is fine, freeing it twice kills (R-DISC-3).""",
)


# -- confirmation and same key ---------------------------------------------------------


@scenario
async def same_key_replaces_confirmed(_ep: Endpoint, rec: Recorder) -> None:
    """A second CONFIRMED connection with A's key kills the first (R-CONF-3, R-KILL-1).

    B (linked to A) gets 03; the new connection A2 starts with an empty slot table (its
    request for B gets slot 16, not A's 17) and relinks with B's old slot id (R-KILL-2).
    OOB to A's key now reaches A2 (R-OOB-2).
    """
    await link_with_decoy(rec, "A", "B")
    await rec.connect("A2", identity="A")
    await rec.settle(
        "A2 with A's key confirms",
        expect={"A": [], "A2": [], "B": [disconnected(16)]},
        closed={"A"},
    )
    rec["A2"].route_request(rec.key("B"))
    await rec.settle(
        "A2 requests B",
        expect={"A2": [route(16, "B"), connected(16)], "B": [connected(16)]},
        closed={"A"},
    )
    rec["B"].send_frames(routed(16, b"hi"), oob_send(rec.key("A"), b"oob"))
    await rec.settle(
        "B sends data and OOB to A's key",
        expect={"A2": [data(16, b"hi"), oob("B", b"oob")], "B": []},
        closed={"A"},
    )


@scenario
async def unconfirmed_duplicate_disturbs_nobody(_ep: Endpoint, rec: Recorder) -> None:
    """An UNCONFIRMED connection with A's key changes nothing (R-CONF-3) until its first
    frame confirms it (R-CONF-1): then A is killed and B notified; last confirmed wins."""
    await link_with_decoy(rec, "A", "B")
    await rec.connect("A2", identity="A", confirm=False)
    await rec.settle(
        "A2 (A's key) completes the handshake only",
        expect={"A": [], "A2": [], "B": []},
        closed=set(),
    )
    rec["A"].send_data(17, b"a->b")
    rec["B"].send_frames(routed(16, b"b->a"), oob_send(rec.key("A"), b"oob"))
    await rec.settle(
        "A and B still talk; OOB to A's key reaches A",
        expect={"A": [data(17, b"b->a"), oob("B", b"oob")], "A2": [], "B": [data(16, b"a->b")]},
        closed=set(),
    )
    rec["A2"].send_frames(ping(ping_id(3)))
    await rec.settle(
        "A2 confirms with a PING",
        expect={"A": [], "A2": [pong(ping_id(3))], "B": [disconnected(16)]},
        closed={"A"},
    )
    rec["A2"].route_request(rec.key("B"))
    await rec.settle(
        "A2 requests B",
        expect={"A2": [route(16, "B"), connected(16)], "B": [connected(16)]},
        closed={"A"},
    )


@scenario
async def unconfirmed_is_invisible(_ep: Endpoint, rec: Recorder) -> None:
    """An UNCONFIRMED key cannot be linked or reached by OOB (§3); its first frame, a
    routing request, confirms it and is handled as an ordinary packet (R-CONF-1/2)."""
    await rec.connect("U", confirm=False)
    await rec.connect("B")
    rec["B"].send_frames(req(rec.key("U")), oob_send(rec.key("U"), b"lost"))
    await rec.settle(
        "B requests U and sends it OOB",
        expect={"B": [route(16, "U")], "U": []},
        closed=set(),
    )
    rec["U"].send_frames(req(rec.key("B")))
    await rec.settle(
        "U's first frame requests B",
        expect={"B": [connected(16)], "U": [route(16, "B"), connected(16)]},
        closed=set(),
    )


@scenario
async def pong_zero_first_frame(_ep: Endpoint, rec: Recorder) -> None:
    """PONG id 0 as the first frame confirms and then kills (R-CONF-1, R-PING-3)."""
    await rec.connect("U", confirm=False)
    rec["U"].send_frames(pong_plain(ZERO_ID), ping(ping_id(4)))
    await rec.settle("U's first frame is PONG 0", expect={"U": []}, closed={"U"})


@scenario
async def duplicate_confirmed_by_killing_frame(_ep: Endpoint, rec: Recorder) -> None:
    """A2 (A's key, UNCONFIRMED) sends PONG 0 as first frame: confirming it replaces A
    (R-CONF-3: A killed, B notified), then handling it kills A2 (R-CONF-1)."""
    await link_with_decoy(rec, "A", "B")
    await rec.connect("A2", identity="A", confirm=False)
    rec["A2"].send_frames(pong_plain(ZERO_ID))
    await rec.settle(
        "A2's first frame is PONG 0",
        expect={"A": [], "A2": [], "B": [disconnected(16)]},
        closed={"A", "A2"},
    )


# -- OOB ------------------------------------------------------------------------


@scenario
async def oob_delivery(_ep: Endpoint, rec: Recorder) -> None:
    """OOB to an online peer and to oneself is delivered with the sender's key, to an
    offline key dropped silently; 1 and 1024 data bytes are fine (R-OOB-1/2/3)."""
    await rec.connect_all("A", "B")
    big = pattern(1024, 3)
    rec["A"].send_frames(
        oob_send(rec.key("B"), b"\x01"),
        oob_send(rec.key("A"), b"self"),
        oob_send(rec.key("X"), b"offline"),
        oob_send(rec.key("B"), big),
        ping(ping_id(5)),
    )
    await rec.settle(
        "A sends OOB to B, itself, offline X, B (1024 bytes)",
        expect={
            "A": [oob("A", b"self"), pong(ping_id(5))],
            "B": [oob("A", b"\x01"), oob("A", big)],
        },
        closed=set(),
    )
    rec["B"].send_oob(rec.key("A"), b"reply")
    await rec.settle("B answers", expect={"A": [oob("B", b"reply")], "B": []}, closed=set())


register(
    "oob_length_kills",
    cases_scenario(
        "OOB lengths",
        [
            frames("data0", oob_send(bytes(32), b""), kill=True),
            frames("data1025", oob_send(bytes(32), bytes(1025)), kill=True),
            frames("short-key", b"\x06" + bytes(10), kill=True),
            frames("only-id", b"\x06", kill=True),
            frames("data1024-offline", oob_send(bytes(32), bytes(1024)), kill=False),
        ],
    ),
    """OOB without data or with more than 1024 bytes kills (R-OOB-1); 1024 to an offline
    key is dropped (R-OOB-3).""",
)


# -- ping / pong ------------------------------------------------------------------


@scenario
async def ping_echo(_ep: Endpoint, rec: Recorder) -> None:
    """PINGs are echoed as PONGs with the same 8 bytes, including all-zero (R-PING-1)."""
    await rec.connect("A")
    ids = [b"\x11" * 8, ZERO_ID, b"\xff" * 8, bytes(range(8))]
    rec["A"].send_frames(*(ping(i) for i in ids))
    await rec.settle("A pings 4 ids", expect={"A": [pong(i) for i in ids]}, closed=set())


@scenario
async def pong_handling(_ep: Endpoint, rec: Recorder) -> None:
    """A PONG with an unknown id is ignored, PONG id 0 kills (R-PING-3) and the killed
    client's linked peer is notified (R-KILL-1)."""
    await link_with_decoy(rec, "B", "A")  # B:17 = A, A:16 = B
    rec["A"].send_frames(pong_plain(b"\x12\x34\x56\x78\x9a\xbc\xde\xf0"), ping(ping_id(6)))
    await rec.settle(
        "A sends a wrong PONG, then PING",
        expect={"A": [pong(ping_id(6))], "B": []},
        closed=set(),
    )
    rec["A"].send_frames(pong_plain(ZERO_ID), ping(ping_id(7)))
    await rec.settle(
        "A sends PONG 0, then PING",
        expect={"A": [], "B": [disconnected(17)]},
        closed={"A"},
    )


# -- kills ----------------------------------------------------------------------


@scenario
async def kill_discards_earlier_replies(_ep: Endpoint, rec: Recorder) -> None:
    """Replies to frames that precede a killing frame in the same write still go out.

    tox-bootstrapd writes everything a packet causes during its handling (R-ORDER-2,
    R-OUT-1: priority packets are sent at once), so a later kill (R-KILL-1) discards only
    output the kernel has not taken. P: PING + reserved id 12; R: own-key and X requests
    + data on an unused slot (R-DATA-2); U (UNCONFIRMED): PING as first frame + id 13.
    """
    await rec.connect_all("P", "R")
    await rec.connect("U", confirm=False)
    rec["P"].send_frames(ping(ping_id(21)), b"\x0c")
    rec["R"].send_frames(req(rec.key("R")), req(rec.key("X")), routed(200, b"x"))
    rec["U"].send_frames(ping(ping_id(22)), b"\x0d")
    await rec.settle(
        "a reply-producing frame, then a killing frame, in one write",
        expect={
            "P": [pong(ping_id(21))],
            "R": [route(0, "R"), route(16, "X")],
            "U": [pong(ping_id(22))],
        },
        closed={"P", "R", "U"},
    )


def _bad_mac(client: ScenarioClient, _rec: Recorder) -> bytes:
    frame = bytearray(client.frame(ping(b"\x01" * 8)))
    frame[-1] ^= 0x01
    return bytes(frame)


register(
    "frame_kills",
    cases_scenario(
        "malformed frames",
        [
            raw("L2049", b"\x08\x01" + bytes(2049), kill=True),
            raw("L2049-header-only", b"\x08\x01", kill=True),
            raw("L2048-garbage", b"\x08\x00" + pattern(2048, 9), kill=True),
            raw("L1", b"\x00\x01\x00", kill=True),
            raw("L16", b"\x00\x10" + bytes(16), kill=True),
            Case("bad-mac", _bad_mac, kill=True),
            Case("unconfirmed-bad-mac", _bad_mac, kill=True, confirm=False),
            raw("unconfirmed-L16", b"\x00\x10" + bytes(16), kill=True, confirm=False),
            raw("unconfirmed-L2049", b"\x08\x01", kill=True, confirm=False),
        ],
    ),
    """Frame length > 2048 (R-FRAME-2), 1..16 or a bad MAC (R-FRAME-4) kill, also as the
    first frame of an UNCONFIRMED connection (R-CONF-1).""",
)

register(
    "frame_zero_length",
    cases_scenario(
        "zero-length frames",
        [
            raw("L0", b"\x00\x00", kill=False),
            raw("L0-twice", b"\x00\x00\x00\x00", kill=False),
            raw("unconfirmed-L0", b"\x00\x00", kill=False, confirm=False),
        ],
    ),
    """Frame length 0 is ignored and the frame behind it (a ping) answered (R-FRAME-3).
    tox-bootstrapd 0.2.23 differs (DOCUMENTED_DIFFERENCES).""",
)

register(
    "packet_length_kills",
    cases_scenario(
        "wrong lengths of types 0, 2, 3, 4, 5",
        [
            frames("route-len1", b"\x00", kill=True),
            frames("route-len33-ok", req(ZERO_KEY), kill=False, before=(route(16, ZERO_KEY_NAME),)),
            frames("route-len32", b"\x00" + bytes(31), kill=True),
            frames("route-len34", b"\x00" + bytes(33), kill=True),
            frames("notif-len1", b"\x02", kill=True),
            frames("notif-len3", b"\x02\x10\x10", kill=True),
            frames("notif-len2-ignored", b"\x02\x10", kill=False),
            frames("notif-len2-id5-ignored", b"\x02\x05", kill=False),
            frames("disc-len1", b"\x03", kill=True),
            frames("disc-len3", b"\x03\x10\x10", kill=True),
            frames("ping-len8", b"\x04" + bytes(7), kill=True),
            frames("ping-len10", b"\x04" + bytes(9), kill=True),
            frames("pong-len8", b"\x05" + bytes(7), kill=True),
            frames("pong-len10", b"\x05" + bytes(9), kill=True),
            frames("pong-len1", b"\x05", kill=True),
        ],
    ),
    """Length rules: type 0 must be 33 (R-ROUTE-1), 2 and 3 must be 2 (R-NOTIF-1,
    R-DISC-1; type 2 is then ignored), 4 and 5 must be 9 (R-PING-1, R-PING-3).""",
)

register(
    "reserved_ids_kill",
    cases_scenario(
        "reserved and server-only packet ids",
        [
            frames("id1", b"\x01\x10" + bytes(32), kill=True),
            frames("id1-short", b"\x01", kill=True),
            frames("id7", b"\x07" + bytes(32) + b"data", kill=True),
            frames("id9", b"\x09" + pattern(100), kill=True),
            frames("id9-short", b"\x09", kill=True),
            frames("id11", b"\x0b" + pattern(20), kill=True),
            frames("id11-short", b"\x0b", kill=True),
            frames("id12", b"\x0c", kill=True),
            frames("id13", b"\x0d" + bytes(8), kill=True),
            frames("id14", b"\x0e" + bytes(32), kill=True),
            frames("id15", b"\x0f\x10", kill=True),
            frames("id12-unconfirmed-first-frame", b"\x0c", kill=True, confirm=False),
            frames("id7-unconfirmed-first-frame", b"\x07" + bytes(40), kill=True, confirm=False),
        ],
    ),
    """Ids 1, 7, 9, 11 and 12-15 from a client kill (R-RSV-1, R-PKT-9, R-PKT-11).""",
)

register(
    "onion_request_lengths",
    cases_scenario(
        "onion requests (type 8)",
        [
            frames("len1", b"\x08", kill=True),
            frames("len159", b"\x08" + bytes(158), kill=True),
            frames("len160", b"\x08" + bytes(159), kill=False),
            frames("len178", b"\x08" + bytes(177), kill=False),
            frames("len179-family0", b"\x08" + bytes(178), kill=False),
            frames("len1361", b"\x08" + bytes(1360), kill=False),
            frames("len2032", b"\x08" + bytes(2031), kill=False),
        ],
    ),
    """Type 8 of length <= 159 kills; longer ones never kill, even when the onion layer
    drops them (R-PKT-8, R-ONION-1/2/3/4). Only TCP packets are compared: our relay may
    accept type 8 without forwarding it (these requests are all dropped anyway).""",
)


@scenario
async def forward_request(_ep: Endpoint, rec: Recorder) -> None:
    """Type 10 kills on a bad/short address, an empty `0a`, TCP families or data > 1792;
    empty data and 1792 bytes are accepted (R-FWD-1). Accepted requests go to a local
    UDP sink of ours (only the TCP side is compared)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sink:
        sink.bind(("127.0.0.1", 0))
        port = sink.getsockname()[1].to_bytes(2, "big")
        v4 = b"\x02" + socket.inet_aton("127.0.0.1") + port
        v6 = b"\x0a" + socket.inet_pton(socket.AF_INET6, "::1") + port
        await run_cases(
            rec,
            [
                frames("empty", b"\x0a", kill=True),
                frames("family3", b"\x0a\x03" + bytes(6) + b"data", kill=True),
                frames("family0", b"\x0a\x00" + bytes(6) + b"data", kill=True),
                frames("family130-tcp", b"\x0a\x82" + v4[1:] + b"data", kill=True),
                frames("family138-tcp", b"\x0a\x8a" + v6[1:] + b"data", kill=True),
                frames("v4-short", b"\x0a" + v4[:5], kill=True),
                frames("v6-short", b"\x0a" + v6[:10], kill=True),
                frames("v4-data1793", b"\x0a" + v4 + bytes(1793), kill=True),
                frames("v4-data1792", b"\x0a" + v4 + bytes(1792), kill=False),
                frames("v4-data0", b"\x0a" + v4, kill=False),
                frames("v4-data5", b"\x0a" + v4 + b"hello", kill=False),
                frames("v6-data4", b"\x0a" + v6 + b"abcd", kill=False),
            ],
            "forward requests (type 10)",
        )


@scenario
async def onion_reply_types(_ep: Endpoint, rec: Recorder) -> None:
    """A type 8 request reaches a local UDP "node 2" as 0x81 (R-ONION-5); node 2 answers
    through the relay's UDP port with responses 0x84, 0x86, 0x87 and 0x88. 0.2.18
    delivers only 0x84/0x86 as type 9 (R-ORET-2); 0.2.23 also 0x88 (R-ORET-2a,
    docs/protocol-changes.md); nobody delivers 0x87. Our relay runs with the compat
    setting of the reference it is compared with."""
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as node2:
        node2.bind(("127.0.0.1", 0))
        node2.setblocking(False)
        port = node2.getsockname()[1].to_bytes(2, "big")
        address = b"\x02" + socket.inet_aton("127.0.0.1") + bytes(12) + port  # form A
        await rec.connect_all("A")
        rec["A"].send_frames(b"\x08" + pattern(24, 1) + address + pattern(300, 2))
        async with asyncio.timeout(5):
            datagram, relay_udp = await loop.sock_recvfrom(node2, 2048)
        assert datagram[0] == 0x81, datagram[:1]
        block = datagram[-59:]
        responses = [bytes((kind,)) + pattern(40, kind) for kind in (0x84, 0x86, 0x87, 0x88)]
        for response in responses:
            node2.sendto(b"\x8e" + block + response, relay_udp)
            await asyncio.sleep(0.02)  # one after the other, also across shards
        delivered = {0x84, 0x86} | ({0x88} if REFERENCE_VERSION.get() != "0.2.18" else set())
        await rec.settle(
            "node 2 answers 0x84, 0x86, 0x87, 0x88",
            expect={"A": [onion(r) for r in responses if r[0] in delivered]},
            closed=set(),
        )


@scenario
async def kill_notifies_linked_peers(_ep: Endpoint, rec: Recorder) -> None:
    """Killing A (reserved id 12) sends 03 to every linked peer with the peer's own id
    (R-KILL-1, R-RSV-1), after the data A relayed just before (R-ORDER-2); the peers'
    slots become REQUESTED: data on them is dropped (R-DATA-3)."""
    await rec.connect_all("A", "B", "C")
    rec["B"].route_request(rec.key("A"))
    rec["C"].send_frames(req(rec.key("C-decoy")), req(rec.key("A")))
    await rec.settle(
        "B and C request A",
        expect={"B": [route(16, "A")], "C": [route(16, "C-decoy"), route(17, "A")]},
        closed=set(),
    )
    rec["A"].send_frames(req(rec.key("B")), req(rec.key("C")))
    await rec.settle(
        "A requests B and C",
        expect={
            "A": [route(16, "B"), connected(16), route(17, "C"), connected(17)],
            "B": [connected(16)],
            "C": [connected(17)],
        },
        closed=set(),
    )
    rec["A"].send_frames(routed(16, b"last words"), b"\x0c", ping(ping_id(8)))
    await rec.settle(
        "A sends data to B, then reserved id 12",
        expect={
            "A": [],
            "B": [data(16, b"last words"), disconnected(16)],
            "C": [disconnected(17)],
        },
        closed={"A"},
    )
    rec["B"].send_frames(routed(16, b"lost"), ping(ping_id(9)))
    rec["C"].send_frames(routed(17, b"lost"), ping(ping_id(10)))
    await rec.settle(
        "B and C send on their REQUESTED slots",
        expect={"B": [pong(ping_id(9))], "C": [pong(ping_id(10))]},
        closed={"A"},
    )


@scenario
async def killed_key_relinks(_ep: Endpoint, rec: Recorder) -> None:
    """B keeps its REQUESTED slot for a killed A (R-KILL-2, R-KILL-3): A's key coming back
    triggers nothing (R-ROUTE-7), B's repeat gets the same slot without notification
    (R-ROUTE-3), and A2's request relinks on B's old id (R-ROUTE-6)."""
    await link_with_decoy(rec, "B", "A")  # B:17 = A, A:16 = B
    rec["A"].send_frames(routed(99, b"unused slot"))
    await rec.settle(
        "A sends data on an unused slot",
        expect={"A": [], "B": [disconnected(17)]},
        closed={"A"},
    )
    await rec.connect("A2", identity="A")
    await rec.settle("A2 (A's key) connects", expect={"A2": [], "B": []}, closed={"A"})
    rec["B"].route_request(rec.key("A"))
    await rec.settle(
        "B repeats its request for A",
        expect={"A2": [], "B": [route(17, "A")]},
        closed={"A"},
    )
    rec["A2"].route_request(rec.key("B"))
    await rec.settle(
        "A2 requests B",
        expect={"A2": [route(16, "B"), connected(16)], "B": [connected(17)]},
        closed={"A"},
    )
    rec["B"].send_data(17, b"welcome back")
    await rec.settle("B sends data", expect={"A2": [data(16, b"welcome back")]}, closed={"A"})


# -- handshake and stream handling -------------------------------------------------------


@scenario
async def bad_hello(_ep: Endpoint, rec: Recorder) -> None:
    """A hello that does not open is answered by closing, without a reply (R-HS-2)."""
    corrupt = await rec.open_raw("corrupt-box")
    hello = bytearray(corrupt.hello)
    hello[100] ^= 0x80
    corrupt.send_raw(bytes(hello))
    random = await rec.open_raw("random-128")
    random.send_raw(os.urandom(128))
    wrong = await rec.open_raw("wrong-server-key", server_pk=rec.key("not-the-server"))
    wrong.send_raw(wrong.hello)
    swapped = await rec.open_raw("other-client-key")
    swapped.send_raw(rec.key("someone-else") + swapped.hello[32:])
    names = ["corrupt-box", "random-128", "wrong-server-key", "other-client-key"]
    await rec.settle(
        "four bad hellos",
        expect={n: [] for n in names},
        closed=set(names),
        handshake=dict.fromkeys(names, "none"),
    )


@scenario
async def hello_split_and_batched_first_frames(_ep: Endpoint, rec: Recorder) -> None:
    """A hello in 127 + 1 bytes is fine (R-HS-1). Three frames in one write right after
    the reply (the first confirms) are all answered, in order (R-ORDER-2, R-CONF-1)."""
    client = await rec.open_raw("H")
    client.send_raw(client.hello[:127])
    await rec.settle(
        "127 bytes of the hello", expect={"H": []}, closed=set(), handshake={"H": "none"}
    )
    client.send_raw(client.hello[127:])
    await client.wait_handshake()
    await rec.settle("the 128th byte", expect={"H": []}, closed=set(), handshake={"H": "done"})
    client.send_frames(ping(ping_id(11)), req(rec.key("H")), ping(ping_id(12)))
    await rec.settle(
        "three frames in one write",
        expect={"H": [pong(ping_id(11)), route(0, "H"), pong(ping_id(12))]},
        closed=set(),
    )


@scenario
async def hello_with_trailing_bytes(_ep: Endpoint, rec: Recorder) -> None:
    """Bytes written together with the hello stay queued and are parsed as frames after
    the reply (R-HS-1): an L=0 frame there is ignored (R-FRAME-3)."""
    client = await rec.open_raw("T")
    client.send_raw(client.hello + b"\x00\x00")
    await client.wait_handshake()
    client.send_frames(ping(ping_id(13)))
    await rec.settle(
        "hello + L=0, then PING",
        expect={"T": [pong(ping_id(13))]},
        closed=set(),
        handshake={"T": "done"},
    )


@scenario
async def hello_with_trailing_bad_frame(_ep: Endpoint, rec: Recorder) -> None:
    """A hello followed in the same write by a bad frame (L=1, R-FRAME-4): the hello is
    answered (R-HS-4: the reply is sent with one send() during the handshake) and only
    then is the connection killed while UNCONFIRMED (R-CONF-1)."""
    client = await rec.open_raw("T")
    client.send_raw(client.hello + b"\x00\x01\x00")
    await rec.settle(
        "hello + L=1 in one write",
        expect={"T": []},
        closed={"T"},
        handshake={"T": "done"},
    )


@scenario
async def frame_in_pieces(_ep: Endpoint, rec: Recorder) -> None:
    """Frames arriving in 1-5-byte pieces are reassembled (R-FRAME-1)."""
    client = await rec.connect("A")
    stream = client.frame(req(rec.key("A"))) + client.frame(ping(ping_id(14)))
    position, size = 0, 1
    while position < len(stream):
        client.send_raw(stream[position : position + size])
        position += size
        size = size % 5 + 1
        await asyncio.sleep(0.01)
    await rec.settle(
        "own-key request and PING in pieces",
        expect={"A": [route(0, "A"), pong(ping_id(14))]},
        closed=set(),
    )


# ---------------------------------------------------------------------------
# Fixtures and the test
# ---------------------------------------------------------------------------


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@dataclass(frozen=True)
class Reference:
    """A reference daemon and the ``compat`` our relay uses when compared with it."""

    version: str
    relay: ReferenceRelay

    @property
    def our_config(self) -> str | None:
        return f'compat = "{self.version}"\n' if self.version == "0.2.18" else None


@pytest.fixture(scope="module", params=REFERENCE_VERSIONS)
def reference(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[Reference]:
    """Debian's tox-bootstrapd 0.2.18 (``compat = "0.2.18"`` on our side), or
    tox-bootstrapd 0.2.23 built from ../shared/vendor (our default behaviour)."""
    version = request.param
    if version == "0.2.18":
        binary = BOOTSTRAPD_PATH
        if not bootstrapd_available():
            reason = f"{BOOTSTRAPD_PATH} not installed (apt-get install toxcore-utils)"
            if _in_ci():
                pytest.fail(f"{reason}; required when CI is set")
            pytest.skip(reason)
    else:
        binary = require_toxcore_0223().bootstrapd
    relay = start_bootstrapd(
        tmp_path_factory.mktemp(f"bootstrapd-{version}"), SERVER_SK, binary=binary
    )
    try:
        yield Reference(version, relay)
    finally:
        relay.stop()


@pytest.fixture(scope="module", params=[1, 4], ids=["1-worker", "4-workers"])
def our_relay(
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
    reference: Reference,
) -> Iterator[RelayProcess]:
    """Our relay with one shard, and with four (clients then land on shards as the
    kernel spreads them, so the cross-shard paths are exercised at random), following
    the reference it is compared with."""
    relay = start_relay(
        Path(tmp_path_factory.mktemp("ours")),
        secret_key=SERVER_SK,
        workers=request.param,
        allow_private_next_hops=True,  # the scenarios' next hops are on loopback
        config=reference.our_config,
    )
    try:
        yield relay
    finally:
        relay.stop()


#: Scenarios in which a reference deliberately differs from us (docs/differences.md,
#: "tox-bootstrapd 0.2.23"): the test then checks that each of its clients either saw
#: what ours saw or shows the documented stall (nothing received, not closed).
DOCUMENTED_DIFFERENCES = {
    ("0.2.23", "frame_zero_length"),
    ("0.2.23", "hello_with_trailing_bytes"),
}


def _undocumented_differences(reference_transcript: Transcript, ours: Transcript) -> list[str]:
    """tox-bootstrapd 0.2.23 (epoll, edge-triggered, TCP_server.c tcp_epoll_process)
    stops reading a socket at a zero-length frame (read_packet_tcp_secure_connection
    returns 0 for it, as for "no data yet"), so whatever is already queued behind it
    waits for the next bytes to arrive; whether the frame behind it was already
    queued is a matter of timing. Anything else than "same as ours" or "stalled" is
    reported."""
    problems = []
    if [step.label for step in reference_transcript] != [step.label for step in ours]:
        return ["the steps differ"]
    for theirs, our_step in zip(reference_transcript, ours, strict=True):
        for record in theirs.clients:
            same = record == our_step[record.name]
            stalled = not record.events and not record.closed
            if not (same or stalled):
                problems.append(f"{theirs.label}: {format_record(record)}")
    return problems


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_scenario(name: str, reference: Reference, our_relay: RelayProcess) -> None:
    run = SCENARIOS[name]
    bootstrapd = reference.relay
    assert bootstrapd.public_key == our_relay.public_key
    assert bootstrapd.running, "tox-bootstrapd is not running"
    assert our_relay.running, "our relay is not running"
    stderr_before = len(our_relay.stderr_text())
    endpoints = {
        REFERENCE: Endpoint(bootstrapd.host, bootstrapd.port, bootstrapd.public_key),
        OURS: Endpoint(our_relay.host, our_relay.port, our_relay.public_key),
    }
    REFERENCE_VERSION.set(reference.version)  # asyncio.run copies this context
    transcripts = asyncio.run(run_on_all(run, endpoints))
    reference_transcript, ours = transcripts[REFERENCE], transcripts[OURS]

    assert our_relay.running, "our relay died during the scenario"
    new_stderr = our_relay.stderr_text()[stderr_before:]
    assert "Traceback" not in new_stderr, f"our relay logged a traceback:\n{new_stderr}"
    assert reference_transcript, "the scenario recorded no step"
    if (reference.version, name) in DOCUMENTED_DIFFERENCES:
        problems = _undocumented_differences(reference_transcript, ours)
        assert not problems, f"tox-bootstrapd {reference.version} changed: {problems}"
    else:
        diff = transcript_diff(REFERENCE, reference_transcript, OURS, ours)
        assert not diff, f"transcripts differ:\n{diff}"
    failures = expectation_failures(ours)
    assert not failures, "our relay (and tox-bootstrapd) broke expectations:\n" + "\n".join(
        failures
    )
