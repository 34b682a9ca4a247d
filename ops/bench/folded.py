"""Where the time goes, from a ``py-spy record -f raw`` (folded stacks) file.

    python3 -m ops.bench.folded FILE.folded [--top N] [--inclusive NAME ...]

Prints the functions with the most *self* samples (the innermost Python frame,
so time in C code called from a function counts for that function) and, for the
names given with ``--inclusive``, the share of samples with that function
anywhere on the stack. py-spy records only non-idle samples by default, so the
shares are of CPU time. Frames look like ``name (path/file.py:line)``; lines
are ignored so that a function is one entry.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<name>.*?) \((?P<file>[^:()]*)(?::\d+)?\)$")


def frame_key(frame: str) -> str:
    """``function (file)`` without the line number; the frame itself when unparsed."""
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match["file"]
    for marker in ("site-packages/", "/wt-", "/lib/python"):
        if marker in file:
            file = file.split(marker, 1)[1]
            break
    parts = file.split("/")
    return f"{match['name']} ({'/'.join(parts[-2:])})"


def read_folded(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


def shares(
    stacks: list[tuple[list[str], int]], inclusive: list[str]
) -> tuple[int, Counter[str], dict[str, int]]:
    total = sum(count for _, count in stacks)
    own: Counter[str] = Counter()
    within = dict.fromkeys(inclusive, 0)
    for frames, count in stacks:
        own[frame_key(frames[-1])] += count
        names = {frame_key(f).split(" (")[0] for f in frames}
        for name in inclusive:
            if name in names:
                within[name] += count
    return total, own, within


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", type=Path, nargs="+")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--inclusive", nargs="*", default=[], metavar="NAME")
    args = parser.parse_args(argv)
    stacks = [s for path in args.files for s in read_folded(path)]
    total, own, within = shares(stacks, args.inclusive)
    if not total:
        print("no samples", file=sys.stderr)
        return 1
    print(f"{total} samples")
    for key, count in own.most_common(args.top):
        print(f"{count / total:6.1%}  self  {key}")
    for name, count in within.items():
        print(f"{count / total:6.1%}  incl  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
