"""The /api/v1/jobs endpoints."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from kiln.api.auth import project_of_caller
from kiln.api.contract import error_responses
from kiln.submission import read_job
from kiln.dispatch.dispatcher import waiting_reason
from kiln.errors import (
    Conflict,
    InputInvalid,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    RateLimited,
    ServerError,
    Unauthorized,
    UnknownJobType,
)
from kiln.registry import job_types
from kiln.run_reports import RUN_TOKEN_HEADER, RunTokenRefused, read_run_token
from kiln.schemas import (
    Job,
    JobCreate,
    JobPage,
    JobPatch,
    JobStatus,
    JobTypeInfo,
    Resources,
)
from kiln.schemas.jobs import INT32, ProgressRecorded, ProgressReport, RunEndedMirrored
from kiln.store.job_tasks import record_task_progress
from kiln.store.batches import add_jobs
from kiln.store.models import JobRow

# every route here needs a key and may fail; each adds the errors of its own below
router = APIRouter(prefix="/api/v1", responses=error_responses(Unauthorized, ServerError))

Project = Annotated[str, Depends(project_of_caller)]

SSE_KEEPALIVE_SECONDS = 15
# how far below a run's own job a progress report may go looking for it: child jobs of child jobs, …
MAX_CHILD_DEPTH = 20


async def job_view(request: Request, row: JobRow, *, with_reason: bool = True) -> Job:
    state = request.app.state
    reason = row.status_reason
    if with_reason and row.status == JobStatus.PENDING.value:
        waiting = await waiting_reason(state.store, row, await state.dispatcher.capacity())
        reason = f"{reason}; {waiting}" if reason else waiting
    return Job(
        id=row.id,
        type=row.type,
        project_id=row.project_id,
        status=JobStatus(row.status),
        priority=row.priority,
        input=row.input,
        resources=Resources.model_validate(row.resources or {}),
        compute_target=row.compute_target,
        parent_id=row.parent_id,
        output=row.output,
        status_reason=reason,
        attempt=row.attempt,
        created_at=row.created_at,
        queued_at=row.queued_at,
        started_at=row.started_at,
        completed_at=row.completed_at,
        flow_run_id=row.flow_run_id,
        flow_run_url=f"{state.settings.prefect_api.removesuffix('/api')}/runs/flow-run/{row.flow_run_id}"
        if row.flow_run_id
        else None,
    )


@router.get("/job-types", response_model=list[JobTypeInfo], summary="The job types and their input schemas")
async def list_job_types(project_id: Project) -> list[JobTypeInfo]:
    return [
        JobTypeInfo(
            type=jt.name,
            description=jt.description,
            available=jt.available,
            input_schema=jt.input_model.model_json_schema(),
        )
        for jt in job_types().values()
    ]


@router.post(
    "/jobs",
    status_code=202,
    response_model=Job,
    summary="Submit a job",
    responses=error_responses(InvalidRequest, UnknownJobType, QuotaExceeded, NotFound, InputInvalid, RateLimited),
)
async def create_job(request: Request, body: JobCreate, project_id: Project) -> Job:
    return await job_view(request, await submit_job(request, project_id, body))


async def submit_job(request: Request, project_id: str, body: JobCreate, **recorded) -> JobRow:
    """The one way a job comes in through the API: rate-limited, read by read_job (input, plugin and file checks,
    cache key, quota), stored by add_jobs with `recorded` (NewJob's fields, e.g. submitted_via), the dispatcher
    woken."""
    state = request.app.state
    state.rate_limiter.take(request.state.key_hash, "job submissions", state.settings.submit_rate_per_minute)
    new_job = replace(await read_job(state, project_id, body), **recorded)
    _, (stored,) = await add_jobs(state.store, project_id, [new_job], key_prefix=request.state.caller.key_prefix)
    if stored.status is JobStatus.PENDING:
        state.dispatcher.wake()
    return await state.store.get_job(stored.job_id, documents=True)


@router.get(
    "/jobs/{job_id}", response_model=Job, summary="A job, with its status and output", responses=error_responses(NotFound)
)
async def get_job(request: Request, job_id: str, project_id: Project) -> Job:
    return await job_view(request, await request.app.state.store.get_job(job_id, project_id, documents=True))


@router.get(
    "/jobs",
    response_model=JobPage,
    summary="The project's jobs, newest first",
    responses=error_responses(InvalidRequest),
)
async def list_jobs(
    request: Request,
    project_id: Project,
    type: str | None = None,
    status: JobStatus | None = None,
    parent_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    cursor: str | None = None,
) -> JobPage:
    return await job_page(request, project_id, limit, cursor, type=type, status=status, parent_id=parent_id)


async def job_page(request: Request, project_id: str, limit: int, cursor: str | None, **filters) -> JobPage:
    """A page of the project's jobs matching `filters` (those of Store.list_jobs), newest first."""
    try:
        position = int(cursor) if cursor is not None else None
        if position is not None and not 0 <= position <= INT32["le"]:
            raise ValueError(position)
    except ValueError:
        raise InvalidRequest(f"cursor: {cursor!r} is not a cursor this API returned") from None
    rows, next_cursor = await request.app.state.store.list_jobs(project_id, limit=limit, cursor=position, **filters)
    return JobPage(
        jobs=[await job_view(request, r, with_reason=False) for r in rows],
        next_cursor=str(next_cursor) if next_cursor is not None else None,
    )


@router.patch(
    "/jobs/{job_id}",
    response_model=Job,
    summary="Change a pending job's priority, or a running MCP deployment's replicas",
    # InvalidRequest: a body that is not JSON at all
    responses=error_responses(InvalidRequest, NotFound, Conflict, InputInvalid),
)
async def patch_job(request: Request, job_id: str, body: JobPatch, project_id: Project) -> Job:
    """409 when the job cannot change so: priority only while pending, replicas only of a running mcp_host job."""
    from kiln.api.mcp import scale

    store = request.app.state.store
    row = await store.get_job(job_id, project_id)
    if body.replicas is not None:
        await scale(request, row, body.replicas)
        row = await store.update_input(job_id, {"replicas": body.replicas})
    if body.priority is not None:
        row = await store.set_priority(job_id, project_id, body.priority)
        request.app.state.dispatcher.wake()
    return await job_view(request, row)


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=Job,
    summary="Cancel a job and its children",
    responses=error_responses(NotFound, Conflict),
)
async def cancel_job(request: Request, job_id: str, project_id: Project) -> Job:
    return await job_view(request, await cancel(request, await request.app.state.store.get_job(job_id, project_id)))


