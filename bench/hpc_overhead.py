"""Wall time of 4 × 30 s tasks on SLURM: through kiln (an hpc_submit job) against plain dask-jobqueue, in one run.

Starts its own embedded kiln under a temporary KILN_HOME and registers the local SLURM (scripts/slurm-up.sh
must have run) as a cluster. kiln: from just before POST /api/v1/jobs to the job read back completed
(polled every 0.2 s), so it includes dispatch, the flow run, the SLURMCluster start, the batch jobs'
queueing and start, per-task progress, merging and storing the output. Baseline: from just before
creating a dask_jobqueue.SLURMCluster with the same batch-job options to the four results gathered and
the cluster closed. Goal: kiln within 10 % or 3 s of the baseline, whichever is larger.

    python bench/hpc_overhead.py [--tasks 4] [--seconds 30] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

from common import embedded_stack, must_have_run

CLUSTER = "bench-slurm"


def plain_task(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


async def baseline(tasks: int, seconds: float) -> float:
    """The same work with dask-jobqueue alone: SLURMCluster, scale, map, gather, close."""
    from dask_jobqueue import SLURMCluster
    from distributed import Client

    from kiln.blocks.cluster import HpcCluster
    from kiln.schemas.resources import Resources

    options = HpcCluster(scheduler="slurm", queue="debug", cores=1, memory="1GB", max_jobs=tasks).job_options(
        Resources(), "plain-dask-jobqueue"
    )
    started = time.perf_counter()
    async with SLURMCluster(asynchronous=True, **options) as cluster:
        cluster.scale(jobs=tasks)
        async with Client(cluster, asynchronous=True) as client:
            futures = client.map(plain_task, [seconds] * tasks, pure=False)
            await client.gather(futures)
    return time.perf_counter() - started


def through_kiln(settings, key: str, tasks: int, seconds: float) -> tuple[float, dict]:
    import httpx

    with httpx.Client(base_url=settings.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=30) as http:
        started = time.perf_counter()
        created = http.post("/api/v1/jobs", json={
            "type": "hpc_submit", "compute_target": CLUSTER,
            "input": {"callable": "spin", "kwargs": {"seconds": seconds, "units": 10}, "ntasks": tasks},
        })
        created.raise_for_status()
        job_id = created.json()["id"]
        while True:
            job = http.get(f"/api/v1/jobs/{job_id}").json()
            if job["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.2)
        elapsed = time.perf_counter() - started
    must_have_run(job)
    return elapsed, job["output"]["timings"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4, help="tasks, one SLURM batch job each")
    parser.add_argument("--seconds", type=float, default=30, help="how long each task works")
    parser.add_argument("--rounds", type=int, default=1, help="kiln and baseline runs, alternating")
    args = parser.parse_args()

    with embedded_stack(slots=1) as (settings, _, key):
        from kiln.blocks.cluster import HpcCluster

        HpcCluster(scheduler="slurm", queue="debug", cores=1, memory="1GB", max_jobs=args.tasks).save(
            CLUSTER, overwrite=True
        )
        kiln_times, plain_times = [], []
        for round_ in range(1, args.rounds + 1):
            plain_times.append(asyncio.run(baseline(args.tasks, args.seconds)))
            elapsed, timings = through_kiln(settings, key, args.tasks, args.seconds)
            kiln_times.append(elapsed)
            print(f"round {round_}: plain dask-jobqueue {plain_times[-1]:.2f} s, kiln {elapsed:.2f} s "
                  f"(inside the flow: first task running after {timings.get('first_task_s')} s, "
                  f"tasks done {timings.get('tasks_s')} s, total {timings.get('total_s')} s)")

    kiln_mean, plain_mean = statistics.fmean(kiln_times), statistics.fmean(plain_times)
    overhead = kiln_mean - plain_mean
    allowed = max(0.10 * plain_mean, 3.0)
    print(f"{args.tasks} × {args.seconds:g} s tasks on SLURM, {args.rounds} round(s)")
    print(f"plain dask-jobqueue: {plain_mean:.2f} s")
    print(f"kiln hpc_submit:     {kiln_mean:.2f} s")
    print(f"overhead: {overhead:+.2f} s, ratio {kiln_mean / plain_mean:.3f} "
          f"(goal: within {allowed:.2f} s — {'met' if overhead <= allowed else 'NOT met'})")


if __name__ == "__main__":
    main()
