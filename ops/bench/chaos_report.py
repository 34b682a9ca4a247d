"""What a chaos run (ops/bench/chaos.py) recorded, judged per event window, and its table.

A window runs from an event's signal to the next event's (the last one to the end of the
traffic); a "steady" window before the first event is the control. In each window a pair
is *disrupted* when one of its clients lost its connection or got a
DISCONNECT_NOTIFICATION there, or when one direction went ``stall`` seconds or more
without a frame. A frame is *lost* when it never arrived; it belongs to the window in
which its loss showed: when a later frame of the same direction arrived (or, when none
ever did, when it was sent). So a frame still in flight when an event hit (sent before
the signal, however slow the machine) counts for that event.
"""

from __future__ import annotations

import bisect
import itertools
import statistics
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ops.bench import page

if TYPE_CHECKING:
    from ops.bench.chaos import Chaos, Direction, Event, Pair

CLOSED = "closed"
DISCONNECTED = "disconnected"
CONNECTED = "connected"


@dataclass
class Window:
    name: str
    start: float
    end: float
    own_slots: tuple[int, ...]
    event: Event | None


def windows(chaos: Chaos) -> list[Window]:
    events = sorted(chaos.events, key=lambda event: event.started)
    bounds = [event.started for event in events] + [chaos.traffic_stopped]
    found = [Window("steady", chaos.traffic_started, bounds[0], (), None)]
    for index, event in enumerate(events):
        found.append(Window(event.name, event.started, bounds[index + 1], event.own_slots, event))
    return found


def _times(direction: Direction) -> list[float]:
    return [at for _, at in direction.arrivals]


def _direction_in_window(
    times: list[float], window: Window, last_break: float | None, stall: float
) -> tuple[float, float | None, bool]:
    """(longest pause, time this direction flowed again, stalled) within the window.

    The direction flowed again at its first frame after ``last_break`` (a close or
    disconnect) and after its last pause of ``stall`` seconds or more; None if no frame
    came after the break or the window ended in a pause."""
    first = bisect.bisect_left(times, window.start)
    last = bisect.bisect_left(times, window.end)
    previous = times[first - 1] if first > 0 else window.start
    longest, stall_end = 0.0, None
    for at in times[first:last]:
        if at - previous >= stall:
            stall_end = at
        longest = max(longest, at - previous)
        previous = at
    tail = window.end - previous
    longest = max(longest, tail)
    stalled = longest >= stall
    if tail >= stall:
        return longest, None, True
    flowed = stall_end
    if last_break is not None:
        after = bisect.bisect_right(times, last_break)
        if after >= last:
            return longest, None, True
        flowed = max(flowed or 0.0, times[after])
    return longest, flowed, stalled


def loss_times(direction: Direction) -> list[float]:
    """For each frame never delivered, when its loss showed: the arrival of the first
    later frame (by sequence number), or its send time when no later frame arrived."""
    received = {seq for seq, _ in direction.arrivals}
    lost = [seq for seq in range(len(direction.send_times)) if seq not in received]
    shown: dict[int, float] = {}
    pending = 0  # lost[:pending] have their time
    for seq, at in direction.arrivals:  # in arrival order
        while pending < len(lost) and lost[pending] < seq:
            shown[lost[pending]] = at
            pending += 1
    return sorted(shown.get(seq, direction.send_times[seq]) for seq in lost)


def _pair_label(pair: Pair) -> str:
    return f"{pair.index} ({pair.placement} {pair.slots[0]}-{pair.slots[1]})"


