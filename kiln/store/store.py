"""The job index's operations: projects and keys, jobs and their transitions, the event log, workers."""

from __future__ import annotations

import hashlib
import logging
import secrets
import uuid
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, bindparam, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import undefer

from kiln.errors import Conflict, InvalidRequest, NotFound
from kiln.store.bus import EventBus
from kiln.store.coordination import CHANNEL, MIGRATE_LOCK, RELEASE_LOCK, is_shared, payloads
from kiln.schemas.statuses import (
    CANCELLABLE_STATUSES,
    FINAL_STATUSES,
    IN_FLIGHT_STATUSES,
    JobStatus,
)
from kiln.store import policy
from kiln.store.batches import record_finish
from kiln.store.db import make_engine, make_sessionmaker, upgrade_async
from kiln.store.models import ApiKey, JobEventRow, JobRow, Project, WorkerRow, utcnow
from kiln.store.policy import Source

log = logging.getLogger(__name__)

KEY_PREFIX = "kiln_"

# the loader options for a job's input and output, which the hot paths (relay, dispatcher, heartbeats) never read
DOCUMENTS = (undefer(JobRow.input), undefer(JobRow.output))
_TERMINAL_EVENT = {JobStatus.COMPLETED: "completed", JobStatus.FAILED: "failed", JobStatus.CANCELLED: "cancelled"}
_NOTIFY = text("SELECT pg_notify(:channel, payload) FROM unnest(CAST(:payloads AS text[])) AS payload")
_XACT_LOCK = text("SELECT pg_advisory_xact_lock(:key)")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who an API key is: its project, its prefix (what usage is grouped by) and its LLM limits."""

    project_id: str
    key_prefix: str
    llm_calls_per_minute: int | None
    llm_tokens_per_minute: int | None
    # whether the project has an LLM budget: only then does a call reserve before it starts
    llm_budgeted: bool


# Every API request reads its key's caller, and every request of an MCP session its deployment with it: the statements
# are built once and read columns, not ORM objects. Timed in one process on the 2-core machine, CPU per call: the key
# 1.2 → 0.8-0.9 ms; an MCP request's lookup, two reads (caller, list_jobs) 3.0 ms → this one 0.9-1.2 ms.
_CALLER = (
    select(ApiKey.project_id, ApiKey.prefix, ApiKey.llm_calls_per_minute, ApiKey.llm_tokens_per_minute,
           Project.llm_budget_usd)
    .join(Project, Project.id == ApiKey.project_id)
    .where(ApiKey.key_hash == bindparam("key_hash"), ApiKey.revoked_at.is_(None))
)  # fmt: skip
_CALLER_AND_JOBS = (
    _CALLER.add_columns(JobRow.id, JobRow.input)
    .outerjoin(JobRow, and_(JobRow.project_id == ApiKey.project_id, JobRow.type == bindparam("type"),
                            JobRow.status == bindparam("status")))
    .order_by(JobRow.seq.desc())
    .limit(bindparam("limit"))
)  # fmt: skip


def _caller(row) -> Caller:
    project_id, prefix, calls, tokens, budget = row[:5]
    return Caller(project_id, prefix, calls, tokens, budget is not None)


@dataclass(frozen=True)
class Capacity:
    """What the live workers offer, as the dispatcher last saw it: batch slots, and service slots apart."""

    slots: int
    # released batch jobs not ended: those in the slots, and those released ahead of them waiting for one
    busy: int
    workers: list[WorkerRow]
    service_slots: int = 0
    services_busy: int = 0
    # the bound: batch jobs released beyond the free slots (KILN_RELEASE_AHEAD)
    ahead: int = 0

    @property
    def free(self) -> int:
        return max(self.slots - self.busy, 0)

    @property
    def releasable(self) -> int:
        """Batch jobs the dispatcher may release now: the free slots and the bound ahead of them, less the jobs
        already released and waiting for a slot."""
        return max(self.slots + self.ahead - self.busy, 0) if self.slots else 0

    @property
    def waiting(self) -> int:
        """Released batch jobs beyond the slots: their runs wait Scheduled in Prefect for the next free slot."""
        return max(self.busy - self.slots, 0)

    @property
    def services_free(self) -> int:
        return max(self.service_slots - self.services_busy, 0)


def _move(s, row: JobRow, status: JobStatus, reason: str | None, output: Any, at: datetime) -> None:
    """Sets the job's status and what goes with it, and logs the event its SSE stream carries."""
    row.status = status.value
    if status is JobStatus.QUEUED:
        row.queued_at = row.queued_at or at
        row.status_reason = reason or row.status_reason
    elif status is JobStatus.RUNNING:
        row.started_at = at
        row.picked_at = row.picked_at or at
        row.status_reason = reason
    elif status is JobStatus.MERGING:
        row.status_reason = reason
    else:
        row.completed_at = at
        row.status_reason = reason
        # a failed job keeps what it produced when there is any (an LLM call's partial answer)
        if status is JobStatus.COMPLETED or output is not None:
            row.output = output
    if status in _TERMINAL_EVENT:
        data = {"output": output} if status is JobStatus.COMPLETED else {"reason": reason}
        s.add(JobEventRow(job_id=row.id, event=_TERMINAL_EVENT[status], data=data, created_at=at))
    else:
        data = {"status": status.value, **({"reason": reason} if reason else {})}
        s.add(JobEventRow(job_id=row.id, event="status", data=data, created_at=at))


