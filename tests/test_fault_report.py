"""The crash summary `make test` prints when pytest itself dies, read from a real faulthandler dump."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from tests.fault_report import summary


def test_summary_names_the_test_the_signal_and_the_crashing_thread(tmp_path: Path) -> None:
    log = tmp_path / "fault.log"
    crash = textwrap.dedent(f"""
        import faulthandler, os, threading, time
        handle = open({str(log)!r}, "w")
        faulthandler.enable(handle, all_threads=True)
        handle.write("running tests/a.py::test_fine\\nrunning tests/b.py::test_crashes\\n")
        handle.flush()
        threading.Thread(target=time.sleep, args=(30,), daemon=True).start()

        def crash_here():
            os.abort()

        crash_here()
    """)
    assert subprocess.run([sys.executable, "-c", crash], capture_output=True, timeout=30).returncode < 0
    lines = summary(log.read_text().splitlines(), log)
    assert lines[0].startswith("Current thread")
    assert "crash_here" in lines[1]
    assert any("time.sleep" in line or "in run" in line for line in lines if line.startswith("  Thread 0x"))
    assert lines[-2:] == ["pytest died while running tests/b.py::test_crashes", "Fatal Python error: Aborted"]


def test_a_run_killed_without_a_dump_names_the_test() -> None:
    lines = summary(["running tests/a.py::test_fine", "running tests/b.py::test_big"], Path("x.log"))
    assert lines[0] == "pytest died while running tests/b.py::test_big"
    assert "no crash dump" in lines[1]