def analyse_window(
    chaos: Chaos, window: Window, last: bool, losses: dict[int, list[list[float]]]
) -> dict:
    stall = chaos.options.stall
    own_pairs, disrupted_own, disrupted_beyond = 0, [], []
    relinks, unrecovered = [], []
    lost_own, lost_outside, lost_outside_pairs = 0, 0, []
    lost_own_by_placement = {"same-shard": 0, "cross-shard": 0}
    longest_outside = 0.0
    closes: dict[str, int] = {}
    loss_end = float("inf") if last else window.end
    for pair in chaos.pairs:
        own = any(slot in window.own_slots for slot in pair.slots)
        own_pairs += own
        breaks = [
            at
            for endpoint in pair.ends
            for at, kind in endpoint.marks
            if kind in (CLOSED, DISCONNECTED) and window.start <= at < window.end
        ]
        for endpoint in pair.ends:
            count = sum(
                1
                for at, kind in endpoint.marks
                if kind == CLOSED and window.start <= at < window.end
            )
            if count:
                closes[endpoint.name] = count
        last_break = max(breaks) if breaks else None
        stalled, longest, flowed = False, 0.0, []
        for endpoint in pair.ends:
            gap, again, stopped = _direction_in_window(
                _times(endpoint.outgoing), window, last_break, stall
            )
            longest = max(longest, gap)
            stalled = stalled or stopped
            flowed.append(again)
        lost = sum(
            bisect.bisect_left(shown, loss_end) - bisect.bisect_left(shown, window.start)
            for shown in losses[pair.index]
        )
        disrupted = bool(breaks) or stalled
        if own:
            lost_own += lost
            lost_own_by_placement[pair.placement] += lost
        else:
            longest_outside = max(longest_outside, longest)
            lost_outside += lost
            if lost:
                lost_outside_pairs.append(f"{_pair_label(pair)}: {lost}")
        if not disrupted:
            continue
        kinds = sorted(
            {kind for end in pair.ends for at, kind in end.marks if window.start <= at < window.end}
        )
        reason = (
            f"{_pair_label(pair)}: {len(breaks)} break(s) ({', '.join(kinds)}), "
            f"longest pause {longest:.2f} s, {lost} lost"
        )
        (disrupted_own if own else disrupted_beyond).append(reason)
        if None in flowed:
            unrecovered.append(_pair_label(pair))
        else:
            relinks.append(max(at for at in flowed if at is not None) - window.start)
    # A probe counts where it ended: one that hangs on a worker stopped after it began
    # fails (times out) in the stop's window.
    probes = [probe for probe in chaos.probes if window.start <= probe.ended < loss_end]
    event = window.event
    return {
        "event": window.name,
        "target": event.target if event else "",
        "duration_s": round(window.end - window.start, 2),
        "notes": dict(event.notes) if event else {},
        "all_recovered_s": (
            round(event.recovered - event.started, 3)
            if event is not None and event.recovered is not None
            else None
        ),
        "pairs": len(chaos.pairs),
        "own_pairs": own_pairs,
        "disrupted_own": len(disrupted_own),
        "disrupted_beyond": len(disrupted_beyond),
        "disrupted_own_pairs": disrupted_own,
        "disrupted_beyond_pairs": disrupted_beyond,
        "relinked": len(relinks),
        "unrecovered_pairs": unrecovered,
        "relink_p50_s": round(statistics.median(relinks), 3) if relinks else None,
        "relink_max_s": round(max(relinks), 3) if relinks else None,
        "lost_own": lost_own,
        "lost_own_by_placement": lost_own_by_placement,
        "lost_outside": lost_outside,
        "lost_outside_pairs": lost_outside_pairs,
        "max_gap_outside_ms": round(longest_outside * 1000),
        "clients_closed": len(closes),
        "max_closes_per_client": max(closes.values(), default=0),
        "probes": len(probes),
        "probes_failed": sum(not probe.ok for probe in probes),
        "probes_refused": sum(probe.refused for probe in probes),
        "probe_errors": sorted({probe.error for probe in probes if not probe.ok})[:5],
    }


def goal_failures(row: dict) -> list[str]:
    """The goals a window missed (empty: all met)."""
    failures = []
    if row["disrupted_beyond"]:
        failures.append(f"{row['disrupted_beyond']} pair(s) disrupted beyond the own pairs")
    if row["lost_outside"]:
        failures.append(f"{row['lost_outside']} frame(s) lost outside the disrupted pairs")
    if row["unrecovered_pairs"]:
        failures.append(f"{len(row['unrecovered_pairs'])} pair(s) never passed traffic again")
    if row["probes_refused"]:
        failures.append(f"{row['probes_refused']} probe(s) refused: a port was closed")
    return failures


