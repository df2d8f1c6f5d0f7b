"""What every benchmark shares: an embedded kiln stack of its own, ports, percentiles, fresh databases, and the check
that a job it timed really ran."""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen, grace: float = 30) -> None:
    """Stops a process the bench started: SIGTERM, then SIGKILL after the grace period."""
    process.terminate()
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name:<38} n={len(values):>3}  p50={percentile(values, 50):6.3f} s  p95={percentile(values, 95):6.3f} s"
        f"  mean={statistics.mean(values):6.3f} s  min={min(values):6.3f} s  max={max(values):6.3f} s"
    )


class fresh_postgres_databases:
    """Two new databases (job index, Prefect) on the server; their URLs go into KILN_* variables."""

    def __init__(self, url: str):
        import uuid

        self.admin = f"{url.rstrip('/')}/postgres"
        self.names = [f"kiln_bench_index_{uuid.uuid4().hex[:8]}", f"kiln_bench_prefect_{uuid.uuid4().hex[:8]}"]
        self._run([f"CREATE DATABASE {name}" for name in self.names])
        base = url.rstrip("/").replace("postgresql://", "postgresql+asyncpg://")
        os.environ["KILN_DATABASE_URL"] = f"{base}/{self.names[0]}"
        os.environ["KILN_PREFECT_DATABASE_URL"] = f"{base}/{self.names[1]}"

    def _run(self, statements: list[str]) -> None:
        import psycopg2

        connection = psycopg2.connect(self.admin)
        connection.autocommit = True
        with connection.cursor() as cursor:
            for statement in statements:
                cursor.execute(statement)
        connection.close()

    def drop(self) -> None:
        self._run([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)" for name in self.names])


@contextmanager
def embedded_stack(slots: int = 1, postgres: str | None = None, env: dict[str, str] | None = None):
    """A kiln stack under a temporary KILN_HOME on free ports; yields (settings, stack, API key)."""
    home = tempfile.mkdtemp(prefix="kiln-bench-")
    os.environ.update(
        {
            "KILN_HOME": home,
            "KILN_PREFECT_PORT": str(free_port()),
            "KILN_API_PORT": str(free_port()),
            "KILN_WORKER_SLOTS": str(slots),
            **(env or {}),
        }
    )
    databases = fresh_postgres_databases(postgres) if postgres else None
    from kiln.prefect_env import configure_prefect
    from kiln.settings import KilnSettings

    settings = KilnSettings()
    configure_prefect(settings)

    from kiln.launcher import Stack
    from kiln.store.store import Store

    stack = Stack(settings, log=print)
    stack.start()
    try:
        store = Store(settings.job_index_url)
        yield settings, stack, asyncio.run(store.create_key("bench"))
    finally:
        stack.stop()
        if databases:
            databases.drop()


def cpu_seconds(stack) -> dict[str, float]:
    """CPU seconds (user + system) each of the stack's processes has used so far, its children apart (the kiln
    worker's are its Dask processes), and PostgreSQL's: where the jobs' time went, taken before and after."""
    import psutil

    totals: dict[str, float] = {}

    def add(name: str, process: psutil.Process) -> None:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            return
        totals[name] = totals.get(name, 0.0) + times.user + times.system

    for name, popen in stack.procs.items():
        try:
            process = psutil.Process(popen.pid)
            children = process.children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        add(name, process)
        for child in children:
            add(f"{name}'s children", child)
    for process in psutil.process_iter(["name"]):
        if (process.info["name"] or "").startswith("postgres"):
            add("postgres", process)
    return totals


def cpu_per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> str:
    """Each process's CPU between two cpu_seconds(), in ms per job, largest first, with their sum."""
    used = {name: (after[name] - before.get(name, 0.0)) / jobs * 1000 for name in after}
    parts = ", ".join(f"{name} {ms:.0f}" for name, ms in sorted(used.items(), key=lambda kv: -kv[1]) if ms >= 0.5)
    return f"{sum(used.values()):.0f} ms CPU per job: {parts}"


def stop_jobs(client, jobs) -> None:
    """Cancels persistent jobs and waits until they have ended, before their stack stops: stopping the stack under
    a serving mcp_host job leaves its streamable-http replicas running (its flow does not get to stop them)."""
    for job in jobs:
        client.jobs.cancel(job.id)
    for job in jobs:
        client.jobs.get(job.id).wait(timeout=60)


def did_not_run(job, status: str = "completed") -> str | None:
    """Why a job the benchmark timed does not count as a run of its own, in words; None when it does.

    `job` is the job read back after its end (an SDK handle, or the API's JSON as a dict). It counts when it is in
    `status` (completed; running for a persistent job still serving) with a flow run and a `started_at`. A cache hit
    is read back `cache_hit`, with no flow run and no `started_at`: it reused an earlier job's result and ran nothing.
    """
    from kiln.schemas.jobs import Job

    job = Job.model_validate(job) if isinstance(job, dict) else job
    if job.status.value == "cache_hit":
        return f"job {job.id} was a cache hit ({job.status_reason}): it ran nothing"
    if job.status.value != status:
        return f"job {job.id} is {job.status.value}, not {status} ({job.status_reason})"
    if job.flow_run_id is None:
        return f"job {job.id} is {job.status.value} with no flow run"
    if job.started_at is None:
        return f"job {job.id} is {job.status.value} with no started_at: it never ran"
    return None


def must_have_run(job, status: str = "completed") -> None:
    """Exits the benchmark non-zero, saying why, unless the job it timed ran (did_not_run)."""
    problem = did_not_run(job, status)
    if problem is not None:
        raise SystemExit(f"{problem}; every timed job must have run: the figures do not count")
