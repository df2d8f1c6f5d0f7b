"""The steps of a `simulation` job as Prefect tasks: each replica run locally, and their merge."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger

from kiln.tasks.executor import executor
from kiln.tasks.simulation.replicas import merge_replicas, run_replica


@executor(name="replica", task_run_name="{calculation} replica {replica} of {ntasks}")
def replica(
    payload: dict, calculation: str, replica: int, ntasks: int, folder: str, progress: Callable[[int, int], None]
) -> dict[str, Any]:
    """One replica of the simulation, in this worker process."""
    started = time.perf_counter()
    out = run_replica(payload, replica, folder, task_id=replica, ntasks=ntasks, progress=progress)
    get_run_logger().info("%s replica %d of %d done in %.2f s", calculation, replica, ntasks,
                          time.perf_counter() - started)
    return out


@executor(name="merge replicas", task_run_name="merge replicas")
def merge(outputs: list[dict[str, Any]], folder: Path) -> dict[str, Any]:
    """Mean and spread over the replicas, and their trajectories in one file."""
    merged = merge_replicas(outputs, folder)
    get_run_logger().info("merged %d replicas", len(outputs))
    return merged