def analyse(chaos: Chaos) -> dict:
    found = windows(chaos)
    losses = {pair.index: [loss_times(end.outgoing) for end in pair.ends] for pair in chaos.pairs}
    rows = [
        analyse_window(chaos, w, index == len(found) - 1, losses) for index, w in enumerate(found)
    ]
    for row in rows:
        row["goal_failures"] = goal_failures(row)
    directions = [endpoint.outgoing for endpoint in chaos.endpoints]
    duplicates = reordered = 0
    for direction in directions:
        seqs = [seq for seq, _ in direction.arrivals]
        duplicates += len(seqs) - len(set(seqs))
        reordered += sum(1 for before, after in itertools.pairwise(seqs) if after < before)
    return {
        "workers": chaos.options.workers,
        "pairs": len(chaos.pairs),
        "placements": {
            kind: sum(pair.placement == kind for pair in chaos.pairs)
            for kind in ("same-shard", "cross-shard")
        },
        "frames_sent": sum(len(d.send_times) for d in directions),
        "frames_delivered": sum(len(d.arrivals) for d in directions),
        "misrouted": chaos.misrouted,
        "duplicates": duplicates,
        "reordered": reordered,
        "windows": rows,
        "goals_met": not chaos.misrouted
        and not duplicates
        and not any(row["goal_failures"] for row in rows),
    }


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def summary_line(result: dict) -> str:
    options = result.get("options", {})
    return (
        f"Chaos run: {result['workers']} workers, {result['pairs']} pairs "
        f"({result['placements']['same-shard']} same-shard, "
        f"{result['placements']['cross-shard']} cross-shard) from "
        f"{options.get('sources', '?')} source addresses, {options.get('rate', '?')} "
        f"frames/s each way; {result['frames_sent']} frames sent, "
        f"{result['frames_delivered']} delivered, {result['misrouted']} misrouted, "
        f"{result['duplicates']} duplicated, {result['reordered']} reordered"
    )


def table_lines(result: dict) -> list[str]:
    """One markdown table row per window."""
    columns = (
        "event",
        "own pairs",
        "disrupted own",
        "disrupted beyond",
        "relinked",
        "relink p50 s",
        "relink max s",
        "lost own",
        "lost outside",
        "max gap outside ms",
        "probes failed",
    )
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in result["windows"]:
        cells = (
            row["event"],
            f"{row['own_pairs']}/{row['pairs']}",
            row["disrupted_own"],
            row["disrupted_beyond"],
            row["relinked"],
            _seconds(row["relink_p50_s"]),
            _seconds(row["relink_max_s"]),
            row["lost_own"],
            row["lost_outside"],
            row["max_gap_outside_ms"] if row["own_pairs"] < row["pairs"] else "-",
            f"{row['probes_failed']}/{row['probes']}",
        )
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return lines


def event_lines(result: dict) -> list[str]:
    """Per event: its target, timings, closes, and any goal it missed (with the pairs)."""
    lines = []
    for row in result["windows"]:
        if row["event"] == "steady":
            continue
        notes = ", ".join(f"{key} {value}" for key, value in row["notes"].items())
        lines.append(
            f"{row['event']}: {row['target']}; {notes}; every pair flowing again after "
            f"{_seconds(row['all_recovered_s'])} s; clients closed {row['clients_closed']} "
            f"(at most {row['max_closes_per_client']} times each)"
        )
        for failure in row["goal_failures"]:
            lines.append(f"  GOAL MISSED: {failure}")
        if row["probes_failed"]:
            lines.append(f"    probes failed: {'; '.join(row['probe_errors'])}")
        for detail in row["disrupted_beyond_pairs"][:10] + row["lost_outside_pairs"][:10]:
            lines.append(f"    {detail}")
    return lines


def format_table(result: dict) -> str:
    verdict = "goals met" if result["goals_met"] else "GOALS MISSED"
    return "\n".join(
        [summary_line(result), "", *table_lines(result), "", *event_lines(result), verdict]
    )


SECTION = "## Chaos run"


