"""What a job process the embedded queue starts does to itself first: lower priority, the hard memory limit, and
dying with its server."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import textwrap
import time

from tests.helpers import REPO

# A stand-in job: it sets itself up as `slimserve worker --run-job ... --server-pid` does, reports, then waits.
# Its first lines play the server's SLIMSERVE_MEMORY_LIMIT_BYTES, which a job process inherits.
JOB = textwrap.dedent("""
    import os, resource, sys, time
    from app.worker.embedded import enter_job_process
    resource.setrlimit(resource.RLIMIT_AS, (8 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
    enter_job_process(7, int(sys.argv[1]))
    print(os.getpid(), os.getpriority(os.PRIO_PROCESS, 0), resource.getrlimit(resource.RLIMIT_AS)[0], flush=True)
    time.sleep(120)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_job_process_lowers_its_priority_and_lifts_the_servers_memory_cap() -> None:
    with subprocess.Popen([sys.executable, "-c", JOB, str(os.getpid())], cwd=REPO, stdout=subprocess.PIPE,
                          text=True) as job:
        try:
            assert job.stdout is not None
            pid, priority, soft = job.stdout.readline().split()
            assert int(pid) == job.pid
            assert int(priority) == os.getpriority(os.PRIO_PROCESS, 0) + 7
            assert int(soft) == resource.getrlimit(resource.RLIMIT_AS)[1]
        finally:
            job.kill()


def test_a_job_process_dies_with_the_server_that_started_it() -> None:
    # The "server" starts the job, prints its pid and exits: the kernel must kill the job (PR_SET_PDEATHSIG).
    server = textwrap.dedent(f"""
        import os, subprocess, sys
        job = subprocess.Popen([sys.executable, "-c", {JOB!r}, str(os.getpid())], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
        print(job.stdout.readline().split()[0], flush=True)
        os._exit(0)
    """)
    started = subprocess.run([sys.executable, "-c", server], cwd=REPO, capture_output=True, text=True, timeout=60,
                             check=True)
    job_pid = int(started.stdout.split()[0])
    deadline = time.monotonic() + 10
    while _alive(job_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    survived = _alive(job_pid)
    if survived:
        os.kill(job_pid, signal.SIGKILL)
    assert not survived


def test_a_job_process_whose_server_is_already_gone_does_not_run() -> None:
    never_a_pid = 2**22 + 1  # above Linux's highest pid_max
    job = subprocess.run([sys.executable, "-c", JOB, str(never_a_pid)], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert job.returncode == 1 and job.stdout == ""
    assert f"the server (process {never_a_pid}) is gone" in job.stderr
