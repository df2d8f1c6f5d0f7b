"""Submit → running latency of `sleep(0)` jobs: kiln against a plain Prefect process worker, in one run.

Starts its own embedded kiln (Prefect server on SQLite, kiln API, one kiln worker) under a temporary
KILN_HOME, then on the same Prefect server a plain `prefect worker start --type process` with a
deployment of the same flow. For kiln it measures what a user sees: from just before the POST to
the `running` status event arriving over SSE. For the process worker it measures from just before
`create_flow_run_from_deployment` to the flow run's Running state (polled every 20 ms).

    python bench/latency.py [--jobs 40] [--baseline-jobs 8]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name:<38} n={len(values):>3}  p50={percentile(values, 50):6.3f} s  p95={percentile(values, 95):6.3f} s"
        f"  mean={statistics.mean(values):6.3f} s  min={min(values):6.3f} s  max={max(values):6.3f} s"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40, help="sleep(0) jobs through kiln")
    parser.add_argument("--baseline-jobs", type=int, default=8, help="runs through the process worker")
    parser.add_argument("--warmup", type=int, default=3, help="kiln jobs run first and not counted")
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="put the job index and Prefect on fresh databases of this server, "
        "e.g. postgresql://kiln:kiln@127.0.0.1:5432 (as `make postgres` sets up)",
    )
    args = parser.parse_args()

    home = tempfile.mkdtemp(prefix="kiln-bench-")
    os.environ.update(
        {
            "KILN_HOME": home,
            "KILN_PREFECT_PORT": str(free_port()),
            "KILN_API_PORT": str(free_port()),
            "KILN_WORKER_SLOTS": "1",
        }
    )
    databases = fresh_postgres_databases(args.postgres) if args.postgres else None
    from kiln.prefect_env import configure_prefect
    from kiln.settings import KilnSettings

    settings = KilnSettings()
    configure_prefect(settings)

    from kiln.launcher import Stack
    from kiln.store.store import Store

    stack = Stack(settings, log=print)
    stack.start()
    baseline_worker = None
    try:
        import asyncio

        store = Store(settings.job_index_url)
        key = asyncio.run(store.create_key("bench"))
        kiln_total, kiln_server = measure_kiln(settings, key, args.jobs, args.warmup)
        baseline_worker, baseline = measure_process_worker(settings, home, args.baseline_jobs)
    finally:
        if baseline_worker is not None:
            baseline_worker.terminate()
            baseline_worker.wait(timeout=30)
        stack.stop()

    if databases:
        databases.drop()
    print()
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"submit → running, sleep(0), 2-core machine, Prefect 3.8.8 and the job index on {backend}, one worker slot")
    print(summary("kiln (POST → SSE 'running')", kiln_total))
    print(summary("kiln (created_at → started_at)", kiln_server))
    print(summary("Prefect process worker (create → Running)", baseline))
    ratio = percentile(baseline, 50) / percentile(kiln_total, 50)
    print(f"kiln p50 is {ratio:.1f}× faster than the process worker; goal kiln p50 ≤ 0.3 s: "
          f"{'met' if percentile(kiln_total, 50) <= 0.3 else 'NOT met'}")


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


def measure_kiln(settings, key: str, jobs: int, warmup: int) -> tuple[list[float], list[float]]:
    from kiln.sdk import Client

    total, server = [], []
    with Client(settings.api_url, key) as client:
        for i in range(warmup + jobs):
            started = time.perf_counter()
            job = client.jobs.create(type="sleep", input={"seconds": 0})
            for event in client.jobs.events(job.id):
                if event.event == "status" and event.data.get("status") == "running":
                    elapsed = time.perf_counter() - started
                    break
            job.wait(timeout=60)
            if i >= warmup:
                total.append(elapsed)
                server.append((job.started_at - job.created_at).total_seconds())
    return total, server


def measure_process_worker(settings, home: str, runs: int):
    """A plain Prefect process worker polling once a second (Prefect's default is every 10 s)."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async def deploy():
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="bench-process", type="process"))
            flow_id = await client.create_flow_from_name("sleep")
            return await client.create_deployment(
                flow_id=flow_id,
                name="bench-process",
                entrypoint="flows/sleep.py:sleep",
                path=str(REPO),
                work_pool_name="bench-process",
            )

    deployment_id = asyncio.run(deploy())
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = open(Path(home) / "process-worker.log", "ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "bench-process", "--type", "process"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    time.sleep(5)

    async def one_run() -> float:
        async with get_client() as client:
            started = time.perf_counter()
            run = await client.create_flow_run_from_deployment(deployment_id, parameters={"seconds": 0})
            while True:
                state = (await client.read_flow_run(run.id)).state
                if state.is_running() or state.is_final():
                    elapsed = time.perf_counter() - started
                    break
                await asyncio.sleep(0.02)
            while not (await client.read_flow_run(run.id)).state.is_final():
                await asyncio.sleep(0.1)
            return elapsed

    results = [asyncio.run(one_run()) for _ in range(runs)]
    return worker, results


if __name__ == "__main__":
    main()
