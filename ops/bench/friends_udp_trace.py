"""Which UDP datagrams does the relay under test send and receive while two toxcore
clients become friends through it?

Run from the repository root (needs libtoxcore2, toxcore-utils and strace)::

    python ops/bench/friends_udp_trace.py [--relay bootstrapd|ours-1w|...] [--file-size BYTES]

Starts the private 3-node DHT and the relay (``testbed/relay_kinds.py``),
attaches ``strace`` to every process of the relay (for our cluster: supervisor,
coordinator and workers), runs the friends scenario once (``testbed/friends.py``),
and prints the datagrams the relay's processes sent or received, grouped by
direction, first byte (packet id), peer (``node-i`` of the DHT, or a port) and size.
TCP traffic is left out (its syscalls carry no address). Diagnostic only: strace
slows the relay down, so timings printed here are not benchmarks.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from testbed.friends import ScenarioConfig, run_friends_scenario  # noqa: E402
from testbed.relay_kinds import RELAY_KINDS, start_relay_under_test  # noqa: E402
from testbed.toxdht import start_private_dht  # noqa: E402

_CALLS = "sendto,recvfrom,sendmsg,recvmsg,sendmmsg,recvmmsg"
_CALL_RE = re.compile(r"\b(sendto|recvfrom|sendmsg|recvmsg|sendmmsg|recvmmsg)\(")
_UNFINISHED = " <unfinished ...>"
_RESUMED_RE = re.compile(r"^(\d+)\s+<\.\.\. \w+ resumed>")
_PORT_RE = re.compile(r"sin_port=htons\((\d+)\)")
_DATA_RE = re.compile(r'(?<!inet_addr\()"((?:\\x[0-9a-f]{2})+)"')  # not the address
#: A 0x8e datagram's payload id sits after 0x8e and the 59-byte return block.
_ONION_RECV_1_PAYLOAD_OFFSET = 60
_RESULT_RE = re.compile(r"\)\s+=\s+(-?\d+)")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/*/stat)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children[ppid].append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def joined_lines(trace: str) -> list[str]:
    """strace -f splits a syscall that another traced process interrupted into
    "call(... <unfinished ...>" and "<... call resumed>...": join the halves."""
    pending: dict[str, str] = {}
    lines = []
    for line in trace.splitlines():
        if line.endswith(_UNFINISHED):
            pending[line.split(maxsplit=1)[0]] = line[: -len(_UNFINISHED)]
            continue
        resumed = _RESUMED_RE.match(line)
        if resumed and resumed.group(1) in pending:
            line = pending.pop(resumed.group(1)) + line[resumed.end() :]
        lines.append(line)
    return lines


def summarize(trace: str, names: dict[int, str]) -> collections.Counter[tuple[str, str, str, str]]:
    """(direction, first byte, peer, size) -> count, for syscalls that carry an IPv4
    address and succeeded."""
    counts: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
    for line in joined_lines(trace):
        call = _CALL_RE.search(line)
        ports = _PORT_RE.findall(line)
        result = _RESULT_RE.search(line)
        if not call or not ports or not result or int(result.group(1)) < 0:
            continue
        direction = "sent" if call.group(1).startswith("send") else "received"
        datas = [bytes.fromhex(d.replace("\\x", "")) for d in _DATA_RE.findall(line)]
        if call.group(1) in ("sendto", "recvfrom", "sendmsg", "recvmsg"):
            sizes = [result.group(1)]  # one datagram: the result is its size
        else:
            sizes = ["?"] * len(ports)  # sendmmsg/recvmmsg: the result is a count
        for index, port in enumerate(ports):
            data = datas[index] if index < len(datas) else b""
            first = f"{data[0]:02x}" if data else "?"
            if data[:1] == b"\x8e" and len(data) > _ONION_RECV_1_PAYLOAD_OFFSET:
                first += f" ({data[_ONION_RECV_1_PAYLOAD_OFFSET]:02x})"
            size = sizes[index] if index < len(sizes) else "?"
            counts[(direction, first, names.get(int(port), f"port {port}"), size)] += 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--relay", default="bootstrapd", choices=RELAY_KINDS)
    parser.add_argument("--file-size", type=int, default=64 * 1024)
    parser.add_argument("--trace-out", type=Path, help="also keep strace's raw output here")
    args = parser.parse_args(argv)
    if shutil.which("strace") is None:
        print("strace not installed", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="friends-udp-trace-") as tmp:
        dht = start_private_dht(Path(tmp) / "dht")
        relay = start_relay_under_test(args.relay, Path(tmp))
        trace_path = Path(tmp) / "strace.txt"
        tracer = None
        try:
            pids = descendants(relay.pid)
            command = ["strace", "-f", "-xx", "-s", "64", "-e", f"trace={_CALLS}"]
            command += ["-o", str(trace_path)]
            for pid in pids:
                command += ["-p", str(pid)]
            tracer = subprocess.Popen(command, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # let strace attach
            config = ScenarioConfig(file_size=args.file_size, rtt_rounds=5)
            try:
                result = run_friends_scenario(relay.endpoint_a, relay.endpoint_b, dht.nodes, config)
                outcome = (
                    f"friends connected after {result.friend_connected_s:.1f} s, "
                    f"{len(result.rtts)} echoes, file {result.file_size} B"
                )
            except AssertionError as error:  # ScenarioError: still show what was sent
                outcome = f"FAILED: {str(error).splitlines()[0]}"
            time.sleep(0.5)
        finally:
            if tracer is not None:
                os.kill(tracer.pid, signal.SIGINT)
                tracer.wait(10)
            relay.stop()
            nodes = dht.nodes
            dht.stop()
        names = {node.port: f"node-{i}" for i, node in enumerate(nodes)}
        counts = summarize(trace_path.read_text(errors="replace"), names)
        if args.trace_out is not None:
            shutil.copyfile(trace_path, args.trace_out)
    print(
        f"relay {args.relay} (pids {pids}); DHT nodes "
        + ", ".join(f"node-{i} udp {n.port}" for i, n in enumerate(nodes))
    )
    print(f"scenario: {outcome}")
    print("id: first byte (hex); for 8e also the payload id the relay hands on as type 9")
    print(f"{'direction':<9} {'id':<8} {'peer':<12} {'bytes':>6} {'count':>6}")
    for (direction, first, peer, size), count in sorted(counts.items()):
        print(f"{direction:<9} {first:<8} {peer:<12} {size:>6} {count:>6}")
    if not counts:
        print("(no UDP datagrams)")
    return 0 if not outcome.startswith("FAILED") else 1


if __name__ == "__main__":
    sys.exit(main())
