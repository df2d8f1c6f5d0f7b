"""The `hpc_submit` job: a callable or command run as `ntasks` tasks on a registered SLURM or PBS cluster."""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.states import Cancelled

from kiln.runtime import areport_merging, areport_tasks, current_job
from kiln.schemas.hpc_submit import HpcSubmitInput
from kiln.schemas.job_types import JobType

PROGRESS_INTERVAL_SECONDS = 1.0


@flow(name="hpc_submit", persist_result=True, result_serializer="json")
async def hpc_submit(input: HpcSubmitInput, compute_target: str | None = None, resources: dict | None = None) -> dict:
    from kiln.blocks.cluster import load_cluster
    from kiln.schemas.resources import Resources
    from kiln.tasks.hpc.executors import merge, run_tasks
    from kiln.tasks.hpc.runner import RunStopped

    request = input
    job_resources = Resources.model_validate(resources or {})
    if not compute_target:
        raise ValueError("compute_target: an hpc_submit job needs a registered cluster")
    block = await load_cluster(compute_target)
    if block is None:
        raise ValueError(f"compute_target: no cluster named {compute_target!r} is registered (it was removed?)")
    job_id, _, flow_run_id = current_job()
    started = time.perf_counter()
    reported: dict[str, Any] = {"at": 0.0, "statuses": None}

    async def on_progress(split) -> None:
        # every change of a status (or of why batch jobs wait) is reported; units done at most once a second
        now = time.perf_counter()
        statuses = (tuple(t.status for t in split.tasks.values()), split.queue_note)
        if statuses != reported["statuses"] or now - reported["at"] >= PROGRESS_INTERVAL_SECONDS:
            reported.update(at=now, statuses=statuses)
            await areport_tasks(split.table(), split.percent, split.summary(), mirror_to_parent=True)

    async def stop_reason() -> str | None:
        # a child job cancelled on its own: its parent's task is not cancelled, so look at the run itself
        from prefect.client.orchestration import get_client

        if flow_run_id is None:
            return None
        async with get_client() as client:
            state = (await client.read_flow_run(UUID(flow_run_id))).state
        if state is not None and (state.is_cancelling() or state.is_cancelled()):
            return f"cancelled while its tasks ran: {state.message or 'by request'}"
        return None

    get_run_logger().info("%d tasks of %s on cluster %r (%s)", request.ntasks, request.target, compute_target,
                          block.scheduler)
    try:
        outputs, run = await run_tasks(
            block,
            job_resources,
            cluster=compute_target,
            job_name=f"kiln-{(job_id or 'local')[:8]}",
            target=request.target,
            ntasks=request.ntasks,
            args=request.command if request.command is not None else request.args,
            task_kwargs=request.kwargs_of_tasks(),
            on_progress=on_progress,
            stop_reason=stop_reason,
        )
    except RunStopped as stopped:
        # the run ends Cancelled, as asked, with its batch jobs gone (run_split removed them)
        return Cancelled(message=str(stopped))
    await areport_merging(f"all {request.ntasks} tasks finished; merging their outputs")
    merge_started = time.perf_counter()
    merged = merge(outputs)
    run["timings"]["merge_s"] = round(time.perf_counter() - merge_started, 4)
    run["timings"]["total_s"] = round(time.perf_counter() - started, 3)
    return {
        "cluster": compute_target,
        "scheduler": block.scheduler,
        "ntasks": request.ntasks,
        "outputs": outputs,
        "merged": merged,
        **run,
    }


JOB_TYPE = JobType(
    name="hpc_submit",
    description="A registered callable or a command line run as ntasks tasks on a registered SLURM or PBS "
    "cluster (compute_target), through dask-jobqueue; per-task progress, merged output.",
    input_model=HpcSubmitInput,
    flow=hpc_submit,
    requires=("dask_jobqueue",),
    runs_on_clusters=True,
    needs_cluster=True,
)
