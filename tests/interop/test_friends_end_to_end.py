"""Issue 4: two real toxcore clients become friends and talk through one TCP relay.

Each test runs the scenario of :mod:`testbed.friends` (friend request, both
friends connected, messages both ways, timed echo round trips, a file checked byte by
byte, and "no other path") with the same private 3-node DHT on loopback and a
different relay under test:

* ``bootstrapd`` -- Debian's tox-bootstrapd 0.2.18 with its TCP relay on and no
  bootstrap nodes (it is not part of the DHT): the reference, proves the harness;
  ``bootstrapd-2ports``: the same on two ports, A on one, B on the other (what the
  cross-shard case looks like to the clients: one relay key, two addresses).
* ``ours-1w``, ``ours-2w`` (both clients on the shared port, the kernel picks their
  shards) and ``ours-2w-cross`` (``--shard-ports``: A on one shard's direct port, B on
  the other's, so onion responses and the friend connection cross shards); see
  ``testbed/relay_kinds.py``.

Every wait is bounded (ScenarioConfig); a run takes ~17-27 s against tox-bootstrapd on
a busy 2-core machine (about 9-10 s of it until the friends are connected).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from testbed.bootstrapd import BOOTSTRAPD_PATH, _in_ci, bootstrapd_available
from testbed.friends import FriendsResult, ScenarioError, run_friends_scenario
from testbed.relay_kinds import RelayUnderTest, start_relay_under_test
from testbed.toxcore import load_toxcore, toxcore_error
from testbed.toxdht import PrivateDht

pytestmark = [pytest.mark.reference, pytest.mark.slow, pytest.mark.timeout(110)]


@pytest.fixture(autouse=True)
def _toxcore_installed() -> None:
    """Skip without libtoxcore or tox-bootstrapd (the DHT, and one relay under test),
    except in CI (``$CI`` set), where both are installed and a skip would hide a gap."""
    reasons = []
    if load_toxcore() is None:
        reasons.append(f"libtoxcore not loadable ({toxcore_error()}); apt-get install libtoxcore2")
    if not bootstrapd_available():
        reasons.append(f"{BOOTSTRAPD_PATH} not installed (apt-get install toxcore-utils)")
    if reasons:
        if _in_ci():
            pytest.fail(f"{'; '.join(reasons)}; required when CI is set")
        pytest.skip("; ".join(reasons))


@pytest.fixture(
    params=[
        "bootstrapd",
        "bootstrapd-2ports",
        "ours-1w",
        "ours-2w",
        "ours-2w-cross",
    ]
)
def relay_under_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RelayUnderTest]:
    relay = start_relay_under_test(request.param, tmp_path)
    try:
        yield relay
    finally:
        relay.stop()


def describe(result: FriendsResult) -> str:
    return (
        f"self-connected {result.self_connected_s:.2f} s, friend request "
        f"{result.friend_request_s:.2f} s, friend connected {result.friend_connected_s:.2f} s; "
        f"message RTT median {result.rtt_median * 1000:.1f} ms, p95 "
        f"{result.rtt_p95 * 1000:.1f} ms ({len(result.rtts)}); file {result.file_size} B "
        f"in {result.file_s:.2f} s = {result.file_mb_per_s:.2f} MB/s"
    )


def wait_for_counters(status_totals: Callable[[], dict], file_size: int) -> dict:
    """The totals once the workers' 1 s reports include the file transfer."""
    deadline = time.monotonic() + 5
    while True:
        totals = status_totals()
        if totals["relayed_packets"] * 1300 >= file_size or time.monotonic() > deadline:
            return totals
        time.sleep(0.3)


def test_two_toxcore_clients_become_friends_and_talk_through_the_relay(
    relay_under_test: RelayUnderTest, private_dht: PrivateDht
) -> None:
    relay = relay_under_test
    assert private_dht.all_running()
    try:
        result = run_friends_scenario(relay.endpoint_a, relay.endpoint_b, private_dht.nodes)
    except ScenarioError as error:
        logs = relay.logs()[-4000:]
        pytest.fail(
            f"[{relay.name}] {error}\n--- relay (running={relay.running()}) log tail:\n{logs}"
        )
    print(f"\n[{relay.name}] {describe(result)}")

    # The scenario checked contents, order, the file's bytes and "no other path";
    # here: the relay and the DHT survived, and each client used its own endpoint.
    assert relay.running(), relay.logs()
    assert private_dht.all_running()
    remote_ports = sorted(s.remote_port for s in result.sockets if s.state == "ESTABLISHED")
    expected = sorted([relay.endpoint_a.port, relay.endpoint_b.port])
    assert remote_ports == expected, result.sockets
    if relay.shard_ports:  # A and B on different shards: the traffic crossed shards
        assert relay.endpoint_a.port != relay.endpoint_b.port
    if relay.status_totals is not None:
        # Our relay's own counters: the clients found each other through its
        # onion first hop (type 8 out, type 9 back) and their data went through it.
        totals = wait_for_counters(relay.status_totals, result.file_size)
        assert totals["onion_requests"] > 0 and totals["onion_replies"] > 0, totals
        assert totals["relayed_packets"] > 0, totals