async def lock_unfinished(s, job_id: str) -> bool:
    """Whether the job exists and has not ended, its row locked until the transaction ends.

    Every writer of a job's events holds that lock, so a job's events commit in the order of their ids: PostgreSQL
    numbers a row at its INSERT, and an event numbered before another but committed after it would never reach an
    SSE stream that had already sent the other (it resumes after the last id it sent).
    """
    status = await s.scalar(select(JobRow.status).where(JobRow.id == job_id).with_for_update())
    return status is not None and JobStatus(status) not in FINAL_STATUSES


def _suspend(s, row: JobRow, reason: str | None, at: datetime) -> None:
    """The job's run suspended itself: it stays running, holding no worker, with the reason its flow last gave."""
    if row.status != JobStatus.RUNNING.value:
        _move(s, row, JobStatus.RUNNING, reason, None, at)
    row.suspended_at = at
    row.status_reason = reason or row.status_reason
    s.add(JobEventRow(job_id=row.id, event="status", created_at=at,
                      data={"status": JobStatus.RUNNING.value, "suspended": True,
                            **({"reason": row.status_reason} if row.status_reason else {})}))  # fmt: skip


def _retry(s, row: JobRow, reason: str | None, at: datetime, allowed: int | None) -> None:
    """Back to pending for the next attempt, on a new flow run; `allowed` retries in all (None: however many)."""
    row.status_reason = (f"retry {row.attempt} of {allowed} after: {reason}" if allowed is not None
                         else f"running again (attempt {row.attempt + 1}) after: {reason}")  # fmt: skip
    row.attempt += 1
    row.status = JobStatus.PENDING.value
    row.flow_run_id = None
    row.queued_at = row.picked_at = row.started_at = None
    s.add(JobEventRow(job_id=row.id, event="status", data={"status": "pending", "reason": row.status_reason},
                      created_at=at))  # fmt: skip


