"""kill -9 of one part of a running kiln stack (or a PostgreSQL restart), and the part brought back as `kiln up` does.

Shared by the kill matrix (tests/integration/test_zz_kill_matrix.py) and bench/recovery.py; imports nothing of the
test session's settings, so a benchmark with a stack of its own can use it.
"""

from __future__ import annotations

import signal
import subprocess
import time

import psutil

from kiln.launcher import _kill_group

# what is killed: the kiln API (dispatcher, relay), the kiln worker, one Dask worker process of the kiln worker's
# LocalCluster, the Prefect server; PostgreSQL, holding the job index and Prefect's database, is restarted
PARTS = ("api", "worker", "dask", "prefect", "postgres")
POSTGRES_RESTART = ["pg_ctlcluster", "15", "main", "restart"]
# `kiln up` starts a part that exited again after 1 s the first time (kiln.launcher.Stack.supervise)
FIRST_RESTART_DELAY = 1.0


def dask_processes(stack) -> list[psutil.Process]:
    """The worker processes of the kiln worker's LocalCluster, which its nannies spawn inside the kiln worker."""
    worker = psutil.Process(stack.procs["worker"].pid)
    return [p for p in worker.children() if "spawn_main" in " ".join(p.cmdline())]


def busiest(processes: list[psutil.Process], seconds: float = 0.5) -> psutil.Process:
    """The process that spent the most CPU over `seconds`: a Dask process running a job, rather than an idle one."""
    before = {p.pid: sum(p.cpu_times()[:2]) for p in processes}
    time.sleep(seconds)
    return max(processes, key=lambda p: sum(p.cpu_times()[:2]) - before[p.pid])


def kill(stack, part: str, dask_pid: int | None = None) -> str:
    """kill -9 of the part's process, or PostgreSQL restarted; then the part as `kiln up` brings it back. Returns what
    was done, in words.

    A Dask process: `dask_pid` if it is one of the kiln worker's, else the busiest; the worker's nanny starts a new
    process in its place by itself. PostgreSQL: `pg_ctlcluster` waits until it accepts connections again; kiln's
    parts reconnect by themselves.
    """
    if part == "postgres":
        subprocess.run(POSTGRES_RESTART, check=True, capture_output=True, timeout=180)
        return "PostgreSQL restarted (" + " ".join(POSTGRES_RESTART) + ")"
    if part == "dask":
        processes = dask_processes(stack)
        target = next((p for p in processes if p.pid == dask_pid), None) or busiest(processes)
        target.kill()
        return f"kill -9 of Dask worker process {target.pid}"
    pid = stack.procs[part].pid
    stack.stop(part, sig=signal.SIGKILL)
    restart(stack, part, pid)
    return f"kill -9 of the {part} process {pid}, started again"


def restart(stack, part: str, pid: int) -> None:
    """What `kiln up` does when a part exits (kiln.launcher.Stack.supervise): what the part started goes with it, and
    after the first delay the part starts again, answering before this returns."""
    _kill_group(pid)
    time.sleep(FIRST_RESTART_DELAY)
    stack.starters[part]()
