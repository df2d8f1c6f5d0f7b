"""kiln's side of Prefect: the project applied as pool, queues and deployments; flow runs for jobs; states.

This is the one place that maps Prefect states to job statuses.
"""

from __future__ import annotations

import importlib
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.schedules import construct_schedule
from prefect.exceptions import ObjectAlreadyExists
from prefect.filesystems import LocalFileSystem
from prefect.states import Cancelled, Cancelling, Crashed, Scheduled
from prefect.utilities.callables import parameter_schema

from kiln.deployments.project import DeploymentSpec, Project, load_project
from kiln.job_inputs import flow_parameters
from kiln.prefect_env import RESULTS_BLOCK
from kiln.registry import available_job_types, job_types
from kiln.schemas.statuses import MERGING_STATE_NAME, JobStatus
from kiln.store.models import JobRow
from kiln.worker.worker import KilnWorker, force_state

log = logging.getLogger(__name__)

_STATUS_OF_STATE = {
    StateType.SCHEDULED: JobStatus.QUEUED,
    StateType.PENDING: JobStatus.QUEUED,
    StateType.RUNNING: JobStatus.RUNNING,
    # a paused run is still the job's running life (a lab booking waiting for its webhook)
    StateType.PAUSED: JobStatus.RUNNING,
    StateType.COMPLETED: JobStatus.COMPLETED,
    StateType.FAILED: JobStatus.FAILED,
    StateType.CRASHED: JobStatus.FAILED,
    StateType.CANCELLED: JobStatus.CANCELLED,
}


def status_of_state(state_type: StateType | str, state_name: str | None = None) -> JobStatus | None:
    """The job status a Prefect state means; None for Cancelling, which is not an end yet."""
    state_type = StateType(state_type)
    if state_type is StateType.RUNNING and state_name == MERGING_STATE_NAME:
        return JobStatus.MERGING
    return _STATUS_OF_STATE.get(state_type)


def reason_of_state(state_type: StateType | str, message: str | None) -> str | None:
    """A status_reason a user can act on, from a final Prefect state's message."""
    state_type = StateType(state_type)
    if state_type is StateType.CRASHED:
        return f"crashed: {message or 'the process running the job died'}"
    if state_type is StateType.FAILED:
        return message or "the job's flow failed without a message; see its logs in the Prefect UI"
    if state_type is StateType.CANCELLED:
        return message or "cancelled"
    return message


def job_tags(job: JobRow, project_name: str) -> list[str]:
    """The run's tags: the project by name, so an operator in the Prefect UI sees whose run it is."""
    return ["kiln", f"project:{project_name}", f"job:{job.id}", f"type:{job.type}"]


def job_of_tags(tags) -> str | None:
    """The kiln job id in a flow run's tags."""
    for tag in tags or ():
        if tag.startswith("job:"):
            return tag[4:]
    return None


def run_name(job: JobRow) -> str:
    """What a person sees in the Prefect UI: the type, a short id and the attempt."""
    name = f"{job.type}-{job.id[:8]}"
    return name if job.attempt == 1 else f"{name}-try{job.attempt}"


def load_flow(spec: DeploymentSpec):
    return getattr(importlib.import_module(spec.module), spec.function)


async def apply_project(client: PrefectClient, path: Path | None = None) -> dict[str, UUID]:
    """Creates the results block, the work pool, the band queues, one deployment per available job type
    (from its JobType) and the operator's deployments (scheduled batch runs) of the project file (`path`,
    or kiln's prefect.yaml).

    Returns job type → the deployment kiln releases that type's jobs to.
    """
    project = load_project(path)
    try:
        await client.create_work_pool(
            WorkPoolCreate(
                name=project.work_pool,
                type=KilnWorker.type,
                base_job_template=KilnWorker.get_default_base_job_template(),
                description="kiln jobs; each queue is a priority band",
            )
        )
    except ObjectAlreadyExists:
        pass
    for band in project.bands:
        try:
            await client.create_work_queue(
                name=band.queue,
                work_pool_name=project.work_pool,
                priority=band.prefect_priority,
                description=f"kiln jobs with priority ≥ {band.min_priority}" if band.min_priority is not None
                else "kiln jobs below every other band",
            )
        except ObjectAlreadyExists:
            pass
    await LocalFileSystem(basepath=os.environ["PREFECT_LOCAL_STORAGE_PATH"]).save(RESULTS_BLOCK, overwrite=True)
    # the cluster block type shows in the Prefect UI (Blocks → add) before any cluster is registered
    from kiln.blocks.cluster import HpcCluster

    await HpcCluster.aregister_type_and_schema(client=client)
    deployments: dict[str, UUID] = {}
    for job_type in available_job_types().values():
        spec = DeploymentSpec.of_job_type(job_type, project.default_queue)
        deployments[job_type.name] = await _apply_deployment(client, project, spec, job_type.flow)
    for spec in project.deployments:
        try:
            flow = load_flow(spec)
        except ImportError as exc:
            log.warning("deployment %s not applied: its flow %s does not import: %s", spec.name, spec.entrypoint, exc)
            continue
        await _apply_deployment(client, project, spec, flow)
    return deployments


async def _apply_deployment(client: PrefectClient, project: Project, spec: DeploymentSpec, flow) -> UUID:
    flow_id = await client.create_flow_from_name(flow.name)
    deployment_id = await client.create_deployment(
        flow_id=flow_id,
        name=spec.name,
        entrypoint=spec.entrypoint,
        description=spec.description,
        tags=list(spec.tags),
        work_pool_name=project.work_pool,
        work_queue_name=spec.work_queue_name,
        parameters=spec.parameters,
        schedules=[deployment_schedule(s) for s in spec.schedules],
        parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
        enforce_parameter_schema=False,
    )
    await apply_triggers(client, deployment_id, spec)
    return deployment_id


async def apply_triggers(client: PrefectClient, deployment_id: UUID, spec: DeploymentSpec) -> None:
    """The deployment's triggers as Prefect automations, replacing the ones it had (as `prefect deploy` does)."""
    from prefect.events import DeploymentTriggerTypes
    from pydantic import TypeAdapter

    await client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
    adapter = TypeAdapter(DeploymentTriggerTypes)
    for number, raw in enumerate(spec.triggers, start=1):
        trigger = adapter.validate_python({"name": f"{spec.name}__automation_{number}", **raw})
        trigger.set_deployment_id(deployment_id)
        await client.create_automation(trigger.as_automation())


def deployment_schedule(raw: dict[str, Any]) -> DeploymentScheduleCreate:
    """A prefect.yaml schedule ({cron | interval | rrule, timezone, anchor_date, active}) as Prefect takes it."""
    options = {k: v for k, v in raw.items() if k not in ("active", "max_scheduled_runs")}
    return DeploymentScheduleCreate(
        schedule=construct_schedule(**options),
        active=raw.get("active", True),
        max_scheduled_runs=raw.get("max_scheduled_runs"),
    )


async def create_job_run(
    client: PrefectClient, job: JobRow, deployment_id: UUID, project_name: str, scheduled_time: datetime | None = None
):
    """The job's flow run, Scheduled at `scheduled_time` (now when None): within a band, a worker takes the runs in
    the order of their scheduled times. The idempotency key makes a second release of the same attempt return the
    first run."""
    band = load_project().band_for(job.priority)
    resources = job.resources or {}
    job_type = job_types().get(job.type)
    # the flow takes the type's input model as `input`; a type that may run on a cluster, where too
    values = {"input": job.input}
    if job_type is not None and job_type.runs_on_clusters:
        values.update(compute_target=job.compute_target, resources=resources)
    parameters = await flow_parameters(job.id, job.attempt, values)
    return await client.create_flow_run_from_deployment(
        deployment_id,
        parameters=parameters,
        name=run_name(job),
        tags=job_tags(job, project_name),
        idempotency_key=f"kiln:{job.id}:{job.attempt}",
        state=Scheduled(scheduled_time=scheduled_time),
        work_queue_name=band.queue,
        job_variables={k: v for k, v in resources.items() if v not in (None, 0, False)},
    )


async def cancel_run(client: PrefectClient, flow_run_id: str | UUID, reason: str) -> None:
    """Cancels a flow run: at once if no worker holds it yet, through its worker (Cancelling) if one does."""
    flow_run = await client.read_flow_run(UUID(str(flow_run_id)))
    if flow_run.state is None or flow_run.state.is_final():
        return
    # a suspended run (Paused) has left its worker: nothing is there to stop
    if flow_run.state.is_scheduled() or flow_run.state.is_paused() or (
        flow_run.state.is_pending() and not flow_run.infrastructure_pid
    ):
        await force_state(client, flow_run_id, Cancelled(message=reason))
    else:
        set_to = await force_state(client, flow_run_id, Cancelling(message=reason))
        if set_to is not None and set_to.type is StateType.CANCELLED and not set_to.message:
            # it suspended itself since it was read: Prefect makes a Paused run's Cancelling a Cancelled of its own,
            # without the reason (BypassCancellingFlowRunsWithNoInfra)
            await force_state(client, flow_run_id, Cancelled(message=reason))


async def crash_run(client: PrefectClient, flow_run_id: str | UUID, reason: str) -> bool:
    """Marks a flow run crashed unless it already ended; True when it was changed."""
    flow_run = await client.read_flow_run(UUID(str(flow_run_id)))
    if flow_run.state is not None and flow_run.state.is_final():
        return False
    if flow_run.state is not None and (flow_run.state.is_paused() or flow_run.state.name == "Resuming"):
        # suspended (or resumed and not yet taken): it left its worker on purpose, whatever the worker's last
        # heartbeat said; its Paused state reaches the job as SuspendedRunHoldsNoSlot
        return False
    await force_state(client, flow_run_id, Crashed(message=reason))
    return True


async def run_output(flow_run: FlowRun) -> Any:
    """The completed flow run's return value, from Prefect's result storage."""
    return await flow_run.state.aresult(raise_on_failure=False)


async def failed_run_output(flow_run: FlowRun) -> dict | None:
    """The output a failed flow run kept: the data of the Failed state its flow returned (a plugin_exec run's
    stdout and stderr); None for a run that raised, whose result is its exception."""
    try:
        output = await run_output(flow_run)
    except Exception:  # noqa: BLE001 - a failure without a stored result has no output
        return None
    return output if isinstance(output, dict) else None