async def cancel(request: Request, row: JobRow) -> JobRow:
    """Cancels an unfinished job and its children (Conflict for an ended one); the job as it is now."""
    if JobStatus(row.status).is_final:
        raise Conflict(f"job {row.id} is already {row.status}; only an unfinished job can be cancelled")
    await request.app.state.dispatcher.cancel(row, "cancelled by request")
    return await request.app.state.store.get_job(row.id, row.project_id, documents=True)


@router.post(
    "/jobs/{job_id}/progress",
    response_model=ProgressRecorded,
    summary="A running job's progress, from its own flow: kiln's own path, authenticated by the run token its worker "
    "gave the flow run, not by an API key",
    responses=error_responses(RunTokenRefused, InvalidRequest, NotFound, Conflict, InputInvalid),
    openapi_extra={"security": []},
)
async def report_progress(
    request: Request,
    job_id: str,
    body: ProgressReport,
    run_token: Annotated[str | None, Header(alias=RUN_TOKEN_HEADER, description="The flow run's run token.")] = None,
) -> ProgressRecorded:
    """Recorded in the job index at once (Prefect's event pipeline may lag minutes behind its states), so a report
    made before the flow ended comes before the job's end on its event stream. A token is good for its own job and
    that job's parent and children, while its flow run is its job's current attempt (409 for an earlier attempt's)."""
    store = request.app.state.store
    token_job, token_run = read_run_token(request.app.state.run_key, run_token)
    own = await store.get_job(token_job)
    if own.flow_run_id != token_run:
        raise Conflict(f"{RUN_TOKEN_HEADER}: flow run {token_run} is no longer job {token_job}'s current attempt "
                       f"({own.flow_run_id})")  # fmt: skip
    if not await _of_family(store, await store.get_job(job_id), own):
        raise RunTokenRefused(f"{RUN_TOKEN_HEADER}: the token of job {token_job}'s run; job {job_id} is not that "
                              "job, its parent or one of its children")  # fmt: skip
    if body.tasks is not None:
        recorded = await record_task_progress(store, job_id, body.model_dump())
    else:
        recorded = await store.add_progress(job_id, body.percent, body.message)
    return ProgressRecorded(recorded=recorded)


