"""The chaos run under load (issue 10): ops/bench/chaos.py against a real cluster.

Client pairs on one shard and across shards (from several 127.x addresses) relay
numbered frames while a worker is kill -9ed, the coordinator is kill -9ed, a worker is
SIGSTOPped for 5 s and resumed, the supervisor reloads (SIGHUP), and a worker and the
coordinator are kill -9ed together. The run happens once per module; each test asserts
what docs/architecture.md ("Failure behaviour an operator can expect") and
docs/operations.md (sections 5 and 7) promise for one event:

* worker kill -9: only its clients are disconnected (they reconnect); their peers on
  other shards are notified; nobody else notices;
* coordinator kill -9: nothing; established links keep relaying;
* a hung worker: its own clients stall, the others are not slowed; after 3 s its links
  end and relink when it resumes;
* reload: the clients of each replaced worker are disconnected once and reconnect; the
  ports never close;
* a worker and the coordinator kill -9ed together: as for the worker alone.

CI form by default (24 pairs, about 17 s). The long form (150 pairs, the same run as
the figures in docs/benchmarks.md, "Chaos run", plus kill-both): ``TOXRELAY_CHAOS=long``.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from ops.bench.chaos import EVENTS, Event, Options, make_pairs, parse_args, run_chaos
from ops.bench.chaos_report import analyse, format_table, splice_section

LONG = os.environ.get("TOXRELAY_CHAOS", "").strip().lower() == "long"
RUN_EVENTS = (*EVENTS, "kill-both")
OPTIONS = (
    Options(workers=2, pairs=150, warmup=2.0, settle=3.0, events=RUN_EVENTS)
    if LONG
    else Options(workers=2, pairs=24, warmup=1.0, settle=1.0, events=RUN_EVENTS)
)
KILL_SLOT = OPTIONS.kill_slot % OPTIONS.workers
STOP_SLOT = OPTIONS.stop_slot % OPTIONS.workers
RESTART_BOUND = 5.0  # seconds: supervisor back-off 0.2 s, worker start, handshake, link

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400 if LONG else 110)]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict:
    workdir: Path = tmp_path_factory.mktemp("chaos")
    options = Options(**{**OPTIONS.__dict__, "workdir": str(workdir / "relay")})

    async def bounded() -> dict:
        async with asyncio.timeout(360 if LONG else 100):
            return await run_chaos(options)

    found = asyncio.run(bounded())
    print("\n" + format_table(found))
    return found


def window(result: dict, event: str) -> dict:
    (row,) = [row for row in result["windows"] if row["event"] == event]
    return row


def explain(result: dict) -> str:
    return format_table(result) + "\n" + "\n".join(result["relay_log_tail"])


def own_pairs(slot: int) -> int:
    return sum(slot in pair.slots for pair in make_pairs(OPTIONS))


def clients_on(slot: int) -> int:
    return sum(end.slot == slot for pair in make_pairs(OPTIONS) for end in pair.ends)


def test_the_run_covers_every_event_and_both_placements(result: dict) -> None:
    assert [row["event"] for row in result["windows"]] == ["steady", *RUN_EVENTS]
    assert result["placements"]["same-shard"] > 0 and result["placements"]["cross-shard"] > 0
    assert result["frames_delivered"] > 0


def test_every_frame_reaches_its_own_pair_once_and_in_order(result: dict) -> None:
    assert result["misrouted"] == 0, explain(result)
    assert result["duplicates"] == 0, explain(result)
    assert result["reordered"] == 0, explain(result)


def test_steady_traffic_disrupts_and_loses_nothing(result: dict) -> None:
    steady = window(result, "steady")
    assert steady["disrupted_own"] + steady["disrupted_beyond"] == 0, explain(result)
    assert steady["lost_outside"] == 0, explain(result)


@pytest.mark.parametrize("event", ["kill-worker", "kill-both"])
def test_kill_9_of_a_worker_disrupts_only_its_own_pairs(result: dict, event: str) -> None:
    """Also when the coordinator is killed at the same moment (kill-both): the drop
    of the dead worker's shard then waits for the new coordinator."""
    row = window(result, event)
    assert row["own_pairs"] == own_pairs(KILL_SLOT)
    # The kill happened: every pair with an end on that worker noticed it ...
    assert row["disrupted_own"] == row["own_pairs"], explain(result)
    assert row["clients_closed"] == clients_on(KILL_SLOT), explain(result)
    assert row["max_closes_per_client"] == 1, explain(result)
    # ... and nobody else: no notification, no pause, no frame lost.
    assert row["disrupted_beyond"] == 0, explain(result)
    assert row["lost_outside"] == 0, explain(result)
    # Its clients reconnect to the new worker and relink, and the shared port stayed open.
    assert row["unrecovered_pairs"] == [], explain(result)
    assert row["relinked"] == row["own_pairs"]
    assert row["relink_max_s"] < RESTART_BOUND, explain(result)
    assert row["probes_refused"] == 0, explain(result)


def test_kill_9_of_the_coordinator_disrupts_nothing(result: dict) -> None:
    row = window(result, "kill-coordinator")
    assert "coordinator_back_s" in row["notes"]
    assert row["own_pairs"] == 0
    assert row["disrupted_own"] + row["disrupted_beyond"] == 0, explain(result)
    assert row["lost_own"] + row["lost_outside"] == 0, explain(result)
    assert row["clients_closed"] == 0, explain(result)
    assert row["probes_failed"] == 0, explain(result)


