"""Where a profile's samples go, by feature: `python -m bench.shares PROFILE...`.

Reads py-spy's raw (collapsed) stacks, as `python -m bench --profile` writes them to
bench-results/profile-*.txt, and charges each sample to the feature of its innermost
frame (the function that was running): parsing, the store, logging, the flood's
fan-out, trio itself ... Prints a markdown table of shares, per file and in all.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

# (feature, pattern searched in the innermost frame's `func (path:line)`), first match wins
FEATURES: list[tuple[str, re.Pattern[str]]] = [
    (name, re.compile(pattern))
    for name, pattern in [
        ("logging every line (log.py)", r"herd_trio/log\.py"),
        ("store and digest bookkeeping (store.py)", r"herd_trio/store\.py"),
        ("records and commands: attrs __init__", r"attrs generated methods"),
        ("parsing and checking lines (protocol.py)", r"herd_trio/protocol\.py"),
        ("flood fan-out (bus.py, linkwriter.py)", r"herd_trio/(bus|linkwriter)\.py"),
        ("peer read loop (links.py, silence.py)", r"herd_trio/(links|silence)\.py"),
        ("client session (client.py, lines.py, net.py)", r"herd_trio/(client|lines|net)\.py"),
        ("stats (stats.py)", r"herd_trio/stats\.py"),
        ("persistence (persist.py)", r"herd_trio/persist\.py"),
        (
            "trio: run loop, sockets, cancel scopes",
            r"[(/]trio/|[(/]outcome/|contextlib\.py|<frozen|^\S+ \(_",
        ),
    ]
]


def feature(frame: str) -> str:
    """The feature a frame (`func (path:line)`) belongs to."""
    for name, pattern in FEATURES:
        if pattern.search(frame):
            return name
    return "other"


def shares(path: Path) -> tuple[Counter[str], int]:
    """Samples per feature (of the innermost frame) and the total, for one profile."""
    counts: Counter[str] = Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[feature(stack.rsplit(";", 1)[-1])] += int(n)
        total += int(n)
    return counts, total


def table(paths: list[Path]) -> str:
    """Markdown: one column per profile and one for all of them, % of samples."""
    columns = [shares(path) for path in paths]
    every: Counter[str] = Counter()
    for counts, _ in columns:
        every.update(counts)
    grand = sum(total for _, total in columns)
    names = [path.stem.removeprefix("profile-") for path in paths]
    lines = [
        "| feature | " + " | ".join(names) + " | all |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for name, count in every.most_common():
        cells = [f"{100 * c[name] / max(1, t):.1f}%" for c, t in columns]
        lines.append(
            f"| {name} | " + " | ".join(cells) + f" | {100 * count / max(1, grand):.1f}% |"
        )
    lines.append("| samples | " + " | ".join(str(t) for _, t in columns) + f" | {grand} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table([Path(arg) for arg in sys.argv[1:]]))
