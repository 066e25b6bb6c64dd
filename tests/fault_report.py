"""After a failed `make test`: if a signal ended pytest (a crash in native code, the OOM killer), say in which
test, and where when there is a dump.

Each pytest process writes FAULT_DIR/<pid>.log and removes it when it ends by itself, so a log left there is
from a run that was killed. The whole dump (every thread) stays in it; this prints the lines that name the
cause, short enough to be the last thing a CI log shows.
"""

from __future__ import annotations

import sys
from pathlib import Path

FAULT_DIR = Path(__file__).resolve().parents[1] / "var" / "pytest-faults"
STACK_LINES = 15


def summary(lines: list[str], path: Path) -> list[str]:
    """The crashing thread's stack, the other threads' innermost frames, then the test and the error: a CI log
    that shows only its tail shows the last lines first."""
    running = [line.removeprefix("running ") for line in lines if line.startswith("running ")]
    test = f"pytest died while running {running[-1] if running else '(before the first test)'}"
    fatal = next((i for i, line in enumerate(lines) if line.startswith("Fatal Python error")), None)
    if fatal is None:
        return [test, "no crash dump: killed from outside (the kernel's OOM killer, a timeout, kill -9)"]
    # Threads are dumped newest first; the one that received the signal is marked "Current thread".
    blocks: list[list[str]] = []
    for line in lines[fatal + 1:]:
        if line.startswith(("Current thread", "Thread 0x", "Stack (most recent call first)")):
            blocks.append([line])
        elif blocks and line.startswith("  "):
            blocks[-1].append(line)
    out: list[str] = []
    for block in blocks:
        if not block[0].startswith("Thread 0x"):
            out += block[:STACK_LINES + 1] + (["  ..."] if len(block) > STACK_LINES + 1 else [])
    out.append("other threads, innermost frame:")
    out += [f"  {block[0].split(' (')[0]}: {block[1].strip() if len(block) > 1 else '<no Python frame>'}"
            for block in blocks if block[0].startswith("Thread 0x")]
    return [*out, f"(every thread's stack: {path})", test, lines[fatal]]


def main(argv: list[str]) -> int:
    """argv[0]: pytest's exit status as the shell saw it; above 128, a signal ended it."""
    if not argv or int(argv[0]) <= 128:
        return 0
    logs = sorted(FAULT_DIR.glob("*.log"), key=lambda path: path.stat().st_mtime)
    if logs:
        lines = summary(logs[-1].read_text(errors="replace").splitlines(), logs[-1])
        lines.append(f"signal {int(argv[0]) - 128}")
        sys.stderr.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