def test_a_stopped_worker_stalls_only_its_own_pairs(result: dict) -> None:
    row = window(result, "stop-worker")
    assert row["own_pairs"] == own_pairs(STOP_SLOT)
    assert row["disrupted_own"] == row["own_pairs"], explain(result)  # they stalled
    assert row["disrupted_beyond"] == 0, explain(result)
    assert row["lost_outside"] == 0, explain(result)
    assert row["max_gap_outside_ms"] < OPTIONS.stall * 1000
    assert row["clients_closed"] == 0, explain(result)  # stalled, not disconnected
    # Resumed, every pair it held passes traffic again (relinked when past 3 s).
    assert row["unrecovered_pairs"] == [], explain(result)
    assert row["relink_max_s"] < OPTIONS.stop_seconds + RESTART_BOUND, explain(result)
    assert row["probes_refused"] == 0, explain(result)


def test_a_reload_disconnects_each_client_once_and_closes_no_port(result: dict) -> None:
    row = window(result, "reload")
    assert row["own_pairs"] == row["pairs"]
    assert row["clients_closed"] == 2 * row["pairs"], explain(result)
    assert row["max_closes_per_client"] == 1, explain(result)
    assert row["unrecovered_pairs"] == [], explain(result)
    assert row["relink_max_s"] < 2 * RESTART_BOUND, explain(result)
    assert row["probes_refused"] == 0, explain(result)


def test_the_command_line_checks_its_options() -> None:
    options, as_json, doc = parse_args(
        ["--workers", "3", "--events", "reload,kill-worker", "--json", "--doc", "x.md"]
    )
    assert (options.workers, options.events, as_json) == (3, ("reload", "kill-worker"), True)
    assert doc == Path("x.md")
    for bad in (["--events", "kill-all"], ["--workers", "2", "--kill-slot", "5"], ["--pairs", "0"]):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(bad)
        assert exit_info.value.code == 2


def test_the_report_finds_disruption_loss_and_stalls_outside_the_own_pairs() -> None:
    """The judgement itself, on a made-up recording: 3 pairs (0-0, 1-1, 0-1), frames every
    50 ms for 10 s, worker slot 0 killed at 5 s. Pair 0 (own) loses what it sent from
    4.9 s, is closed and flows again at 5.5 s; pair 1 (beyond) stalls 1.5 s before the
    event (late, not lost), loses one frame sent at 6 s and gets a disconnect at 6.5 s;
    pair 2 (own) notices nothing."""
    options = Options(workers=2, pairs=3, stall=1.0)
    pairs = make_pairs(options)
    assert [pair.slots for pair in pairs] == [(0, 0), (1, 1), (0, 1)]
    for pair in pairs:
        for end in pair.ends:
            for seq in range(200):
                sent = seq * 0.05
                end.outgoing.send_times.append(sent)
                if pair.index == 0 and 4.9 <= sent < 5.5:
                    continue  # the killed worker's pair: what was in flight is lost
                if pair.index == 1 and end.side == 0 and seq == 120:
                    continue  # beyond: one frame lost at 6.0 s
                stalled = pair.index == 1 and 2.0 < sent < 3.5  # beyond: held until 3.5 s
                end.outgoing.arrivals.append((seq, 3.5 if stalled else sent + 0.001))
    pairs[0].a.marks += [(5.01, "closed"), (5.4, "connected")]
    pairs[0].b.marks += [(5.01, "closed"), (5.4, "connected")]
    pairs[1].a.marks += [(6.5, "disconnected")]
    event = Event("kill-worker", 5.0, own_slots=(0,), action_done=5.1, recovered=5.6)
    recording = SimpleNamespace(
        options=options,
        pairs=pairs,
        endpoints=[end for pair in pairs for end in pair.ends],
        events=[event],
        probes=[],
        misrouted=0,
        traffic_started=0.0,
        traffic_stopped=10.0,
    )
    report = analyse(recording)  # type: ignore[arg-type]
    steady, killed = report["windows"]
    assert (steady["disrupted_own"], steady["disrupted_beyond"]) == (0, 1)
    assert steady["lost_outside"] == 0  # late, not lost
    assert (killed["own_pairs"], killed["disrupted_own"], killed["disrupted_beyond"]) == (2, 1, 1)
    # Pair 0's frames sent 0.1 s before the kill were in flight: lost by the kill.
    assert steady["lost_own"] + steady["lost_outside"] == 0
    assert killed["lost_own"] == 2 * 12 and killed["lost_outside"] == 1
    # relinked: pair 0 at its first frame after the close, pair 1 after its disconnect
    assert killed["relinked"] == 2 and killed["unrecovered_pairs"] == []
    assert (killed["relink_p50_s"], killed["relink_max_s"]) == pytest.approx((1.001, 1.501))
    assert killed["clients_closed"] == 2 and killed["max_closes_per_client"] == 1
    assert killed["goal_failures"] and not report["goals_met"]


def test_the_doc_section_is_inserted_once_and_then_replaced() -> None:
    doc = "# Benchmarks\n\n## Targets\n\nt\n\n## Machine\n\nm\n"
    first = splice_section(doc, "## Chaos run\n\nrun 1\n")
    assert first == "# Benchmarks\n\n## Targets\n\nt\n\n## Chaos run\n\nrun 1\n\n## Machine\n\nm\n"
    second = splice_section(first, "## Chaos run\n\nrun 2\n")
    assert second == first.replace("run 1", "run 2")
