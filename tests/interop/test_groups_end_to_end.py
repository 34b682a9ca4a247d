"""Issue 11: current toxcore clients (c-toxcore 0.2.23) -- friends, a public group joined
by chat id and a private group joined by invite -- through one TCP relay.

The scenario is :mod:`testbed.groups`; the clients and the private 3-node DHT
(UDP onion hops 2-3, their TCP relays off) are c-toxcore 0.2.23 built from
``../shared/vendor`` (``tests/support/toxcore0223.py``). The relays under test:

* ``bootstrapd-0.2.23`` -- tox-bootstrapd 0.2.23, the reference: proves the harness;
* ``ours-1w`` -- ``cluster start --workers 1``;
* ``ours-2w-cross`` -- ``--workers 2 --shard-ports``, A on one shard and B on the other,
  so announce responses, the friend connection and both groups cross shards.

A public group needs R-ORET-2a (docs/protocol-changes.md): with the 0.2.18 behaviour
(``compat = "0.2.18"``, as this relay was before issue 11) B never finds the group's
founder and step b times out. One run takes ~50 s, ~39 s of it until the friends are
connected (toxcore 0.2.23's own timers over TCP-only relays, the same with
tox-bootstrapd 0.2.23).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.friends import ScenarioError
from testbed.groups import GroupsResult, run_groups_scenario
from testbed.relay_kinds import RelayUnderTest, start_relay_under_test
from testbed.toxcore import ToxError
from testbed.toxcore0223 import VERSION, Toxcore0223, require_toxcore_0223
from testbed.toxdht import PrivateDht, start_private_dht
from testbed.toxgroups import load_group_toxcore

pytestmark = [pytest.mark.reference, pytest.mark.slow, pytest.mark.timeout(200)]


@pytest.fixture(scope="module")
def toxcore() -> Toxcore0223:
    return require_toxcore_0223()


@pytest.fixture(scope="module")
def private_dht_0223(
    toxcore: Toxcore0223, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PrivateDht]:
    dht = start_private_dht(tmp_path_factory.mktemp("dht-0223"), binary=toxcore.bootstrapd)
    try:
        yield dht
    finally:
        dht.stop()


@pytest.fixture(params=["bootstrapd-0.2.23", "ours-1w", "ours-2w-cross"])
def relay_under_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayUnderTest]:
    relay = start_relay_under_test(request.param, tmp_path)
    try:
        yield relay
    finally:
        relay.stop()


def describe(result: GroupsResult) -> str:
    return (
        f"friend connected {result.friend_connected_s:.1f} s, public group joined "
        f"{result.public_join_s:.1f} s, private group joined {result.private_join_s:.1f} s, "
        f"group echo RTT median {statistics.median(result.group_rtts) * 1000:.1f} ms"
    )


def wait_for_totals(status_totals: Callable[[], dict], done: Callable[[dict], bool]) -> dict:
    """Our relay's totals once its workers' 1 s reports satisfy ``done`` (or after 5 s)."""
    deadline = time.monotonic() + 5
    while True:
        totals = status_totals()
        if done(totals) or time.monotonic() > deadline:
            return totals
        time.sleep(0.3)


def test_current_clients_use_friends_and_groups_through_the_relay(
    relay_under_test: RelayUnderTest, private_dht_0223: PrivateDht, toxcore: Toxcore0223
) -> None:
    relay = relay_under_test
    try:
        lib = load_group_toxcore(str(toxcore.library), VERSION)
    except ToxError as error:
        pytest.fail(f"the 0.2.23 library is not usable: {error}")
    try:
        result = run_groups_scenario(
            relay.endpoint_a, relay.endpoint_b, private_dht_0223.nodes, lib
        )
    except ScenarioError as error:
        totals = relay.status_totals() if relay.status_totals is not None else {}
        pytest.fail(
            f"[{relay.name}] {error}\n--- relay totals {totals}\n--- relay "
            f"(running={relay.running()}) log tail:\n{relay.logs()[-4000:]}"
        )
    print(f"\n[{relay.name}] {describe(result)}")

    assert relay.running(), relay.logs()
    assert private_dht_0223.all_running()
    # Every socket of the clients led to the relay (checked by the scenario); both
    # endpoints were used, A's and B's.
    remote_ports = {s.remote_port for s in result.sockets if s.state == "ESTABLISHED"}
    assert remote_ports == {relay.endpoint_a.port, relay.endpoint_b.port}, result.sockets
    if relay.shard_ports:
        assert relay.endpoint_a.port != relay.endpoint_b.port  # different shards
    if relay.status_totals is not None:
        # Our relay's own counters: group announce responses (0x88) went through its
        # onion first hop, and the messages through its routing.
        messages = 2 * (20 + 5)  # both groups, both ways (GroupsConfig defaults)
        totals = wait_for_totals(relay.status_totals, lambda t: t["relayed_packets"] >= messages)
        by_type = totals["onion_replies_by_type"]
        assert by_type.get("0x88", 0) > 0 and by_type.get("0x84", 0) > 0, totals
        assert totals["onion_replies_dropped_bad_type"] == 0, totals
        assert totals["relayed_packets"] >= messages, totals
        print(f"[{relay.name}] onion replies by type {by_type}")
