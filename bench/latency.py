"""Submit → running latency of `sleep(0)` jobs: kiln against a plain Prefect process worker, in one run.

Starts its own embedded kiln (Prefect server on SQLite, kiln API, one kiln worker) under a temporary
KILN_HOME, then on the same Prefect server a plain `prefect worker start --type process` with a
deployment of the same flow. For kiln it measures what a user sees: from just before the POST to
the `running` status event arriving over SSE. For the process worker it measures from just before
`create_flow_run_from_deployment` to the flow run's Running state (polled every 20 ms). It exits non-zero
unless every kiln job (warm-up included) ran (common.did_not_run) and every baseline run completed.

    python bench/latency.py [--jobs 40] [--baseline-jobs 8]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from common import REPO, embedded_stack, must_have_run, percentile, stop, summary


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

    baseline_worker = None
    with embedded_stack(slots=1, postgres=args.postgres) as (settings, _, key):
        try:
            kiln_total, kiln_server = measure_kiln(settings, key, args.jobs, args.warmup)
            baseline_worker, baseline = measure_process_worker(settings, args.baseline_jobs)
        finally:
            if baseline_worker is not None:
                # seen here: the worker hung on exit flushing its events (then killed); the figures are taken already
                stop(baseline_worker)
    print()
    backend = "PostgreSQL" if args.postgres else "SQLite"
    print(f"submit → running, sleep(0), 2-core machine, Prefect 3.8.8 and the job index on {backend}, one worker slot")
    print(summary("kiln (POST → SSE 'running')", kiln_total))
    print(summary("kiln (created_at → started_at)", kiln_server))
    print(summary("Prefect process worker (create → Running)", baseline))
    ratio = percentile(baseline, 50) / percentile(kiln_total, 50)
    print(f"kiln p50 is {ratio:.1f}× faster than the process worker; goal kiln p50 ≤ 0.3 s: "
          f"{'met' if percentile(kiln_total, 50) <= 0.3 else 'NOT met'}")


def measure_kiln(settings, key: str, jobs: int, warmup: int) -> tuple[list[float], list[float]]:
    from kiln.sdk import Client

    total, server = [], []
    with Client(settings.api_url, key) as client:
        for i in range(warmup + jobs):
            started = time.perf_counter()
            job = client.jobs.create(type="sleep", input={"seconds": 0}, refresh=True)  # each one a run, not a cache hit
            elapsed = None
            for event in client.jobs.events(job.id):
                if event.event == "status" and event.data.get("status") == "running":
                    elapsed = time.perf_counter() - started
                    break
            job.wait(timeout=300)
            must_have_run(job)
            if i >= warmup:
                if elapsed is None:
                    # no `running` status event before the stream ended: nothing to count for this job
                    raise SystemExit(f"job {job.id} ended {job.status.value} with no 'running' status event over SSE")
                total.append(elapsed)
                server.append((job.started_at - job.created_at).total_seconds())
    return total, server


def measure_process_worker(settings, runs: int):
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
    log = open(settings.home_dir / "process-worker.log", "ab")
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "bench-process", "--type", "process"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )
    time.sleep(5)

    async def one_run() -> float:
        async with get_client() as client:
            started = time.perf_counter()
            run = await client.create_flow_run_from_deployment(deployment_id, parameters={"input": {"seconds": 0}})
            while True:
                state = (await client.read_flow_run(run.id)).state
                if state.is_running() or state.is_final():
                    elapsed = time.perf_counter() - started
                    break
                await asyncio.sleep(0.02)
            while not (state := (await client.read_flow_run(run.id)).state).is_final():
                await asyncio.sleep(0.1)
            if not state.is_completed():
                raise SystemExit(f"baseline run {run.id} ended {state.type.value}: {state.message}")
            return elapsed

    results = [asyncio.run(one_run()) for _ in range(runs)]
    return worker, results


if __name__ == "__main__":
    main()