class Store:
    def __init__(self, url: str, bus: EventBus | None = None):
        self.url = url
        self.engine = make_engine(url)
        self.session = make_sessionmaker(self.engine)
        self.bus = bus or EventBus()
        # on PostgreSQL, several kiln API processes may share the index: the others hear of this one's job events
        # (kiln.store.coordination); this one knows its own announcements by this name
        self.shared = is_shared(url)
        self.origin = uuid.uuid4().hex[:12]
        self._project_names: dict[str, str] = {}
        # awaited with (store, job row) after each change of a job's status
        self.transition_listeners: list = []
        # JobType.crash_reruns by type name, for the types that have them (set by the kiln API from its job types)
        self.crash_reruns: dict[str, int] = {}

    async def migrate(self) -> None:
        # kiln API processes started together: one migrates, the others then find the schema current
        async with self._holding(MIGRATE_LOCK):
            await upgrade_async(self.url)

    async def close(self) -> None:
        await self.engine.dispose()

    async def notify(self, job_ids: Iterable[str]) -> None:
        """Wakes the SSE streams of these jobs, whose events were just committed: in this process, and on
        PostgreSQL in every kiln API process sharing the index (a NOTIFY each one LISTENs to)."""
        job_ids = list(job_ids)
        self.bus.notify(job_ids)
        if not self.shared or not job_ids:
            return
        try:
            async with self.engine.connect() as c:
                await c.execute(_NOTIFY, {"channel": CHANNEL, "payloads": list(payloads(self.origin, job_ids))})
                await c.commit()
        except Exception as exc:  # noqa: BLE001 - the events are written; other processes' streams look again soon
            log.warning("could not announce the events of %d job(s) to the other kiln API processes: %s",
                        len(job_ids), exc)  # fmt: skip

    @asynccontextmanager
    async def release_lock(self) -> AsyncIterator[None]:
        """Held while a dispatcher counts free slots and claims jobs into them. Only the leading kiln API dispatches,
        but two could overlap for a moment (a leader cut off from PostgreSQL that has not noticed yet): they take
        turns, each counting the slots the other's claims took, so never more jobs are released than slots."""
        async with self._holding(RELEASE_LOCK):
            yield

    @asynccontextmanager
    async def _holding(self, key: int) -> AsyncIterator[None]:
        """On PostgreSQL, the advisory lock `key` of the job index, held by an open transaction of its own while the
        block runs: released at its end, also when the block is cancelled or its process dies."""
        if not self.shared:
            yield  # SQLite: one API process
            return
        async with self.engine.begin() as c:
            await c.execute(_XACT_LOCK, {"key": key})
            yield

    # projects and keys

    async def create_key(self, project_name: str) -> str:
        """A new API key for the project, creating the project if it is new; the key is shown only now."""
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        async with self.session.begin() as s:
            project = await s.scalar(select(Project).where(Project.name == project_name))
            if project is None:
                project = Project(id=str(uuid.uuid4()), name=project_name)
                s.add(project)
                await s.flush()
            s.add(ApiKey(id=str(uuid.uuid4()), project_id=project.id, key_hash=hash_key(key), prefix=key[:12]))
        return key

    async def revoke_key(self, key_or_prefix: str) -> int:
        """Revokes the key (or every key starting with the prefix); returns how many were revoked."""
        async with self.session.begin() as s:
            if key_or_prefix.startswith(KEY_PREFIX) and len(key_or_prefix) > 20:
                condition = ApiKey.key_hash == hash_key(key_or_prefix)
            else:
                condition = ApiKey.prefix.startswith(key_or_prefix[:12])
            result = await s.execute(
                update(ApiKey).where(condition, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
            )
            return result.rowcount

    async def caller(self, key: str) -> Caller | None:
        """The key's caller, in one read; None for an unknown or revoked key."""
        async with self.session() as s:
            found = (await s.execute(_CALLER, {"key_hash": hash_key(key)})).first()
        return None if found is None else _caller(found)

    async def caller_and_jobs(
        self, key: str, *, type: str, status: JobStatus, limit: int = 50
    ) -> tuple[Caller | None, list[tuple[str, dict[str, Any]]]]:
        """The key's caller and the (id, input) of its project's newest jobs of `type` in `status`, in one read: what
        a request that names a job of its caller's needs before anything else. (None, []) for an unknown or revoked
        key."""
        parameters = {"key_hash": hash_key(key), "type": type, "status": status.value, "limit": limit}
        async with self.session() as s:
            rows = (await s.execute(_CALLER_AND_JOBS, parameters)).all()
        if not rows:
            return None, []
        return _caller(rows[0]), [(row.id, row.input) for row in rows if row.id is not None]

    async def project_for_key(self, key: str) -> str | None:
        caller = await self.caller(key)
        return caller.project_id if caller else None

    async def project_name(self, project_id: str) -> str:
        """The project's name, what users and the Prefect UI's tags call it; names never change, so kept."""
        if project_id not in self._project_names:
            async with self.session() as s:
                name = await s.scalar(select(Project.name).where(Project.id == project_id))
            if name is None:
                raise NotFound(f"project {project_id} not found")
            self._project_names[project_id] = name
        return self._project_names[project_id]

    async def project_id_by_name(self, name: str) -> str | None:
        async with self.session() as s:
            return await s.scalar(select(Project.id).where(Project.name == name))

    # jobs

    async def add_job(
        self,
        *,
        project_id: str,
        type: str,
        input: dict[str, Any],
        resources: dict[str, Any],
        priority: int = 0,
        compute_target: str | None = None,
        parent_id: str | None = None,
        status: JobStatus = JobStatus.PENDING,
        job_id: str | None = None,
        flow_run_id: str | None = None,
        in_parent_run: bool = False,
        held_usd: float = 0.0,
        key_prefix: str | None = None,
        at: datetime | None = None,
    ) -> JobRow:
        """A new job, its first status event logged; `at` is when it came in (for a job recorded after it started,
        as a drop-in LLM call is: when the call started), now by default."""
        now = at or utcnow()
        row = JobRow(
            id=job_id or str(uuid.uuid4()),
            project_id=project_id,
            type=type,
            status=status.value,
            priority=priority,
            input=input,
            output=None,
            resources=resources,
            compute_target=compute_target,
            parent_id=parent_id,
            in_parent_run=in_parent_run,
            flow_run_id=flow_run_id,
            created_at=now,
            queued_at=now if status is not JobStatus.PENDING else None,
            started_at=now if status is JobStatus.RUNNING else None,
            held_usd=held_usd,
            key_prefix=key_prefix,
        )
        async with self.session.begin() as s:
            if parent_id is not None:
                parent = await s.scalar(select(JobRow).where(JobRow.id == parent_id, JobRow.project_id == project_id))
                if parent is None:
                    raise InvalidRequest(f"parent_id: no job {parent_id} in this project")
            s.add(row)
            try:
                await s.flush()
            except IntegrityError as exc:
                if job_id is None:
                    raise
                raise Conflict(f"job {job_id} exists already") from exc
            s.add(JobEventRow(job_id=row.id, event="status", data={"status": status.value}, created_at=now))
        await self.notify([row.id])
        return row

    async def get_job(self, job_id: str, project_id: str | None = None, *, documents: bool = False) -> JobRow:
        """The job (in that project, when given); with its input and output only when `documents`."""
        async with self.session() as s:
            query = select(JobRow).options(*(DOCUMENTS if documents else ())).where(JobRow.id == job_id)
            if project_id is not None:
                query = query.where(JobRow.project_id == project_id)
            row = await s.scalar(query)
        if row is None:
            raise NotFound.job(job_id)
        return row

    async def job_by_flow_run(self, flow_run_id: str) -> JobRow | None:
        async with self.session() as s:
            return await s.scalar(select(JobRow).where(JobRow.flow_run_id == flow_run_id))

    async def list_jobs(
        self,
        project_id: str,
        *,
        type: str | None = None,
        status: JobStatus | None = None,
        parent_id: str | None = None,
        batch_id: str | None = None,
        submitted_via: str | None = None,
        limit: int = 50,
        cursor: int | None = None,
    ) -> tuple[list[JobRow], int | None]:
        """A page of jobs, newest first, and the cursor of the next page (None on the last)."""
        query = select(JobRow).options(*DOCUMENTS).where(JobRow.project_id == project_id)
        if type is not None:
            query = query.where(JobRow.type == type)
        if status is not None:
            query = query.where(JobRow.status == status.value)
        if parent_id is not None:
            query = query.where(JobRow.parent_id == parent_id)
        if batch_id is not None:
            query = query.where(JobRow.batch_id == batch_id)
        if submitted_via is not None:
            query = query.where(JobRow.submitted_via == submitted_via)
        if cursor is not None:
            query = query.where(JobRow.seq < cursor)
        async with self.session() as s:
            rows = list(await s.scalars(query.order_by(JobRow.seq.desc()).limit(limit + 1)))
        next_cursor = rows[limit - 1].seq if len(rows) > limit else None
        return rows[:limit], next_cursor

    async def unfinished_children(self, job_id: str) -> list[JobRow]:
        """Every unfinished descendant of the job, children before grandchildren."""
        found: list[JobRow] = []
        frontier = [job_id]
        async with self.session() as s:
            while frontier:
                rows = list(await s.scalars(select(JobRow).where(JobRow.parent_id.in_(frontier))))
                found.extend(r for r in rows if JobStatus(r.status) not in FINAL_STATUSES)
                frontier = [r.id for r in rows]
        return found

    async def set_priority(self, job_id: str, project_id: str, priority: int) -> JobRow:
        async with self.session.begin() as s:
            query = select(JobRow).options(*DOCUMENTS).where(JobRow.id == job_id, JobRow.project_id == project_id)
            row = await s.scalar(query)
            if row is None:
                raise NotFound.job(job_id)
            if row.status != JobStatus.PENDING.value:
                raise Conflict(f"priority: job {job_id} is {row.status}; only a pending job can change priority")
            row.priority = priority
        return row

    async def update_input(self, job_id: str, changes: dict[str, Any]) -> JobRow:
        """Changes fields of a job's input in place (a deployment scaled live keeps its replicas when it runs again)."""
        async with self.session.begin() as s:
            row = await s.scalar(select(JobRow).options(*DOCUMENTS).where(JobRow.id == job_id))
            if row is None:
                raise NotFound.job(job_id)
            row.input = {**row.input, **changes}
        return row

    async def cancel_pending(self, job_id: str, reason: str) -> bool:
        """Cancels the job if it is still pending (it then never runs); False when it was not pending."""
        now = utcnow()
        async with self.session.begin() as s:
            result = await s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.PENDING.value)
                .values(
                    status=JobStatus.CANCELLED.value,
                    status_reason=reason,
                    completed_at=now,
                    cancel_requested=True,
                )
            )
            if result.rowcount != 1:
                return False
            s.add(JobEventRow(job_id=job_id, event="cancelled", data={"reason": reason}, created_at=now))
        await self.notify([job_id])
        await self._transitioned(await self.get_job(job_id))
        return True

    async def mark_cancel_requested(self, job_ids: Iterable[str]) -> None:
        async with self.session.begin() as s:
            await s.execute(update(JobRow).where(JobRow.id.in_(list(job_ids))).values(cancel_requested=True))

    async def transition(
        self,
        job_id: str,
        status: JobStatus,
        *,
        source: Source = Source.KILN,
        reason: str | None = None,
        output: Any = None,
        at: datetime | None = None,
        flow_run_id: str | None = None,
        crashed: bool = False,
        suspended: bool = False,
        scheduled: bool = False,
        started_at: datetime | None = None,
    ) -> bool:
        """Proposes moving the job to `status`; kiln.store.policy decides, and this carries it out and logs the event.

        `source` says who proposes; for a state of a flow run (Source.PREFECT) `flow_run_id` names the
        run, `crashed` says it crashed rather than failed, `suspended` that it is suspended (Paused) and
        `scheduled` that it waits for a worker (Scheduled); `started_at`, for an end, when the run started if the
        job was never seen running. Returns whether the job changed.
        """
        at = at or utcnow()
        async with self.session.begin() as s:
            row = await s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if row is None:
                return False
            facts = policy.Job(
                status=JobStatus(row.status), flow_run_id=row.flow_run_id, cancel_requested=row.cancel_requested,
                in_parent_run=row.in_parent_run, attempt=row.attempt,
                max_retry_count=int((row.resources or {}).get("max_retry_count") or 0), completed_at=row.completed_at,
                persistent=row.persistent, suspended_at=row.suspended_at,
                crash_reruns=self.crash_reruns.get(row.type, 0),
            )  # fmt: skip
            proposal = policy.Proposal(status, source, flow_run_id, at, crashed, suspended, scheduled)
            decision = policy.decide(facts, proposal)
            if decision.action is policy.Action.IGNORE:
                return False
            if decision.action is policy.Action.CANCEL:
                status = JobStatus.CANCELLED
                reason = "cancelled by request; its run failed meanwhile" + (f": {reason}" if reason else "")
            if row.suspended_at is not None and decision.action is not policy.Action.SUSPEND:
                # the time it waited suspended held no worker: it is not charged as run time
                row.suspended_seconds += max((at - row.suspended_at).total_seconds(), 0.0)
                row.suspended_at = None
            if decision.action is policy.Action.SUSPEND:
                _suspend(s, row, reason, at)
            elif decision.action is policy.Action.RESUME:
                # a worker holds it again from now: the lost-worker watch gives that worker its time to report it
                row.picked_at = at
            elif decision.action is policy.Action.RETRY:
                allowed = None if facts.persistent else facts.max_retry_count + (facts.crash_reruns if crashed else 0)
                _retry(s, row, reason, at, allowed)
            else:
                was_final = facts.status in FINAL_STATUSES
                if decision.action is policy.Action.REOPEN:
                    row.completed_at, row.output, row.cancel_requested = None, None, False
                    reason = "its flow run was started again in Prefect (Retry in the Prefect UI)"
                _move(s, row, status, reason, output, at)
                row.started_at = row.started_at or (started_at if status in FINAL_STATUSES else None)
                if status in FINAL_STATUSES:
                    # a job Prefect overrules (its run completed after kiln ended it) was charged already
                    await record_finish(s, row, status, at, output, charge=not was_final)
                row.flow_run_id = row.flow_run_id or flow_run_id
        await self.notify([job_id])
        await self._transitioned(row)
        return True

    async def _transitioned(self, row: JobRow) -> None:
        for listener in self.transition_listeners:
            try:
                await listener(self, row)
            except Exception:  # noqa: BLE001 - a listener (an event for Prefect automations) never undoes a move
                log.exception("transition listener failed for job %s", row.id)

    async def mark_picked(self, job_id: str, flow_run_id: str, at: datetime) -> None:
        """A worker took the job's flow run (Prefect state Pending)."""
        async with self.session.begin() as s:
            await s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.flow_run_id == flow_run_id, JobRow.picked_at.is_(None))
                .values(picked_at=at)
            )

    async def taken_before(self, before: datetime) -> list[JobRow]:
        """Top-level jobs a worker took (or started) before `before` and that have not ended."""
        async with self.session() as s:
            return list(
                await s.scalars(
                    select(JobRow).where(
                        JobRow.status.in_([s.value for s in IN_FLIGHT_STATUSES]),
                        # when a worker took it: picked_at (a resumed run's is when a worker took it again, while its
                        # started_at is its first start); started_at only for a run whose pick was never seen
                        or_(JobRow.picked_at < before, and_(JobRow.picked_at.is_(None), JobRow.started_at < before)),
                        JobRow.in_parent_run.is_(False),
                        JobRow.flow_run_id.is_not(None),
                        # a suspended run left its worker: no worker is meant to hold it
                        JobRow.suspended_at.is_(None),
                    )
                )
            )

    async def add_progress(self, job_id: str, percent: float, message: str | None) -> bool:
        """Logs a progress event; one that arrives after the job ended is dropped (False), so the end stays last."""
        async with self.session.begin() as s:
            if not await lock_unfinished(s, job_id):
                return False
            s.add(JobEventRow(job_id=job_id, event="progress", data={"percent": percent, "message": message}))
        await self.notify([job_id])
        return True

    async def add_health(self, job_id: str, reason: str, event: str | None, data: dict[str, Any]) -> None:
        """A running job's status_reason, and its health event when one is named; dropped once the job ended."""
        async with self.session.begin() as s:
            row = await s.scalar(select(JobRow).where(JobRow.id == job_id).with_for_update())
            if row is None or JobStatus(row.status) is not JobStatus.RUNNING:
                return
            row.status_reason = reason
            if event is not None:
                s.add(JobEventRow(job_id=job_id, event=event, data={**data, "status_reason": reason}))
        await self.notify([job_id])

    async def add_delta(self, job_id: str, text: str) -> None:
        """Logs a piece of a running job's streamed text (an llm_proxy job's `delta` event)."""
        async with self.session.begin() as s:
            if not await lock_unfinished(s, job_id):
                return
            s.add(JobEventRow(job_id=job_id, event="delta", data={"text": text}))
        await self.notify([job_id])

    async def events_after(self, job_id: str, after: int = 0) -> list[JobEventRow]:
        async with self.session() as s:
            return list(
                await s.scalars(
                    select(JobEventRow)
                    .where(JobEventRow.job_id == job_id, JobEventRow.id > after)
                    .order_by(JobEventRow.id)
                )
            )

    async def unfinished_jobs(self) -> list[JobRow]:
        """Jobs released to Prefect and not final: what the relay keeps in step with Prefect."""
        async with self.session() as s:
            return list(
                await s.scalars(
                    select(JobRow).where(
                        JobRow.status.in_([s.value for s in IN_FLIGHT_STATUSES]), JobRow.flow_run_id.is_not(None)
                    )
                )
            )

    async def failed_since(self, since: datetime) -> list[JobRow]:
        """Top-level jobs that ended failed after `since` through a flow run: what a reconcile compares again."""
        async with self.session() as s:
            return list(
                await s.scalars(
                    select(JobRow).where(JobRow.status == JobStatus.FAILED.value, JobRow.completed_at > since,
                                         JobRow.flow_run_id.is_not(None), JobRow.in_parent_run.is_(False))  # fmt: skip
                )
            )

    # the dispatcher's view

    async def pending_in_order(self, limit: int) -> list[JobRow]:
        """Pending top-level jobs in the order they must run: priority descending, then submission."""
        async with self.session() as s:
            return list(
                await s.scalars(
                    select(JobRow)
                    .where(JobRow.status == JobStatus.PENDING.value, JobRow.in_parent_run.is_(False))
                    .order_by(JobRow.priority.desc(), JobRow.seq)
                    .limit(limit)
                )
            )

    async def claim_for_release(self, job_id: str) -> bool:
        """Marks a pending job queued; only one dispatcher ever wins the claim."""
        async with self.session.begin() as s:
            result = await s.execute(
                update(JobRow)
                .where(JobRow.id == job_id, JobRow.status == JobStatus.PENDING.value)
                .values(status=JobStatus.QUEUED.value, queued_at=utcnow())
            )
            return result.rowcount == 1

    async def claimed_without_run(self) -> list[JobRow]:
        """Queued jobs whose flow run was not recorded (the dispatcher stopped mid-release)."""
        async with self.session() as s:
            return list(
                await s.scalars(
                    select(JobRow).where(
                        JobRow.status == JobStatus.QUEUED.value,
                        JobRow.flow_run_id.is_(None),
                        JobRow.in_parent_run.is_(False),
                    )
                )
            )

    async def record_release(self, job_id: str, flow_run_id: str) -> None:
        async with self.session.begin() as s:
            await s.execute(update(JobRow).where(JobRow.id == job_id).values(flow_run_id=flow_run_id))
            s.add(JobEventRow(job_id=job_id, event="status", data={"status": "queued", "flow_run_id": flow_run_id}))
        await self.notify([job_id])

    async def record_flow_run(self, job_id: str, flow_run_id: str) -> None:
        """Names the flow run that shows an ended job in Prefect (a drop-in LLM call's, made after it)."""
        async with self.session.begin() as s:
            await s.execute(update(JobRow).where(JobRow.id == job_id).values(flow_run_id=flow_run_id))

    async def in_flight_count(self, persistent: bool = False) -> int:
        """Released jobs not ended: those in batch slots, or (`persistent`) in service slots."""
        async with self.session() as s:
            return await s.scalar(
                select(func.count())
                .select_from(JobRow)
                .where(JobRow.status.in_([s.value for s in IN_FLIGHT_STATUSES]), JobRow.in_parent_run.is_(False),
                       JobRow.persistent.is_(persistent),
                       # a suspended job (a lab booking waiting for its results) holds no slot (policy.SuspendedRunHoldsNoSlot)
                       JobRow.suspended_at.is_(None))  # fmt: skip
            )

    async def suspended_count(self) -> int:
        """Jobs whose run is suspended (waiting, holding no worker: lab bookings waiting for their labs)."""
        async with self.session() as s:
            return await s.scalar(select(func.count()).select_from(JobRow).where(JobRow.suspended_at.is_not(None)))

    async def jobs_ahead(self, row: JobRow) -> int:
        """Pending jobs that will be released before this one."""
        async with self.session() as s:
            return await s.scalar(
                select(func.count())
                .select_from(JobRow)
                .where(
                    JobRow.status == JobStatus.PENDING.value,
                    JobRow.in_parent_run.is_(False),
                    or_(
                        JobRow.priority > row.priority,
                        and_(JobRow.priority == row.priority, JobRow.seq < row.seq),
                    ),
                )
            )

    async def with_wait_timeouts(self) -> list[JobRow]:
        """Unfinished jobs with a timeout on being picked up or started; the caller checks which ran out."""
        async with self.session() as s:
            rows = await s.scalars(
                select(JobRow).where(
                    JobRow.status.in_([s.value for s in CANCELLABLE_STATUSES - {JobStatus.RUNNING, JobStatus.MERGING}])
                )
            )
            return [
                r
                for r in rows
                if (r.resources or {}).get("max_timeout_assign_ms") or (r.resources or {}).get("max_timeout_start_ms")
            ]

    # workers

    async def worker_heartbeat(
        self, name: str, instance: str, slots: int, offers: dict, running: list[str], at: datetime,
        service_slots: int = 0,
    ) -> list[str]:
        """Records a heartbeat sent at `at`; returns the runs an earlier instance of a restarted worker left.

        A heartbeat older than the last one recorded is ignored: Prefect may replay recent events to
        a relay that resubscribes, and an old instance's beat must not look like a restart.
        """
        async with self.session.begin() as s:
            row = await s.get(WorkerRow, name)
            if row is None:
                s.add(WorkerRow(name=name, instance=instance, slots=slots, service_slots=service_slots, offers=offers,
                                running=running, last_seen=at))  # fmt: skip
                return []
            if at <= row.last_seen:
                return []
            orphans = [] if row.instance == instance or row.lost else [r for r in row.running if r not in running]
            row.instance, row.slots, row.offers, row.running = instance, slots, offers, running
            row.service_slots = service_slots
            row.last_seen, row.lost = at, False
            return orphans

    async def worker_stopped(self, name: str) -> None:
        async with self.session.begin() as s:
            row = await s.get(WorkerRow, name)
            if row is not None:
                await s.delete(row)

    async def workers(self) -> list[WorkerRow]:
        async with self.session() as s:
            return list(await s.scalars(select(WorkerRow)))

    async def mark_worker_lost(self, name: str) -> None:
        async with self.session.begin() as s:
            await s.execute(update(WorkerRow).where(WorkerRow.name == name).values(lost=True))

    async def capacity(self, lost_after: timedelta, release_ahead: int | None = 0) -> Capacity:
        """What the workers seen within `lost_after` offer; `release_ahead` the bound of jobs released beyond their
        free slots (None: as many as their batch slots)."""
        live = [w for w in await self.workers() if not w.lost and utcnow() - w.last_seen < lost_after]
        slots = sum(w.slots for w in live)
        return Capacity(slots=slots, busy=await self.in_flight_count(), workers=live,
                        service_slots=sum(w.service_slots for w in live),
                        services_busy=await self.in_flight_count(persistent=True),
                        ahead=slots if release_ahead is None else release_ahead)  # fmt: skip
