"""Run a command and report the peak resident memory of its whole process tree (Linux).

    python3 scripts/peak_rss.py [--limit-gb 12] -- bash -c "python -m pytest -q"

`/usr/bin/time -v` reports the largest single process; a test suite that starts subprocesses
(the CLI tests do) needs the sum over every live descendant, sampled while it runs. Shared pages
(libraries, mapped weight files) count once per process, so the figure errs high. Standard
library only: CI runs it outside the project's virtual environment.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

PAGE = os.sysconf("SC_PAGE_SIZE")


def children() -> dict[int, list[int]]:
    """Parent pid -> child pids, for every process visible in /proc."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended while we looked
            continue
        parent = int(stat[stat.rindex(")") + 2 :].split()[1])
        tree.setdefault(parent, []).append(int(entry.name))
    return tree


def tree_rss(root: int) -> int:
    """Resident bytes of `root` and all its descendants."""
    tree, total, pending = children(), 0, [root]
    while pending:
        pid = pending.pop()
        pending += tree.get(pid, [])
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except (OSError, IndexError, ValueError):
            continue
    return total


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--limit-gb", type=float, default=None, help="exit non-zero when the peak exceeds this")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to run after --")
    process = subprocess.Popen(command)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss(process.pid))
        time.sleep(args.interval)
    gb = peak / 1e9
    print(f"peak resident memory of the process tree: {gb:.2f} GB", file=sys.stderr)
    if process.returncode == 0 and args.limit_gb is not None and gb > args.limit_gb:
        print(f"error: the peak exceeds the limit of {args.limit_gb} GB", file=sys.stderr)
        return 1
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
