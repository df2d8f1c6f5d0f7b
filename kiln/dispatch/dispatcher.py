"""The dispatcher: releases pending jobs to Prefect in strict order as worker capacity frees, a bounded number ahead."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.states import Cancelled

from kiln.dispatch.runs import apply_project, cancel_run, create_job_run
from kiln.errors import NotFound
from kiln.registry import job_types
from kiln.schemas.resources import Resources
from kiln.schemas.statuses import JobStatus
from kiln.settings import KilnSettings
from kiln.store.models import JobRow, utcnow
from kiln.store.policy import Source
from kiln.worker.worker import force_state
from kiln.store.store import Capacity, Store

log = logging.getLogger("kiln.dispatcher")

# flow runs created at once; Prefect takes about 0.1 s for each
RELEASE_CONCURRENCY = 8


class Dispatcher:
    def __init__(self, store: Store, client: PrefectClient, settings: KilnSettings):
        self.store = store
        self.client = client
        self.settings = settings
        self.deployments: dict[str, UUID] = {}
        self._wake = asyncio.Event()

    @property
    def lost_after(self) -> timedelta:
        return timedelta(seconds=self.settings.worker_lost_seconds)

    def wake(self) -> None:
        self._wake.set()

    async def capacity(self) -> Capacity:
        """What the live workers offer, with the bound of batch jobs released ahead of their free slots."""
        return await self.store.capacity(self.lost_after, self.settings.release_ahead)

    async def start(self) -> None:
        self.deployments = await apply_project(self.client)

    async def run(self) -> None:
        while True:
            try:
                await self.release_pending_jobs()
                await self.fail_overdue_jobs()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a Prefect outage must not stop the dispatcher
                log.exception("dispatch pass failed; retrying")
                await asyncio.sleep(1)
            try:
                await asyncio.wait_for(self._wake.wait(), self.settings.dispatch_interval_seconds)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def release_pending_jobs(self) -> int:
        """Releases pending jobs, highest priority first: batch jobs into the free worker slots and up to the bound
        (KILN_RELEASE_AHEAD) beyond them, persistent jobs into the free service slots.

        A job released ahead waits as a Scheduled flow run, and a worker takes it the moment one of its slots
        frees, without waiting for kiln to see the end of the job before (Prefect's events lag under load). A job
        of higher priority submitted later waits behind at most the bound's jobs.
        """
        # finish releases a restart interrupted; the idempotency key returns the run made before
        unfinished = await self.store.claimed_without_run()
        chosen: list[JobRow] = []
        async with self.store.release_lock():
            capacity = await self.capacity()
            # batch jobs fill the batch slots and the bound ahead of them, persistent ones the service slots (a
            # service holds its slot until cancelled: one released ahead would wait for hours), each in priority order
            free = {False: capacity.releasable, True: capacity.services_free}
            if any(free.values()):
                candidates = await self.store.pending_in_order(limit=sum(free.values()) + 100)
                for job in candidates:
                    if not any(free.values()):
                        break
                    if free[job.persistent] == 0 or unmet_requirement(job, capacity) is not None:
                        continue
                    if await self.store.claim_for_release(job.id):
                        chosen.append(job)
                        free[job.persistent] -= 1
        jobs = unfinished + chosen
        if not jobs:
            return 0
        limit = asyncio.Semaphore(RELEASE_CONCURRENCY)
        # a worker takes the Scheduled runs of a band in the order of their scheduled times: the runs made together
        # (concurrently, so in no set order) are scheduled in the order they were chosen, a microsecond apart
        at = utcnow()

        async def release(rank: int, job: JobRow) -> None:
            async with limit:
                await self._create_run(job, at + timedelta(microseconds=rank))

        await asyncio.gather(*(release(rank, job) for rank, job in enumerate(jobs)))
        return len(jobs)

    async def _create_run(self, job: JobRow, scheduled_time: datetime) -> None:
        job = await self.store.get_job(job.id, documents=True)  # the choosing left the input unread
        project_name = await self.store.project_name(job.project_id)
        flow_run = await create_job_run(self.client, job, self.deployments[job.type], project_name, scheduled_time)
        await self.store.record_release(job.id, str(flow_run.id))
        try:
            cancelled = (await self.store.get_job(job.id)).cancel_requested
        except NotFound:
            cancelled = True  # deleted (with its batch) while it was being released
        if cancelled:
            # cancelled while it was being released: the run must not start
            await cancel_run(self.client, flow_run.id, "cancelled by request before it started")

    async def cancel(self, job: JobRow, reason: str) -> None:
        """Cancels the job and every unfinished descendant; a pending job never runs.

        Children are cancelled one by one rather than through Prefect's own cascade (Prefect issue 22594).
        """
        descendants = await self.store.unfinished_children(job.id)
        await self.store.mark_cancel_requested([job.id, *(c.id for c in descendants)])
        job_type = job_types().get(job.type)
        if job_type is not None and job_type.on_cancel:
            # the world outside kiln first (a lab's booking), and the reason says whether it heard
            try:
                done = await job_type.cancelled(self.store, job, reason)
            except Exception as exc:  # noqa: BLE001 - the job is cancelled whatever the outside answers
                log.exception("on_cancel of job %s failed", job.id)
                done = f"{type(exc).__name__}: {exc}"
            if done:
                reason = f"{reason}; {done}"
        if not await self.store.cancel_pending(job.id, reason):
            current = await self.store.get_job(job.id)
            # with no flow run yet the release is under way, and _create_run cancels what it creates
            if current.flow_run_id:
                await cancel_run(self.client, current.flow_run_id, reason)
        for child in descendants:
            if child.flow_run_id:
                await force_state(self.client, child.flow_run_id, Cancelled(message=f"its parent job was {reason}"))
            await self.store.transition(child.id, JobStatus.CANCELLED, source=Source.USER,
                                        reason=f"its parent job {job.id} was {reason}")  # fmt: skip
        self.wake()

    async def fail_overdue_jobs(self) -> None:
        """Fails jobs that waited past their assign or start timeout, saying which and why."""
        now = utcnow()
        for job in await self.store.with_wait_timeouts():
            resources = Resources.model_validate(job.resources)
            reason = None
            if resources.max_timeout_assign_ms and job.picked_at is None:
                # from submission, whether the job waited pending or released ahead of the slots (queued): a job
                # released ahead is picked no later than it would have been released and picked otherwise
                if now - job.created_at > timedelta(milliseconds=resources.max_timeout_assign_ms):
                    waited = await waiting_reason(self.store, job, await self.capacity())
                    reason = (
                        f"not picked up by a worker within {resources.max_timeout_assign_ms / 1000:g} s "
                        f"(max_timeout_assign_ms={resources.max_timeout_assign_ms})"
                        + (f"; it was waiting because: {waited}" if waited else "")
                    )
            # from the pick (Pending: a worker took the run into a free slot), never the wait ahead of the slots
            elif resources.max_timeout_start_ms and job.picked_at is not None and job.started_at is None:
                if now - job.picked_at > timedelta(milliseconds=resources.max_timeout_start_ms):
                    reason = (
                        f"picked up by a worker but not started within "
                        f"{resources.max_timeout_start_ms / 1000:g} s (max_timeout_start_ms={resources.max_timeout_start_ms})"
                    )
            if reason is None:
                continue
            await self.store.mark_cancel_requested([job.id])
            if job.flow_run_id:
                await cancel_run(self.client, job.flow_run_id, reason)
            await self.store.transition(job.id, JobStatus.FAILED, reason=reason)


def unmet_requirement(job: JobRow, capacity: Capacity) -> str | None:
    """What no live worker offers this job, as 'gpu_count=1', or None when some worker could run it."""
    if not capacity.workers:
        return "no kiln worker is online"
    if job.compute_target not in (None, "local"):
        # a cluster job's resources size its batch jobs, not the kiln worker; checked at submission
        return None
    resources = Resources.model_validate(job.resources)
    unmet = [resources.unmet_by(w.offers) for w in capacity.workers]
    return None if any(u is None for u in unmet) else unmet[0]


async def waiting_reason(store: Store, job: JobRow, capacity: Capacity) -> str:
    """Why a job no worker has taken yet (pending, or queued) waits, in words a user can act on."""
    unmet = unmet_requirement(job, capacity)
    if unmet == "no kiln worker is online":
        return "no kiln worker is online; start one with `kiln worker start` (or `kiln up`)"
    if unmet is not None:
        return f"no worker offers {unmet}"
    if job.persistent:
        return (
            f"waits for service capacity: {min(capacity.services_busy, capacity.service_slots)} of "
            f"{capacity.service_slots} service slots busy with persistent jobs (a worker hosts "
            "KILN_WORKER_SERVICE_SLOTS of them besides its batch slots)"
        )
    slots = f"{min(capacity.busy, capacity.slots)} of {capacity.slots} worker slots busy"
    if job.status == JobStatus.QUEUED.value:
        return f"released to Prefect, its flow run waits for a worker to take it; {slots}"
    ahead = await store.jobs_ahead(job)
    if capacity.waiting:
        slots += (f" and {capacity.waiting} job{'s' if capacity.waiting != 1 else ''} released to take the next "
                  f"free {'ones' if capacity.waiting != 1 else 'one'}")  # fmt: skip
    return f"{ahead} job{'s' if ahead != 1 else ''} ahead at priority ≥ {job.priority}; {slots}"
