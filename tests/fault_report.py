"""After a failed `make test`: if pytest itself died (a signal in native code), say in which test and where.

Each pytest process writes FAULT_DIR/<pid>.log and removes it when it ends by itself, so a log left there is a
crash's. The whole dump (every thread) stays in it; this prints the lines that name the cause, short enough to be
the last thing a CI log shows.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

FAULT_DIR = Path(__file__).resolve().parents[1] / "var" / "pytest-faults"
STACK_LINES = 25


def summary(lines: list[str], path: Path) -> list[str]:
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    if fatal is None:
        return []
    running = [line.removeprefix("running ") for line in lines[:fatal] if line.startswith("running ")]
    out = [f"pytest died while running {running[-1] if running else '(before the first test)'}", lines[fatal]]
    # Threads are dumped newest first; the one that received the signal is marked "Current thread".
    blocks: list[list[str]] = []
    for line in lines[fatal + 1:]:
        if line.startswith(("Current thread", "Thread 0x", "Stack (most recent call first)")):
            blocks.append([line])
        elif blocks and line.startswith("  "):
            blocks[-1].append(line)
    for block in blocks:
        if not block[0].startswith("Thread 0x"):
            out += block[:STACK_LINES + 1] + (["  ..."] if len(block) > STACK_LINES + 1 else [])
    out.append("other threads, innermost frame:")
    out += [f"  {block[0].split(' (')[0]}: {block[1].strip() if len(block) > 1 else '<no Python frame>'}"
            for block in blocks if block[0].startswith("Thread 0x")]
    out.append(f"(every thread's stack: {path})")
    return out


def main() -> int:
    logs = sorted(FAULT_DIR.glob("*.log"), key=lambda path: path.stat().st_mtime)
    if logs:
        newest = logs[-1]
        lines = summary(newest.read_text(errors="replace").splitlines(), newest)
        if lines:
            when = time.strftime("%H:%M:%S", time.localtime(newest.stat().st_mtime))
            sys.stderr.write("\n".join([f"{lines[0]} (at {when})", *lines[1:]]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
