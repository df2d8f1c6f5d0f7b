"""Batch submission: kiln accepting 1000 jobs against Prefect creating 1000 flow runs, and end-to-end throughput.

Starts its own embedded kiln (two worker slots) under a temporary KILN_HOME, by default with the job
index and Prefect on fresh PostgreSQL databases (ARCHITECTURE.md's 90 s for 1000 runs is PostgreSQL).
  (a) acceptance: POST /api/v1/jobs/submit-batch with 1000 sleep(0) jobs, timed from just before the
      POST to its answer, p50 over --batches batches (each deleted right after, so none runs);
      beside it, on the same Prefect server, 1000 runs made one by one with
      `create_flow_run_from_deployment` on a pool no worker serves.
  (b) throughput: 1000 sleep(0) jobs through kiln in one batch, POST → the last one completed, in jobs/s;
      beside it the Prefect-only path: runs made one by one and run by a plain Prefect process worker
      limited to as many at once as kiln has slots, create of the first → the last one final.
It exits non-zero unless every entry of (a) and (b) became a job to run, every job of (b) ran (common.did_not_run)
and every Prefect-only run completed.

    python bench/batch_submit.py [--postgres URL | --sqlite] [--batches 5] [--jobs 1000] [--baseline-runs 200]
                                 [--parts accept throughput]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime

from common import REPO, cpu_per_job, cpu_seconds, embedded_stack, must_have_run, percentile, summary

SLOTS = 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--postgres", default="postgresql://kiln:kiln@127.0.0.1:5432", metavar="URL")
    parser.add_argument("--sqlite", action="store_true", help="both databases on SQLite instead")
    parser.add_argument("--batches", type=int, default=5, help="batches timed for (a)")
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per batch")
    parser.add_argument("--create-runs", type=int, default=1000, help="runs Prefect creates one by one for (a)")
    parser.add_argument("--baseline-runs", type=int, default=200, help="runs through the process worker for (b)")
    parser.add_argument("--parts", nargs="+", choices=("accept", "throughput"), default=["accept", "throughput"],
                        help="(a) accept, (b) throughput, or both")
    args = parser.parse_args()

    # the default of two batches per key per minute would hold the benchmark, not kiln
    env = {"KILN_BATCH_RATE_PER_MINUTE": "1000"}
    postgres = None if args.sqlite else args.postgres
    worker = None
    loads = {}
    with embedded_stack(slots=SLOTS, postgres=postgres, env=env) as (settings, stack, key):
        try:
            if "accept" in args.parts:
                loads["(a) kiln accept"] = os.getloadavg()
                accept = kiln_accept(settings, key, args.batches, args.jobs)
            if "throughput" in args.parts:
                loads["(b) kiln throughput"] = os.getloadavg()
                cpu_before = cpu_seconds(stack)
                kiln_rate, kiln_seconds, kiln_steps = kiln_throughput(settings, key, args.jobs)
                kiln_cpu = cpu_per_job(cpu_before, cpu_seconds(stack), args.jobs)
            loads["(a) Prefect create"] = os.getloadavg()
            deployment_id = asyncio.run(deploy_process_pool())
            create_seconds = asyncio.run(create_runs(deployment_id, args.create_runs, {"input": {"seconds": 0}}))
            asyncio.run(cancel_all_scheduled(deployment_id))
            if "throughput" in args.parts:
                worker = start_process_worker(settings)
                loads["(b) Prefect throughput"] = os.getloadavg()
                prefect_rate, prefect_seconds = asyncio.run(prefect_throughput(deployment_id, args.baseline_runs))
            loads["end"] = os.getloadavg()
        finally:
            if worker is not None:
                worker.terminate()
                worker.wait(timeout=30)

    backend = "SQLite" if args.sqlite else "PostgreSQL"
    print()
    print(f"batch submission, 2-core machine, Prefect 3.8.8 and the job index on {backend}, {SLOTS} worker slots")
    per_run = create_seconds / args.create_runs
    if "accept" in args.parts:
        print(summary(f"(a) kiln accepts {args.jobs} jobs", accept))
    print(f"(a) Prefect create_flow_run_from_deployment × {args.create_runs}, one by one: {create_seconds:.1f} s "
          f"({1 / per_run:.1f} runs/s; {per_run * args.jobs:.1f} s for {args.jobs})")
    if "accept" in args.parts:
        print(f"    kiln p50 {percentile(accept, 50):.3f} s is {per_run * args.jobs / percentile(accept, 50):.0f}× "
              f"faster; goal ≤ 0.5 s: {'met' if percentile(accept, 50) <= 0.5 else 'NOT met'}")
    if "throughput" in args.parts:
        print(f"(b) kiln, {args.jobs} sleep(0) jobs end to end: {kiln_seconds:.1f} s, {kiln_rate:.2f} jobs/s")
        print(f"    per job (index's clock, p50 / p95): {kiln_steps}; a slot per job: "
              f"{kiln_seconds * SLOTS / args.jobs:.3f} s")
        print(f"    {kiln_cpu}")
        print(f"(b) Prefect process worker (concurrency {SLOTS}), {args.baseline_runs} runs end to end: "
              f"{prefect_seconds:.1f} s, {prefect_rate:.2f} jobs/s")
        print(f"    kiln's throughput is {kiln_rate / prefect_rate:.1f}× the Prefect-only path's")
    print("load average (1, 5, 15 min) as each part began: "
          + "; ".join(f"{part} {one:.1f} {five:.1f} {fifteen:.1f}" for part, (one, five, fifteen) in loads.items()))


def sleep_jobs(count: int, offset: float) -> list[dict]:
    # distinct inputs, so none is a cache hit of another
    return [{"type": "sleep", "input": {"seconds": offset + i * 1e-7}} for i in range(count)]


def submit_to_run(client, payload: list[dict]):
    """Submits the batch; exits unless every entry became a job to run (a cache hit or a refused entry is not)."""
    result = client.submit_batch(payload)
    if result.submitted != len(payload):
        refused = next((line.error for line in result.jobs if line.error), None)
        raise SystemExit(f"{result.submitted} of {len(payload)} entries became jobs to run ({result.cache_hits} cache "
                         f"hits, {result.failed} refused, first: {refused}): the figures do not count")  # fmt: skip
    return result


def kiln_accept(settings, key: str, batches: int, jobs: int) -> list[float]:
    from kiln.sdk import Client

    times = []
    # deleting a batch cancels its 1000 jobs one by one: minutes on a loaded machine, and not what is timed
    with Client(settings.api_url, key, timeout=900) as client:
        client.submit_batch(sleep_jobs(10, 0.5))  # warm the API's code paths
        for b in range(batches):
            payload = sleep_jobs(jobs, 1.0 + b)
            started = time.perf_counter()
            result = submit_to_run(client, payload)
            times.append(time.perf_counter() - started)
            client.delete_batch(result.batch_id)
        for batch in client.batches():
            client.delete_batch(batch.id)
    return times


def kiln_throughput(settings, key: str, jobs: int) -> tuple[float, float, str]:
    """(jobs/s, seconds, where a job's time went by the index's clock)."""
    import httpx

    from kiln.sdk import Client

    with Client(settings.api_url, key, timeout=120) as client:
        started = time.perf_counter()
        result = submit_to_run(client, sleep_jobs(jobs, 0.0))
        ended = ("succeeded", "failed", "cancelled", "cache_hit")
        while sum(client.batch(result.batch_id).counts[status] for status in ended) < jobs:
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
    done = []
    with httpx.Client(base_url=settings.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as http:
        params = {"limit": 1000}
        while True:
            page = http.get(f"/api/v1/batches/{result.batch_id}/jobs", params=params).raise_for_status().json()
            for job in page["jobs"]:
                must_have_run(job)
                done.append({name: datetime.fromisoformat(job[name]) for name in ("queued_at", "started_at", "completed_at")})
            if page["next_cursor"] is None:
                break
            params["cursor"] = page["next_cursor"]
    assert len(done) == jobs, f"{jobs - len(done)} of the batch's jobs were not listed"

    def spread(name: str, values: list[float]) -> str:
        return f"{name} {percentile(values, 50):.3f} / {percentile(values, 95):.3f} s"

    starts = sorted(j["started_at"] for j in done)
    steps = ", ".join([
        spread("queued → started", [(j["started_at"] - j["queued_at"]).total_seconds() for j in done]),
        spread("started → completed", [(j["completed_at"] - j["started_at"]).total_seconds() for j in done]),
        f"between two starts {statistics.mean((b - a).total_seconds() for a, b in zip(starts, starts[1:])):.3f} s mean",
    ])  # fmt: skip
    return jobs / elapsed, elapsed, steps


async def deploy_process_pool():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    async with get_client() as client:
        await client.create_work_pool(WorkPoolCreate(name="bench-process", type="process", concurrency_limit=SLOTS))
        flow_id = await client.create_flow_from_name("sleep")
        return await client.create_deployment(
            flow_id=flow_id, name="bench-process", entrypoint="flows/sleep.py:sleep", path=str(REPO),
            work_pool_name="bench-process",
        )  # fmt: skip


async def create_runs(deployment_id, count: int, parameters: dict) -> float:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        started = time.perf_counter()
        for _ in range(count):
            await client.create_flow_run_from_deployment(deployment_id, parameters=parameters)
        return time.perf_counter() - started


async def cancel_all_scheduled(deployment_id) -> None:
    """(a)'s runs must not run in (b): deleted before the worker starts."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    async with get_client() as client:
        while True:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])), limit=200
            )
            if not runs:
                return
            for run in runs:
                await client.delete_flow_run(run.id)


def start_process_worker(settings) -> subprocess.Popen:
    env = {**os.environ, "PREFECT_WORKER_QUERY_SECONDS": "1"}
    log = open(settings.home_dir / "process-worker.log", "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", "bench-process", "--type", "process"],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
    )  # fmt: skip


async def prefect_throughput(deployment_id, runs: int) -> tuple[float, float]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId, FlowRunFilter
    from prefect.client.schemas.filters import FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    async def count(client, states: list[StateType]) -> int:
        return await client.count_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=states))),
        )

    async with get_client() as client:
        started = time.perf_counter()
        for _ in range(runs):
            await client.create_flow_run_from_deployment(deployment_id, parameters={"input": {"seconds": 0}})
        final = [StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED]
        while await count(client, final) < runs:
            await asyncio.sleep(0.5)
        elapsed = time.perf_counter() - started
        completed = await count(client, [StateType.COMPLETED])
    if completed != runs:
        raise SystemExit(f"(b) {completed} of the {runs} Prefect-only runs completed: the figures do not count")
    return runs / elapsed, elapsed


if __name__ == "__main__":
    main()
