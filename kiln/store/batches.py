"""The job index's side of submission: many jobs in one transaction, cache hits, core-hour budgets, batches."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func, insert, select, update

from kiln.errors import Conflict, NotFound, QuotaExceeded
from kiln.schemas.statuses import JobStatus
from kiln.store import llm
from kiln.store.models import (
    BatchRow,
    CacheEntryRow,
    JobEventRow,
    JobRow,
    Project,
    utcnow,
)

# SQLite allows 32766 bound parameters per statement; IN lists stay well below
_CHUNK = 500
UNFINISHED = [status.value for status in JobStatus if not status.is_final]


@dataclass(frozen=True)
class NewJob:
    """A job read and checked by the API, ready to store."""

    type: str
    input: dict[str, Any]
    resources: dict[str, Any]
    input_hash: str | None
    core_hours: float
    priority: int = 0
    compute_target: str | None = None
    parent_id: str | None = None
    refresh: bool = False
    # what the project's LLM budget holds for it until it ends (an LLM call's most possible cost)
    held_usd: float = 0.0
    # it serves until cancelled (JobType.persistent)
    persistent: bool = False
    # the API whose routes submitted it, when not kiln's own, and its request (JobRow.submitted_via)
    submitted_via: str | None = None
    submitted_request: dict[str, Any] | None = None


@dataclass(frozen=True)
class Stored:
    job_id: str
    status: JobStatus


async def add_jobs(
    store,
    project_id: str,
    jobs: list[NewJob],
    *,
    batch_size: int | None = None,
    batch_id: str | None = None,
    hardware: dict[str, Any] | None = None,
    parent_id: str | None = None,
    key_prefix: str | None = None,
) -> tuple[str | None, list[Stored]]:
    """Stores the jobs in one transaction: each pending, or a cache hit answered from a finished job's result.

    The project's core-hour budget must cover the jobs that will run (cache hits cost nothing), or
    nothing is stored (QuotaExceeded). With `batch_size`, the jobs form a new batch of that many
    entries (the failed ones counted); its id (`batch_id`, or a new one) comes back first. A batch id
    that exists already raises Conflict, and nothing is stored: a batch is submitted once.
    """
    now = utcnow()
    async with store.session.begin() as s:
        project = await s.get(Project, project_id)
        hits = {}
        if project.reuse_results:
            hits = await _cache_hits(s, project_id, {j.input_hash for j in jobs if not j.refresh})
        cost = sum(j.core_hours for j in jobs if j.refresh or j.input_hash not in hits)
        if project.budget_core_hours is not None:
            # unfinished jobs hold their estimates until they end and are charged what they used
            held = await s.scalar(
                select(func.coalesce(func.sum(JobRow.estimated_core_hours), 0.0)).where(
                    JobRow.project_id == project_id, JobRow.status.in_(UNFINISHED)
                )
            )
            left = project.budget_core_hours - project.used_core_hours - held
            if cost > left:
                raise QuotaExceeded(
                    f"jobs: they would take about {cost:.2f} core-hours and the project has {max(left, 0):.2f} of "
                    f"its {project.budget_core_hours:g} left ({project.used_core_hours:.2f} used, {held:.2f} held "
                    "by unfinished jobs); nothing was submitted",
                    details={"estimated_core_hours": cost, "left_core_hours": left, "held_core_hours": held},
                )
        await llm.hold(s, project_id, sum(j.held_usd for j in jobs if j.refresh or j.input_hash not in hits))
        if batch_size is not None:
            batch_id = batch_id or str(uuid.uuid4())
            if await s.get(BatchRow, batch_id) is not None:
                raise Conflict(f"batch {batch_id} exists already")
            s.add(BatchRow(id=batch_id, project_id=project_id, size=batch_size, rejected=batch_size - len(jobs),
                           hardware=hardware, parent_id=parent_id, created_at=now))  # fmt: skip
        rows, events, stored = [], [], []
        for job in jobs:
            job_id = str(uuid.uuid4())
            row = {
                "id": job_id, "project_id": project_id, "type": job.type, "priority": job.priority,
                "input": job.input, "resources": job.resources, "compute_target": job.compute_target,
                "parent_id": job.parent_id, "in_parent_run": False, "input_hash": job.input_hash,
                "batch_id": batch_id, "created_at": now, "key_prefix": key_prefix, "persistent": job.persistent,
                "submitted_via": job.submitted_via, "submitted_request": job.submitted_request,
            }  # fmt: skip
            hit = None if job.refresh else hits.get(job.input_hash)
            if hit is None:
                rows.append({**row, "status": JobStatus.PENDING.value, "output": None, "status_reason": None,
                             "completed_at": None, "estimated_core_hours": job.core_hours,
                             "held_usd": job.held_usd})  # fmt: skip
                events.append({"job_id": job_id, "event": "status", "data": {"status": "pending"}, "created_at": now})
                stored.append(Stored(job_id, JobStatus.PENDING))
            else:
                source, output = hit
                reason = f"the result of job {source}, which had the same type, input and code version"
                rows.append({**row, "status": JobStatus.CACHE_HIT.value, "output": output, "completed_at": now,
                             "status_reason": reason, "estimated_core_hours": 0.0, "held_usd": 0.0})  # fmt: skip
                data = {"output": output, "status": JobStatus.CACHE_HIT.value, "cache_of": source}
                events.append({"job_id": job_id, "event": "completed", "data": data, "created_at": now})
                stored.append(Stored(job_id, JobStatus.CACHE_HIT))
        if rows:
            await s.execute(insert(JobRow), rows)
            await s.execute(insert(JobEventRow), events)
    await store.notify([item.job_id for item in stored])
    return batch_id, stored


async def _cache_hits(s, project_id: str, hashes: set[str]) -> dict[str, tuple[str, Any]]:
    """input hash → (the job that produced the result, its output), for the hashes the cache holds."""
    found: dict[str, tuple[str, Any]] = {}
    ordered = sorted(hashes)
    for start in range(0, len(ordered), _CHUNK):
        query = (
            select(CacheEntryRow.input_hash, JobRow.id, JobRow.output)
            .join(JobRow, JobRow.id == CacheEntryRow.job_id)
            .where(CacheEntryRow.project_id == project_id, CacheEntryRow.input_hash.in_(ordered[start : start + _CHUNK]))
        )
        for input_hash, job_id, output in await s.execute(query):
            found[input_hash] = (job_id, output)
    return found


async def record_finish(s, row: JobRow, status: JobStatus, at, output: Any = None, *, charge: bool = True) -> None:
    """In a final transition's transaction: a completed job enters the cache, and a job that ran is charged
    its real run time × its cores (at least one) to its project's core-hours (unless `charge` is off), and
    the cost_usd of its `output` to its LLM budget, releasing what that held (kiln.store.llm.settle)."""
    if status is JobStatus.COMPLETED and row.input_hash:
        await s.merge(CacheEntryRow(project_id=row.project_id, input_hash=row.input_hash, type=row.type,
                                    job_id=row.id, created_at=at))  # fmt: skip
    if charge and row.started_at is not None:
        cores = max(int((row.resources or {}).get("cpu_count") or 0), 1)
        hours = max((at - row.started_at).total_seconds() - (row.suspended_seconds or 0.0), 0.0) / 3600 * cores
        await s.execute(
            update(Project).where(Project.id == row.project_id).values(used_core_hours=Project.used_core_hours + hours)
        )
    if charge:
        await llm.settle(s, row, output, at)


async def unfinished_on_target(store, target: str) -> int:
    """Top-level jobs sent to a compute target and not ended: what its slots hold."""
    async with store.session() as s:
        return await s.scalar(
            select(func.count()).where(
                JobRow.compute_target == target, JobRow.in_parent_run.is_(False),
                JobRow.status.in_(UNFINISHED),
            )
        )  # fmt: skip


# the cache


async def cache_entries(store, project_id: str, type: str | None, input_hash: str | None) -> list[CacheEntryRow]:
    query = select(CacheEntryRow).where(CacheEntryRow.project_id == project_id)
    if type is not None:
        query = query.where(CacheEntryRow.type == type)
    if input_hash is not None:
        query = query.where(CacheEntryRow.input_hash == input_hash)
    async with store.session() as s:
        return list(await s.scalars(query.order_by(CacheEntryRow.created_at.desc()).limit(1000)))


async def files_owner(store, job_id: str, project_id: str) -> str:
    """The job whose files are `job_id`'s: itself, or for a cache hit the job whose result it reused; NotFound when the
    project has no such job."""
    row = await store.get_job(job_id, project_id)
    if row.status == JobStatus.CACHE_HIT.value:
        return await cache_source(store, job_id) or job_id
    return job_id


async def cache_source(store, job_id: str) -> str | None:
    """The job whose result the cache hit `job_id` reused (its files are the hit's too), as add_jobs recorded it in
    the hit's completed event; None for a job that is no cache hit."""
    async with store.session() as s:
        data = await s.scalar(
            select(JobEventRow.data).join(JobRow, JobRow.id == JobEventRow.job_id).where(
                JobEventRow.job_id == job_id, JobEventRow.event == "completed",
                JobRow.status == JobStatus.CACHE_HIT.value,
            )
        )  # fmt: skip
    return (data or {}).get("cache_of")


async def invalidate_cache_entry(store, project_id: str, input_hash: str) -> None:
    async with store.session.begin() as s:
        result = await s.execute(
            delete(CacheEntryRow).where(CacheEntryRow.project_id == project_id, CacheEntryRow.input_hash == input_hash)
        )
    if result.rowcount == 0:
        raise NotFound(f"input_hash: no cache entry {input_hash} in this project")


# budgets


async def set_budget(store, project_name: str, core_hours: float | None) -> None:
    async with store.session.begin() as s:
        result = await s.execute(update(Project).where(Project.name == project_name).values(budget_core_hours=core_hours))
    if result.rowcount == 0:
        raise NotFound(f"project {project_name!r} not found")


async def set_reuse_results(store, project_name: str, reuse: bool) -> None:
    async with store.session.begin() as s:
        result = await s.execute(update(Project).where(Project.name == project_name).values(reuse_results=reuse))
    if result.rowcount == 0:
        raise NotFound(f"project {project_name!r} not found")


async def usage(store, project_id: str) -> dict[str, float | None]:
    async with store.session() as s:
        project = await s.get(Project, project_id)
    return {"budget_core_hours": project.budget_core_hours, "used_core_hours": project.used_core_hours}


# batches


async def list_batches(store, project_id: str) -> list[BatchRow]:
    async with store.session() as s:
        query = select(BatchRow).where(BatchRow.project_id == project_id).order_by(BatchRow.created_at.desc())
        return list(await s.scalars(query))


async def get_batch(store, project_id: str, batch_id: str) -> BatchRow:
    async with store.session() as s:
        batch = await s.scalar(select(BatchRow).where(BatchRow.id == batch_id, BatchRow.project_id == project_id))
    if batch is None:
        raise NotFound(f"batch {batch_id} not found")
    return batch


COUNT_KEYS = ("pending", "queued", "running", "merging", "succeeded", "failed", "cancelled", "cache_hit")


async def batch_counts(store, batch: BatchRow) -> dict[str, int]:
    """Jobs per status, read in one statement so they add up to the batch's size even while jobs move."""
    async with store.session() as s:
        rows = await s.execute(
            select(JobRow.status, func.count()).where(JobRow.batch_id == batch.id).group_by(JobRow.status)
        )
        counts = dict.fromkeys(COUNT_KEYS, 0)
        for status, count in rows:
            counts["succeeded" if status == JobStatus.COMPLETED.value else status] += count
    counts["failed"] += batch.rejected
    return counts


async def delete_batches(store, batch_ids: list[str]) -> None:
    """Deletes the batches, their jobs and the jobs' events; cancel what is unfinished first."""
    async with store.session.begin() as s:
        for start in range(0, len(batch_ids), _CHUNK):
            chunk = batch_ids[start : start + _CHUNK]
            job_ids = select(JobRow.id).where(JobRow.batch_id.in_(chunk)).scalar_subquery()
            await s.execute(delete(JobEventRow).where(JobEventRow.job_id.in_(job_ids)))
            await s.execute(delete(CacheEntryRow).where(CacheEntryRow.job_id.in_(job_ids)))
            await s.execute(delete(JobRow).where(JobRow.batch_id.in_(chunk)))
            await s.execute(delete(BatchRow).where(BatchRow.id.in_(chunk)))
