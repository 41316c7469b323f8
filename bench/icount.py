"""Instructions per line of the hot paths, counted by valgrind: `python -m bench.icount`.

    python -m bench.icount [NAME=PATH ...] [--paths client,relay] [--updates]

Runs bench.paths for each path under `valgrind --tool=callgrind`, twice, with a small
and a large number of lines, and reports (large - small) / (large - small lines): the
user-space instructions of one line, with start-up and imports subtracted. Each
NAME=PATH is a checkout whose herd_trio and tests packages are used (PATH first on
PYTHONPATH; default: this one), so two checkouts give the ratio of a change.

Why: on a shared machine, CPU time moves by 10-20% between runs of the same code, so
a cut of 3% needs many interleaved runs to be seen (bench.sidebyside). An instruction
count does not move between runs (hash seeds are fixed) and resolves 0.1%. It is a
proxy, not a time: it does not see cache misses or the kernel, and a change that
trades instructions for memory traffic must still be timed side by side.
With --updates, bench.paths sends updates of known clients (see its doc).
Needs valgrind (Debian: apt-get install valgrind); about a minute per path and checkout.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZES = {"client": (4096, 12288), "relay": (5000, 15000)}  # lines: small, large
SIZES |= {f"limit-{path}": sizes for path, sizes in SIZES.items()}  # the floors (bench.paths)
TOTAL = re.compile(rb"I\s+refs:\s+([0-9,]+)")


def instructions(checkout: Path, path: str, lines: int, updates: bool) -> int:
    """Instructions that bench.paths `path` with `lines` lines executes in all."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "PYTHONHASHSEED": "0"}
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += [sys.executable, str(HERE / "paths.py"), path, "--lines", str(lines)]
    command += ["--updates"] if updates else []
    done = subprocess.run(command, env=env, capture_output=True, timeout=1800, check=False)
    found = TOTAL.search(done.stderr)
    if done.returncode != 0 or found is None:
        tail = done.stderr.decode(errors="replace")[-2000:]
        raise SystemExit(f"bench.icount: {path} in {checkout} failed:\n{tail}")
    return int(found.group(1).replace(b",", b""))


def per_line(checkout: Path, path: str, updates: bool) -> float:
    """Instructions per line of `path` in `checkout` (two runs, side by side)."""
    small, large = SIZES[path]
    with ThreadPoolExecutor(2) as pool:
        low, high = pool.map(lambda n: instructions(checkout, path, n, updates), (small, large))
    return (high - low) / (large - small)


def main() -> None:
    """Count, print one line per checkout and path, and the ratios to the first."""
    parser = argparse.ArgumentParser(prog="python -m bench.icount", description=__doc__)
    parser.add_argument("checkouts", nargs="*", metavar="NAME=PATH")
    parser.add_argument("--paths", default="client,relay")
    parser.add_argument("--updates", action="store_true", help="updates of known clients")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("bench.icount: valgrind not found (Debian: apt-get install valgrind)")
    checkouts: dict[str, Path] = {}
    for spec in args.checkouts or [f"this={HERE.parent}"]:
        name, _, root = spec.partition("=")
        if not name or not (Path(root) / "herd_trio").is_dir():
            raise SystemExit(f"bench.icount: {spec!r} is not NAME=PATH of a checkout")
        checkouts[name] = Path(root).resolve()
    for path in args.paths.split(","):
        if path not in SIZES:
            raise SystemExit(f"bench.icount: no path {path!r} ({', '.join(SIZES)})")
        first = None
        for name, root in checkouts.items():
            count = per_line(root, path, args.updates)
            first = first or count
            print(
                f"{path:7s} {name:12s} {count:10,.0f} instructions per line  {count / first:.3f}x"
            )


if __name__ == "__main__":
    main()
