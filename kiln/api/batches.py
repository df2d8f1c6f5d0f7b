"""Batches: POST /api/v1/jobs/submit-batch, the /api/v1/batches views, and the cache and quota they rest on."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response, StreamingResponse

from kiln.api.contract import error_responses
from kiln.api.jobs import SSE_KEEPALIVE_SECONDS, Project, job_page
from kiln.errors import InvalidRequest, NotFound, QuotaExceeded, RateLimited, ServerError, TooLarge, Unauthorized
from kiln.store.bus import ANY_JOB
from kiln.schemas import JobPage
from kiln.schemas.batches import Batch, BatchCreate, BatchResult, Hardware
from kiln.schemas.statuses import FINAL_STATUSES, JobStatus
from kiln.store import batches as store_batches
from kiln.submission import accept_batch

# every route here needs a key and may fail; each adds the errors of its own below
router = APIRouter(prefix="/api/v1", responses=error_responses(Unauthorized, ServerError))

# the batch stream sends counts at most this often (seconds)
BATCH_EVENTS_INTERVAL = 0.25


@router.post(
    "/jobs/submit-batch",
    status_code=202,
    response_model=BatchResult,
    summary="Submit up to 1000 jobs",
    # InvalidRequest: a body that is not JSON at all
    responses=error_responses(InvalidRequest, QuotaExceeded, TooLarge, RateLimited),
)
async def submit_batch(request: Request, body: BatchCreate, project_id: Project) -> BatchResult:
    """Each entry is read on its own: a bad one fails alone, with its index and field, and the rest go on.

    An entry whose finished twin exists (same type, canonical input and code version) is a cache hit,
    answered at once. A named compute target takes entries up to its free slots, counted through the
    batch. The whole batch is refused (402, nothing stored) when the project's budget cannot cover it.
    """
    state = request.app.state
    limit = state.settings.batch_max_jobs
    if len(body.jobs) > limit:
        raise TooLarge(f"jobs: {len(body.jobs)} entries; a batch takes at most {limit}, send the rest in more batches")
    state.rate_limiter.take(request.state.key_hash, "batch submissions", state.settings.batch_rate_per_minute)
    return await accept_batch(state, project_id, body.jobs, body.hardware, key_prefix=request.state.caller.key_prefix)


def _batch_view(batch, counts: dict[str, int] | None = None) -> Batch:
    return Batch(id=batch.id, size=batch.size, submitted=batch.size - batch.rejected,
                 hardware=Hardware.model_validate(batch.hardware) if batch.hardware else None,
                 parent_id=batch.parent_id, created_at=batch.created_at, counts=counts)  # fmt: skip


@router.get("/batches", response_model=list[Batch], summary="The caller's batches, newest first")
async def list_batches(request: Request, project_id: Project) -> list[Batch]:
    return [_batch_view(b) for b in await store_batches.list_batches(request.app.state.store, project_id)]


@router.get(
    "/batches/{batch_id}",
    response_model=Batch,
    summary="A batch with its jobs counted by status",
    responses=error_responses(NotFound),
)
async def get_batch(request: Request, batch_id: str, project_id: Project) -> Batch:
    store = request.app.state.store
    batch = await store_batches.get_batch(store, project_id, batch_id)
    return _batch_view(batch, await store_batches.batch_counts(store, batch))


@router.get(
    "/batches/{batch_id}/jobs",
    response_model=JobPage,
    summary="A batch's jobs, newest first",
    responses=error_responses(NotFound, InvalidRequest),
)
async def list_batch_jobs(
    request: Request,
    batch_id: str,
    project_id: Project,
    status: JobStatus | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    cursor: str | None = None,
) -> JobPage:
    await store_batches.get_batch(request.app.state.store, project_id, batch_id)
    return await job_page(request, project_id, limit, cursor, status=status, batch_id=batch_id)


@router.get(
    "/batches/{batch_id}/events",
    summary="The batch's counts as they change (Server-Sent Events)",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}}}, **error_responses(NotFound)},
)
async def batch_events(request: Request, batch_id: str, project_id: Project) -> StreamingResponse:
    """`event: counts` with the batch's counts whenever one of its jobs moves; the stream ends once all are final."""
    state = request.app.state
    batch = await store_batches.get_batch(state.store, project_id, batch_id)

    async def stream():
        last = None
        wake = state.store.bus.subscribe(ANY_JOB)
        try:
            while True:
                wake.clear()
                counts = await store_batches.batch_counts(state.store, batch)
                if counts != last:
                    last = counts
                    yield f"event: counts\ndata: {json.dumps(counts)}\n\n"
                if not any(counts[k] for k in store_batches.UNFINISHED):
                    return
                try:
                    await asyncio.wait_for(wake.wait(), SSE_KEEPALIVE_SECONDS)
                except TimeoutError:
                    yield ": keepalive\n\n"
                await asyncio.sleep(BATCH_EVENTS_INTERVAL)  # a thousand moves in a second make one message
        finally:
            state.store.bus.unsubscribe(ANY_JOB, wake)

    return StreamingResponse(stream(), media_type="text/event-stream")


async def _cancel_and_delete(request: Request, batch_ids: list[str], project_id: str) -> None:
    state = request.app.state
    for batch_id in batch_ids:
        rows, cursor = [], None
        while True:
            page, cursor = await state.store.list_jobs(project_id, batch_id=batch_id, limit=1000, cursor=cursor)
            rows.extend(page)
            if cursor is None:
                break
        for row in rows:
            if JobStatus(row.status) not in FINAL_STATUSES:
                await state.dispatcher.cancel(row, "cancelled with its batch")
    await store_batches.delete_batches(state.store, batch_ids)


@router.delete(
    "/batches/{batch_id}",
    status_code=204,
    summary="Cancel a batch's unfinished jobs, then delete it",
    responses=error_responses(NotFound),
)
async def delete_batch(request: Request, batch_id: str, project_id: Project) -> Response:
    await store_batches.get_batch(request.app.state.store, project_id, batch_id)
    await _cancel_and_delete(request, [batch_id], project_id)
    return Response(status_code=204)


@router.delete("/batches", status_code=204, summary="Cancel and delete all of the caller's batches")
async def delete_all_batches(request: Request, project_id: Project) -> Response:
    batches = await store_batches.list_batches(request.app.state.store, project_id)
    await _cancel_and_delete(request, [b.id for b in batches], project_id)
    return Response(status_code=204)


@router.get("/cache", summary="Cache entries: which finished job answers which input")
async def list_cache(
    request: Request, project_id: Project, type: str | None = None, input_hash: str | None = None
) -> list[dict]:
    entries = await store_batches.cache_entries(request.app.state.store, project_id, type, input_hash)
    return [{"type": e.type, "input_hash": e.input_hash, "job_id": e.job_id, "created_at": e.created_at.isoformat()}
            for e in entries]  # fmt: skip


@router.delete(
    "/cache",
    status_code=204,
    summary="Invalidate one cache entry; its input runs again next time",
    responses=error_responses(NotFound),
)
async def invalidate_cache(request: Request, project_id: Project, input_hash: str) -> Response:
    await store_batches.invalidate_cache_entry(request.app.state.store, project_id, input_hash)
    return Response(status_code=204)


@router.get("/quota", summary="The project's core-hour budget and what it has used")
async def quota(request: Request, project_id: Project) -> dict:
    return await store_batches.usage(request.app.state.store, project_id)