@router.post(
    "/jobs/{job_id}/ended",
    response_model=RunEndedMirrored,
    summary="The job's flow run ended, as its kiln worker says on kiln's own path, authenticated by the run's token: "
    "kiln reads the run's state from Prefect and mirrors it now",
    responses=error_responses(RunTokenRefused, NotFound),
    openapi_extra={"security": []},
)
async def run_ended(
    request: Request,
    job_id: str,
    run_token: Annotated[str | None, Header(alias=RUN_TOKEN_HEADER, description="The flow run's run token.")] = None,
) -> RunEndedMirrored:
    """Prefect's event of the run's end may lag far behind under load; the job's end, and the release of the next
    job into its slot, need not wait for it. The worker's word is not taken for the state: Prefect's is. A token is
    good for its own job only; for a run that is no longer the job's current attempt nothing is done."""
    token_job, token_run = read_run_token(request.app.state.run_key, run_token)
    if token_job != job_id:
        raise RunTokenRefused(f"{RUN_TOKEN_HEADER}: the token of job {token_job}'s run, not of job {job_id}'s")
    if (await request.app.state.store.get_job(job_id)).flow_run_id != token_run:
        return RunEndedMirrored(mirrored=False)
    return RunEndedMirrored(mirrored=await request.app.state.relay.mirror_ended(token_run))


async def _of_family(store, job: JobRow, own: JobRow) -> bool:
    """Whether `job` is `own`, its parent, or a child of it at any depth (a run's subflows are child jobs)."""
    if job.id == own.parent_id:
        return True
    for _ in range(MAX_CHILD_DEPTH):
        if job.id == own.id:
            return True
        if job.parent_id is None:
            return False
        job = await store.get_job(job.parent_id)
    return False


@router.get(
    "/jobs/{job_id}/children",
    response_model=list[Job],
    summary="The job's child jobs",
    responses=error_responses(NotFound),
)
async def list_children(request: Request, job_id: str, project_id: Project) -> list[Job]:
    store = request.app.state.store
    await store.get_job(job_id, project_id)
    rows, _ = await store.list_jobs(project_id, parent_id=job_id, limit=1000)
    return [await job_view(request, r, with_reason=False) for r in reversed(rows)]


@router.get(
    "/jobs/{job_id}/events",
    summary="The job's events as Server-Sent Events; resumes after Last-Event-ID",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/event-stream": {}}},
        204: {"description": "Resumed after the job's last event: the stream has ended, do not reconnect."},
        **error_responses(NotFound, InvalidRequest),
    },
)
async def job_events(
    request: Request,
    job_id: str,
    project_id: Project,
    last_event_id: Annotated[str | None, Header()] = None,
) -> Response:
    store = request.app.state.store
    job = await store.get_job(job_id, project_id)
    try:
        after = int(last_event_id) if last_event_id else 0
        if not 0 <= after <= INT32["le"]:
            raise ValueError(after)
    except ValueError:
        raise InvalidRequest(f"Last-Event-ID: {last_event_id!r} is not an event id") from None
    if after and JobStatus(job.status).is_final and not await store.events_after(job_id, after):
        # resumed after the job's last event: 204 tells an SSE client to stop reconnecting
        return Response(status_code=204)

    async def stream():
        nonlocal after
        flag = store.bus.subscribe(job_id)
        try:
            yield "retry: 1000\n\n"
            while True:
                flag.clear()
                for event in await store.events_after(job_id, after):
                    after = event.id
                    yield f"id: {event.id}\nevent: {event.event}\ndata: {json.dumps(event.data)}\n\n"
                    if event.event in ("completed", "failed", "cancelled"):
                        return
                try:
                    # an announcement from another kiln API can be lost (PostgreSQL restarting): look again now and then
                    await asyncio.wait_for(flag.wait(), SSE_KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keepalive\n\n"
        finally:
            store.bus.unsubscribe(job_id, flag)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )

