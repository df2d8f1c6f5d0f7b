"""The event relay: keeps the job index's status mirror and event log in step with Prefect's events."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType
from prefect.events.clients import get_events_subscriber
from prefect.events.filters import EventFilter, EventNameFilter
from prefect.events.schemas.events import ReceivedEvent
from prefect.states import Failed
from sqlalchemy.exc import IntegrityError

from kiln.dispatch.dispatcher import Dispatcher
from kiln.dispatch.labs import LabWatch
from kiln.dispatch.runs import (
    cancel_run,
    crash_run,
    job_of_tags,
    reason_of_state,
    failed_run_output,
    run_output,
    status_of_state,
)
from kiln.errors import Conflict, KilnError
from kiln.events.job_events import JOB_STATUS_EVENTS
from kiln.runtime import DELTA_EVENT, HEALTH_EVENT, PROGRESS_EVENT
from kiln.schemas.batches import Hardware
from kiln.schemas.statuses import JobStatus
from kiln.settings import KilnSettings
from kiln.store import labs
from kiln.store.job_tasks import record_task_progress
from kiln.tasks.lab.booking import BOOKED_EVENT
from kiln.store.models import utcnow
from kiln.store.policy import Source
from kiln.store.store import Store
from kiln.submission import accept_batch
from kiln.worker.worker import HEARTBEAT_EVENT, STOPPED_EVENT, force_state

log = logging.getLogger("kiln.relay")

FLOW_RUN_PREFIX = "prefect.flow-run."
BATCH_RUN = "batch_run"
# the watch's rounds between two re-reads of suspended jobs' runs
SUSPENDED_EVERY = 12
# after a restart, jobs that ended failed this recently are compared with their runs too: one whose run completed
# after all (a worker taken as lost that was only slow) is mended to completed with its output
RECENT_ENDS = timedelta(hours=1)
# flow runs read from Prefect in one request
READ_CHUNK = 200


class Relay:
    def __init__(self, store: Store, client: PrefectClient, dispatcher: Dispatcher, settings: KilnSettings,
                 labs: LabWatch | None = None):
        self.store = store
        self.client = client
        self.dispatcher = dispatcher
        self.settings = settings
        self.labs = labs
        self._rounds = 0
        self.connected = asyncio.Event()
        # since when this relay has followed Prefect's events live (caught up): only silence heard since counts
        self.following_since: datetime | None = None
        # flow run id → the lock its states are applied under: its event, the relay's reconcile and its worker's word
        # (POST …/ended) may come together, and on SQLite two transitions would both see the job unfinished
        self._applying: dict[str, tuple[asyncio.Lock, int]] = {}

    async def run(self) -> None:
        """Follows Prefect's event stream for ever, resubscribing and catching up after every outage."""
        # kiln's own job events go out for Prefect automations; the relay made them and does not read them back
        event_filter = EventFilter(
            event=EventNameFilter(prefix=[FLOW_RUN_PREFIX, "kiln."], exclude_name=JOB_STATUS_EVENTS)
        )
        while True:
            try:
                async with get_events_subscriber(filter=event_filter, reconnection_attempts=2) as subscriber:
                    self.connected.set()
                    await self.reconcile()
                    self.following_since = utcnow()
                    async for event in subscriber:
                        try:
                            await self.handle(event)
                        except Exception:  # noqa: BLE001 - one bad event must not stop the relay
                            log.exception("could not relay event %s %s", event.event, event.resource.id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Prefect restarted; resubscribe (Prefect issue 22450)
                log.warning("Prefect event stream lost (%s); resubscribing", exc)
                await asyncio.sleep(1)
            finally:
                # also when this kiln API stops leading (cancelled)
                self.connected.clear()
                self.following_since = None

    async def watch(self) -> None:
        """Periodic safety net: lost workers, and runs whose events were missed."""
        while True:
            await asyncio.sleep(min(self.settings.worker_lost_seconds / 4, self.settings.reconcile_interval_seconds))
            try:
                await self.crash_runs_of_lost_workers()
                await self.reconcile(only_stale=True)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - Prefect may be down; next round
                log.warning("relay watch round failed: %s", exc)

    async def handle(self, event: ReceivedEvent) -> None:
        name = event.event
        if name.startswith(FLOW_RUN_PREFIX):
            state_type = event.resource.get("prefect.state-type")
            if state_type:
                tags = [r.id.removeprefix("prefect.tag.") for r in event.related if r.role == "tag"]
                await self.apply_state(
                    flow_run_id=event.resource.id.removeprefix(FLOW_RUN_PREFIX),
                    state_type=state_type,
                    state_name=event.resource.get("prefect.state-name"),
                    message=event.resource.get("prefect.state-message") or None,
                    tags=tags,
                    at=event.occurred,
                )
        elif name == PROGRESS_EVENT:
            job_id = event.resource.id.removeprefix("kiln.job.")
            if event.payload.get("tasks") is not None:
                # a split job: its tasks' table and the SSE progress event, with the tasks in it
                await record_task_progress(self.store, job_id, event.payload)
            else:
                await self.store.add_progress(job_id, event.payload.get("percent", 0), event.payload.get("message"))
        elif name == HEALTH_EVENT:
            payload = event.payload
            await self.store.add_health(event.resource.id.removeprefix("kiln.job."), str(payload.get("reason", "")),
                                        payload.get("event"), payload.get("data") or {})  # fmt: skip
        elif name == DELTA_EVENT:
            await self.store.add_delta(event.resource.id.removeprefix("kiln.job."), str(event.payload.get("text", "")))
        elif name == BOOKED_EVENT:
            await self._record_booking(event.resource.id.removeprefix("kiln.job."), event.payload)
        elif name == HEARTBEAT_EVENT:
            payload = event.payload
            worker = event.resource.id.removeprefix("kiln.worker.")
            orphans = await self.store.worker_heartbeat(
                worker, payload["instance"], payload["slots"], payload["offers"], payload["running"], event.occurred,
                payload.get("service_slots", 0),
            )
            if orphans:
                await self.crash_runs(orphans, f"the kiln worker {worker!r} restarted while running this job")
            self.dispatcher.wake()
        elif name == STOPPED_EVENT:
            await self.store.worker_stopped(event.resource.id.removeprefix("kiln.worker."))

    async def _record_booking(self, job_id: str, payload: dict) -> None:
        """A lab_booking job booked its slot: the job index keeps the booking (its callbacks find the job by it),
        and a callback that came first is applied now."""
        start, end = datetime.fromisoformat(payload["start"]), datetime.fromisoformat(payload["end"])
        deadline = datetime.fromisoformat(payload["deadline"])
        first_poll = min(end + timedelta(seconds=self.settings.lab_poll_first_seconds), deadline)
        await labs.record_booking(self.store, job_id, lab=payload["lab"], booking_id=payload["booking"],
                                  resource=payload["resource"], start=start, end=end, deadline=deadline,
                                  first_poll=first_poll)  # fmt: skip
        if await labs.settle_from_callbacks(self.store, job_id) and self.labs is not None:
            self.labs.wake()

    async def mirror_ended(self, flow_run_id: str) -> bool:
        """Mirrors the flow run's state if it has ended in Prefect (or is suspended, left its worker); whether it had."""
        flow_run = await self.client.read_flow_run(UUID(flow_run_id))
        if flow_run.state is None or not (flow_run.state.is_final() or flow_run.state.is_paused()):
            return False
        await self.apply_run(flow_run)
        return True

    async def apply_run(self, flow_run) -> None:
        """Mirrors the flow run's current state, as read from Prefect, onto its job."""
        if flow_run.state is not None:
            await self.apply_state(flow_run_id=str(flow_run.id), state_type=flow_run.state.type.value,
                                   state_name=flow_run.state.name, message=flow_run.state.message,
                                   tags=flow_run.tags, at=flow_run.state.timestamp, flow_run=flow_run)  # fmt: skip

    async def apply_state(
        self, *, flow_run_id: str, state_type: str, message: str | None, tags, at, state_name: str | None = None,
        flow_run=None,
    ) -> None:
        """Mirrors one Prefect state of a flow run onto its job, one state of a run at a time. `flow_run`: the run as
        just read from Prefect, if it was (its output and start time are then not read again)."""
        lock, users = self._applying.get(flow_run_id, (asyncio.Lock(), 0))
        self._applying[flow_run_id] = (lock, users + 1)
        try:
            async with lock:
                await self._apply_state(flow_run_id=flow_run_id, state_type=state_type, message=message, tags=tags,
                                        at=at, state_name=state_name, flow_run=flow_run)  # fmt: skip
        finally:
            lock, users = self._applying[flow_run_id]
            if users == 1:
                del self._applying[flow_run_id]
            else:
                self._applying[flow_run_id] = (lock, users - 1)

    async def _apply_state(
        self, *, flow_run_id: str, state_type: str, message: str | None, tags, at, state_name: str | None = None,
        flow_run=None,
    ) -> None:
        if state_type == StateType.CANCELLING.value:
            # cancelled from Prefect (its UI or API) rather than through kiln: a cancel the user asked for, so
            # the failure the run may report on its way down does not end the job failed (policy.CancelRequestedWins)
            job = await self.store.job_by_flow_run(flow_run_id)
            if job is not None:
                await self.store.mark_cancel_requested([job.id])
            return
        status = status_of_state(state_type, state_name)
        if status is None:
            return
        job = await self.store.job_by_flow_run(flow_run_id)
        if job is None:
            job = await self._adopt_child(flow_run_id, tags) or await self._adopt_scheduled(
                flow_run_id, state_type, tags
            )
            if job is None:
                return
        if state_type == StateType.PENDING.value:
            await self.store.mark_picked(job.id, flow_run_id, at)
        if status is JobStatus.COMPLETED and job.status == JobStatus.COMPLETED.value:
            return  # its output is recorded (a drop-in LLM call's run is made after the call, completed)

        async def read_run():  # once, for its output or start time, unless the caller read it
            nonlocal flow_run
            if flow_run is None:
                flow_run = await self.client.read_flow_run(UUID(flow_run_id))
            return flow_run

        if status is JobStatus.COMPLETED:
            output, refused = await run_output(await read_run()), None
            if job.type == BATCH_RUN and not JobStatus(job.status).is_final:
                output, refused = await self._submit_batch_run(job, output)
            if refused is not None:  # the job failed after all, and its Prefect run says so too
                await force_state(self.client, flow_run_id, Failed(message=refused))
                await self.store.transition(job.id, JobStatus.FAILED, reason=refused, at=at)
                self.dispatcher.wake()
                return
        elif status is JobStatus.FAILED and state_type == StateType.FAILED.value:
            output = await failed_run_output(await read_run())
        else:
            output = None
        started_at = None
        if status.is_final and job.started_at is None and state_type != StateType.CANCELLED.value:
            # the event of its Running state may come after that of its end (Prefect's event stream is not in order
            # under load), and is then ignored: the run's own start time (None for a run that never started)
            started_at = (await read_run()).start_time
        await self.store.transition(job.id, status, source=Source.PREFECT, reason=reason_of_state(state_type, message),
                                    output=output, at=at, flow_run_id=flow_run_id,
                                    crashed=state_type == StateType.CRASHED.value,
                                    suspended=state_type == StateType.PAUSED.value,
                                    scheduled=state_type == StateType.SCHEDULED.value,
                                    started_at=started_at)  # fmt: skip
        if status.is_final and not job.in_parent_run:
            self.dispatcher.wake()
        if state_type == StateType.PAUSED.value and self.labs is not None:
            # a run suspended itself: an outcome that came before it did can be handed to it now
            self.labs.wake()

    async def _adopt_child(self, flow_run_id: str, tags):
        """A subflow run of a kiln job is a child job: enter it in the index under its parent."""
        parent_id = next((t[7:] for t in tags if t.startswith("parent:")), None)
        if parent_id is None:
            return None
        job_id = job_of_tags([t for t in tags if t != f"job:{parent_id}"])
        if job_id is None:
            return None
        try:
            return await self.store.get_job(job_id)
        except Exception:  # noqa: BLE001 - not there yet; create it below
            pass
        parent = await self.store.get_job(parent_id)
        flow_run = await self.client.read_flow_run(UUID(flow_run_id))
        job_type = next((t[5:] for t in tags if t.startswith("type:")), flow_run.name)
        try:
            return await self.store.add_job(
                job_id=job_id,
                project_id=parent.project_id,
                type=job_type,
                input=flow_run.parameters.get("input") or {},
                # a child that runs on a cluster (hpc_submit under a simulation) says which
                resources=flow_run.parameters.get("resources") or {},
                compute_target=flow_run.parameters.get("compute_target"),
                parent_id=parent_id,
                status=JobStatus.QUEUED,
                flow_run_id=flow_run_id,
                in_parent_run=True,
            )
        except Exception:  # noqa: BLE001 - two events raced to adopt it
            return await self.store.get_job(job_id)

    async def _adopt_scheduled(self, flow_run_id: str, state_type: str, tags):
        """A run Prefect made from an operator's deployment (a cron schedule in prefect.yaml) is a job of its
        own, in the project its `project:NAME` tag names, from the moment a worker takes it.

        Its job id is the flow run's id.
        """
        project = next((t[8:] for t in tags if t.startswith("project:")), None)
        if state_type == StateType.SCHEDULED.value or "kiln" not in tags or job_of_tags(tags) or project is None:
            return None
        flow_run = await self.client.read_flow_run(UUID(flow_run_id))
        if flow_run.deployment_id is None or flow_run.parent_task_run_id is not None:
            return None
        project_id = await self.store.project_id_by_name(project)
        if project_id is None:
            # stopped through its worker like any cancel; its own Cancelled event comes back here, and ends it
            await cancel_run(self.client, flow_run_id,
                             f"its deployment's tag project:{project} names no kiln project; create the project "
                             f"(`kiln keys create --project {project}`) or change the tag in prefect.yaml")  # fmt: skip
            return None
        job_type = next((t[5:] for t in tags if t.startswith("type:")), flow_run.name)
        try:
            return await self.store.add_job(
                job_id=flow_run_id, project_id=project_id, type=job_type, input=flow_run.parameters.get("input") or {},
                resources={},
                status=JobStatus.QUEUED, flow_run_id=flow_run_id,
            )  # fmt: skip
        except Conflict:  # two events raced to adopt it
            return await self.store.get_job(flow_run_id)

    async def _submit_batch_run(self, job, read: dict) -> tuple[Any, str | None]:
        """A batch_run's flow read the batch; kiln submits it as the job's children. (output, None), or
        (None, why) when the batch was refused whole.

        The batch's id is the job's, so a completion seen twice (event and reconcile) submits it once.
        """
        hardware = Hardware.model_validate(read["hardware"]) if read.get("hardware") else None
        unreadable = {int(index): why for index, why in read.get("unreadable", {}).items()}
        try:
            result = await accept_batch(self, job.project_id, read["entries"], hardware, unreadable=unreadable,
                                        parent_id=job.id, batch_id=job.id)  # fmt: skip
        except (Conflict, IntegrityError):  # submitted already, by the first sight of this completion
            return {"source": read["source"], "batch_id": job.id}, None
        except KilnError as exc:  # the budget cannot cover it: nothing was submitted
            return None, f"the batch read from {read['source']} was not submitted: {exc.message}"
        output = result.model_dump(mode="json")
        for line, origin in zip(output["jobs"], read.get("origins", ())):
            line["from"] = origin
        return {"source": read["source"], **output}, None

    async def reconcile(self, only_stale: bool = False) -> None:
        """Re-reads unfinished jobs' flow runs from Prefect, applying any state whose event was missed; and, after a
        restart (not `only_stale`), those of jobs ended failed in the last RECENT_ENDS, mending any whose run
        completed. Each repair is logged."""
        stale_before = utcnow() - timedelta(seconds=self.settings.reconcile_interval_seconds)
        self._rounds += 1
        # suspended jobs (lab bookings waiting for days, thousands of them) are re-read one round in SUSPENDED_EVERY:
        # their run changes only when kiln itself resumes or cancels it
        suspended_too = not only_stale or self._rounds % SUSPENDED_EVERY == 0
        jobs = [job for job in await self.store.unfinished_jobs()
                if not (only_stale and (job.started_at or job.queued_at or job.created_at) > stale_before)
                and (job.suspended_at is None or suspended_too)]  # fmt: skip
        if not only_stale:
            jobs += await self.store.failed_since(utcnow() - RECENT_ENDS)
        for start in range(0, len(jobs), READ_CHUNK):
            chunk = {job.flow_run_id: job for job in jobs[start:start + READ_CHUNK]}
            runs = await self.client.read_flow_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[UUID(i) for i in chunk])), limit=len(chunk)
            )
            for flow_run in runs:
                if flow_run.state is None:
                    continue
                job = chunk[str(flow_run.id)]
                mirrored = status_of_state(flow_run.state.type.value, flow_run.state.name)
                if mirrored is not None and mirrored.is_final and mirrored.value != job.status:
                    log.info("reconcile: job %s is %s in the index, its flow run %s is %s: applying it", job.id,
                             job.status, flow_run.id, flow_run.state.type.value)  # fmt: skip
                await self.apply_run(flow_run)

    async def crash_runs_of_lost_workers(self) -> None:
        """Jobs no live worker holds crash with a reason, and retry per policy.

        A worker silent past `worker_lost_seconds` is gone. Its runs, and any run taken by a worker
        that died before reporting it, are then held by no live worker.
        """
        now = utcnow()
        lost_after = timedelta(seconds=self.settings.worker_lost_seconds)
        if self.following_since is None or now - self.following_since < lost_after:
            # heartbeats sent while this relay did not follow (this kiln API starting, or taking the lead from
            # another, or Prefect restarting) were not recorded: a worker is silent only after a full period heard
            return
        for worker in await self.store.workers():
            if not worker.lost and now - worker.last_seen >= lost_after:
                await self.store.mark_worker_lost(worker.name)
                log.warning("kiln worker %s is lost (last heartbeat %s)", worker.name, worker.last_seen)
        held = {run for w in await self.store.workers() if not w.lost for run in w.running}
        orphans = [job.flow_run_id for job in await self.store.taken_before(now - lost_after) if job.flow_run_id not in held]
        if orphans:
            await self.crash_runs(
                orphans, "the kiln worker running this job stopped responding (it was killed, or its machine went down)"
            )
            self.dispatcher.wake()

    async def crash_runs(self, flow_run_ids: list[str], reason: str) -> None:
        for flow_run_id in flow_run_ids:
            if await crash_run(self.client, flow_run_id, reason):
                log.warning("crashed flow run %s: %s", flow_run_id, reason)
                await self.apply_state(
                    flow_run_id=flow_run_id, state_type=StateType.CRASHED.value, message=reason, tags=[], at=utcnow()
                )
