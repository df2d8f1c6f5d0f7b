"""The `simulation` job: relax or MD with a matgl potential, or a molecular single point; local or on an HPC cluster."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from kiln.flows.hpc_submit import hpc_submit
from kiln.runtime import areport_merging, current_job, report_tasks, run_child_job
from kiln.schemas.hpc_submit import HpcSubmitInput
from kiln.schemas.job_types import JobType
from kiln.schemas.simulation import LOCAL_COST_LIMIT, SimulationInput

PROGRESS_INTERVAL_SECONDS = 1.0


@flow(name="simulation", persist_result=True, result_serializer="json")
async def simulation(input: SimulationInput, compute_target: str | None = None, resources: dict | None = None) -> dict:
    from kiln.settings import get_settings
    from kiln.tasks.simulation.executors import merge

    request = input
    settings = get_settings()
    job_id = current_job()[0] or "local"
    results = settings.results_dir
    folder = results / "trajectories" / job_id
    cost = await asyncio.to_thread(request.cost)
    target = compute_target if compute_target not in (None, "local") else None
    placement = f"compute_target {target!r}" if target else "compute_target 'local'" if compute_target else None
    if compute_target is None and cost > LOCAL_COST_LIMIT:
        target = settings.simulation_cluster
        placement = (
            f"cost {cost} atom-steps is above the local limit of {LOCAL_COST_LIMIT}; sent to KILN_SIMULATION_CLUSTER "
            f"{target!r}" if target else
            f"cost {cost} atom-steps is above the local limit of {LOCAL_COST_LIMIT}, but no KILN_SIMULATION_CLUSTER "
            "is set; ran locally"
        )
    placement = placement or f"cost {cost} atom-steps, within the local limit of {LOCAL_COST_LIMIT}"
    logger = get_run_logger()
    logger.info("%s, %d replica(s): %s", request.calculation, request.ntasks, placement)

    started = time.perf_counter()
    payload = request.model_dump(mode="json")
    if target:
        replicas = HpcSubmitInput(
            callable="simulation", kwargs={"request": payload, "trajectory_dir": str(folder)},
            task_kwargs=[{"replica": i} for i in range(1, request.ntasks + 1)], ntasks=request.ntasks,
        )
        child = await run_child_job(hpc_submit, input=replicas, compute_target=target, resources=resources or {})
        outputs = child["outputs"]
        where = {"where": target, "batch_jobs": child["batch_jobs"]}
    else:
        outputs = await _run_locally(payload, request.ntasks, folder)
        where = {"where": "local"}
    ran = time.perf_counter()

    for output in outputs:
        if output.get("trajectory"):
            output["trajectory"]["storage_key"] = str(Path(output["trajectory"]["path"]).relative_to(results))
    header = {"calculation": request.calculation, **where, "placement": placement, "cost_atom_steps": cost}
    if request.ntasks == 1:
        out = outputs[0]
        out["timings"] = {**out.get("timings", {}), "total_s": round(time.perf_counter() - started, 3)}
        return {**header, **out}
    await areport_merging(f"all {request.ntasks} replicas finished; merging them")
    merged = await asyncio.to_thread(merge, outputs, folder)
    if merged.get("trajectory"):
        merged["trajectory"]["storage_key"] = str(Path(merged["trajectory"]["path"]).relative_to(results))
    return {
        **header,
        "merged": merged,
        "replicas": outputs,
        "timings": {"replicas_s": round(ran - started, 3), "merge_s": round(time.perf_counter() - ran, 3),
                    "total_s": round(time.perf_counter() - started, 3)},
    }


async def _run_locally(payload: dict, ntasks: int, folder: Path) -> list[dict]:
    """The replicas one after another in this process, each reporting its steps as a task of the job."""
    from kiln.tasks.simulation.executors import replica

    calculation = payload["calculation"]
    tasks = [{"task_id": i, "status": "pending", "done_units": 0, "requested_units": 0} for i in range(1, ntasks + 1)]
    last = [0.0]

    def report(force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - last[0] >= PROGRESS_INTERVAL_SECONDS:
            last[0] = now
            done = sum(t["done_units"] / t["requested_units"] if t["requested_units"] else 0 for t in tasks)
            finished = sum(t["status"] == "completed" for t in tasks)
            report_tasks([dict(t) for t in tasks], 100 * done / ntasks, f"{finished} of {ntasks} replicas done")

    outputs = []
    for task in tasks:
        def progress(done: int, total: int, task=task) -> None:
            task.update(status="running", done_units=int(done), requested_units=int(total))
            report()

        task["status"] = "running"
        await asyncio.to_thread(report, True)
        outputs.append(await asyncio.to_thread(replica, payload, calculation, task["task_id"], ntasks, str(folder),
                                               progress))
        task.update(status="completed", done_units=max(task["requested_units"], 1),
                    requested_units=max(task["requested_units"], 1))
        await asyncio.to_thread(report, True)
    return outputs


JOB_TYPE = JobType(
    name="simulation",
    description="Relaxation or molecular dynamics (NVE/NVT/NPT) with a matgl potential, or a molecular "
    "single point with GFN2-xTB (tblite) or DFT (PySCF); ntasks MD replicas merged; large runs or a "
    "cluster compute_target go to an hpc_submit child job.",
    input_model=SimulationInput,
    flow=simulation,
    requires=("matgl", "torch", "ase", "pymatgen", "tblite", "pyscf", "dask_jobqueue"),
    check="kiln.tasks.simulation.replicas:require_model",
    versions="kiln.tasks.ml.models:model_version",
    runs_on_clusters=True,
)
