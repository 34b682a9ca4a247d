"""Sections of docs/benchmarks.md that different benchmark commands write.

Each command (compare, cost, scaling, chaos) owns one "## " section of the
page and rewrites only that one, where it stands."""

from __future__ import annotations


def splice_section(text: str, section: str, heading: str) -> str:
    """``text`` with its ``heading`` section (up to the next "## " heading)
    replaced by ``section`` where it stands, or added before "## Machine" (or
    at the end) when it has none."""
    lines = text.rstrip("\n").split("\n") if text else []
    kept: list[str] = []
    at: int | None = None
    skipping = False
    for line in lines:
        if line.startswith("## "):
            skipping = line.strip() == heading
            if skipping and at is None:
                at = len(kept)
        if not skipping:
            kept.append(line)
    if at is None:
        at = kept.index("## Machine") if "## Machine" in kept else len(kept)
    new = [*section.rstrip("\n").split("\n"), ""]
    if at == len(kept) and kept and kept[-1] != "":
        new = ["", *new]
    return "\n".join(kept[:at] + new + kept[at:]).rstrip("\n") + "\n"