def render_markdown(result: dict, command: str, date: str) -> str:
    """The "Chaos run" section of docs/benchmarks.md for one run."""
    rows = {row["event"]: row for row in result["windows"]}
    lines = [
        SECTION,
        "",
        f"Generated by `{command}` on {date} ({result['wall_s']:.0f} s; "
        f"{result.get('cpus', '?')} CPUs, 1-minute load average "
        f"{result.get('load_average_1m', '?')} before the run: the relay, the clients and "
        "other work shared them). Rerun the command to refresh this section (it replaces "
        "only this section).",
        "",
        "Faults injected into a real `cluster start --shard-ports` while client pairs relay "
        "numbered frames ([ops/bench/chaos.py](../ops/bench/chaos.py) says how each figure "
        "is measured; tests/cluster_process/test_chaos.py asserts the goals on a shorter "
        "run). *Own pairs*: pairs with a client on the worker the event hits (none for the "
        "coordinator, all for a reload). Goals: no pair disrupted beyond the own pairs, no "
        "frame lost outside them, every pair passing traffic again.",
        "",
        summary_line(result) + ("; goals met." if result["goals_met"] else "; GOALS MISSED."),
        "",
        *table_lines(result),
        "",
    ]
    killed, stopped = rows.get("kill-worker"), rows.get("stop-worker")
    if killed is not None:
        lines.append(
            f"* **worker kill -9**: its {killed['clients_closed']} clients lost their "
            f"connections and reconnected to the new worker (announced after "
            f"{killed['notes'].get('replacement_announced_s', '?')} s); its pairs passed "
            f"traffic again after {_seconds(killed['relink_p50_s'])} s (median, max "
            f"{_seconds(killed['relink_max_s'])} s); they lost {killed['lost_own']} frames "
            f"(in flight through the killed process); beyond its pairs "
            f"{killed['disrupted_beyond']} were disrupted and {killed['lost_outside']} frames "
            "lost."
        )
    if "kill-coordinator" in rows:
        row = rows["kill-coordinator"]
        lines.append(
            f"* **coordinator kill -9**: a new coordinator after "
            f"{row['notes'].get('coordinator_back_s', '?')} s; pairs disrupted: "
            f"{row['disrupted_own'] + row['disrupted_beyond']}, frames lost: "
            f"{row['lost_own'] + row['lost_outside']} (longest pause between two frames of a "
            f"pair {row['max_gap_outside_ms']} ms)."
        )
    if stopped is not None:
        lines.append(
            f"* **SIGSTOP {result['options']['stop_seconds']:g} s**: the stopped worker's "
            "pairs stalled; past the coordinator's 3 s silence limit its cross-shard links "
            "ended and relinked after SIGCONT; the frames sent over those links meanwhile "
            f"were lost ({stopped['lost_own_by_placement']['cross-shard']} in cross-shard "
            f"pairs, {stopped['lost_own_by_placement']['same-shard']} in pairs on the stopped "
            f"worker alone); beyond its pairs {stopped['disrupted_beyond']} were disrupted "
            f"and {stopped['lost_outside']} frames lost (longest pause "
            f"{stopped['max_gap_outside_ms']} ms). Shared-port probes that failed in that "
            f"window: {stopped['probes_failed']} of {stopped['probes']} (a new connection "
            "the kernel hands to the stopped worker's listener, SO_REUSEPORT, waits until "
            "it resumes)."
        )
    if "reload" in rows:
        row = rows["reload"]
        lines.append(
            f"* **reload (SIGHUP)**: done after {row['notes'].get('reload_complete_s', '?')} "
            f"s; {row['clients_closed']} clients disconnected (at most "
            f"{row['max_closes_per_client']} times each) and reconnected; every pair passed "
            f"traffic again after {_seconds(row['relink_max_s'])} s at most; "
            f"{row['lost_own']} frames in flight through the old workers were lost; probes "
            f"refused: {row['probes_refused']}."
        )
    return "\n".join(lines) + "\n"


def splice_section(text: str, section: str, heading: str = SECTION) -> str:
    """``text`` with its ``heading`` section replaced by ``section`` (ops/bench/page.py)."""
    return page.splice_section(text, section, heading)
