"""The steps of an `hpc_submit` job as Prefect tasks: the split run on the cluster's batch jobs, and the merge."""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger

from kiln.tasks.executor import executor
from kiln.tasks.hpc.runner import merge_outputs, run_split


@executor(name="run split", task_run_name="run {ntasks} tasks on {cluster}")
async def run_tasks(block: Any, resources: Any, *, cluster: str, ntasks: int, **split: Any) -> tuple[list, dict]:
    """Starts the batch jobs, runs every task on them, watches them, and removes them however it ends."""
    # one task, not one per batch job: run_split holds the dask-jobqueue cluster whose batch jobs
    # it must scancel when anything ends it, and that cleanup cannot be split across task runs
    started = time.perf_counter()
    outputs, run = await run_split(block, resources, ntasks=ntasks, **split)
    get_run_logger().info("%d tasks done on %s in %.1f s, batch jobs %s", ntasks, cluster,
                          time.perf_counter() - started, ", ".join(run.get("batch_jobs", [])) or "none")
    return outputs, run


@executor(name="merge outputs", task_run_name="merge outputs")
def merge(outputs: list[Any]) -> dict[str, Any]:
    """The outputs' shared numeric fields as mean/std/min/max."""
    return merge_outputs(outputs)
