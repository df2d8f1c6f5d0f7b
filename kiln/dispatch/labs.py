"""The lab watch, beside the dispatcher in the API process: hands each lab booking's one outcome to its suspended
flow run, asks silent labs for their results, and ends bookings past their deadline. It holds no worker.

Several API processes may run it at once: the job index decides who does what (an ask of a lab is claimed with a
conditional UPDATE; an outcome is settled once, kiln.store.labs.claim_outcome), and resuming a run twice is refused
by Prefect (the second finds it no longer paused).
"""

from __future__ import annotations

import asyncio
import logging
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.exceptions import ObjectNotFound

from kiln.schemas.labs import FINAL_BOOKING_STATUSES
from kiln.settings import KilnSettings
from kiln.store import labs as booked
from kiln.store.models import JobRow, LabBookingRow, utcnow
from kiln.store.store import Store

log = logging.getLogger("kiln.labs")

# the key of the suspension that waits for the outcome (flows/lab_booking.py OUTCOME_KEY; not imported, so the API
# does not import the flow)
OUTCOME_KEY = "outcome"
APPROVAL_KEY = "approval"
# longest the watch sleeps when nothing wakes it
ROUND_SECONDS = 1.0
# Prefect's suspend_flow_run proposes Paused before it saves the schema of the input the run waits for: a resume in
# between is refused with this reason
SCHEMA_NOT_SAVED = "Run input schema not found"


async def resume_with_input(flow_run_id: str, run_input: dict, within: float = 10.0) -> None:
    """Resumes a suspended run with the input it waits for, waiting out the moment after it is Paused and before
    its input's schema is saved; raises what Prefect raises otherwise (not paused, resumed already)."""
    from prefect.flow_runs import aresume_flow_run

    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            await aresume_flow_run(UUID(flow_run_id), run_input=run_input)
            return
        except RuntimeError as exc:
            if SCHEMA_NOT_SAVED not in str(exc) or asyncio.get_running_loop().time() > deadline:
                raise
        await asyncio.sleep(0.2)


class LabWatch:
    def __init__(self, store: Store, client: PrefectClient, settings: KilnSettings):
        self.store = store
        self.client = client
        self.settings = settings
        self._wake = asyncio.Event()

    def wake(self) -> None:
        self._wake.set()

    async def run(self) -> None:
        while True:
            try:
                await self.deliver_settled()
                await self.ask_due()
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - Prefect or a lab down: next round
                log.exception("lab watch round failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), ROUND_SECONDS)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    # handing the outcome to the run

    async def deliver(self, job_id: str) -> bool:
        """Resumes the job's suspended run with its booking's outcome; False while the run is not (yet) waiting for
        it (still booking, or being resumed already)."""
        booking = await booked.booking_of_job(self.store, job_id)
        job = await self.store.get_job(job_id)
        if booking is None or booking.outcome is None or job.flow_run_id is None:
            return False
        return await self._resume(booking, job)

    async def _resume(self, booking: LabBookingRow, job: JobRow) -> bool:
        from prefect.client.schemas.objects import StateType

        try:
            flow_run = await self.client.read_flow_run(UUID(job.flow_run_id))
        except ObjectNotFound:
            return False
        if (booking.outcome or {}).get("source") == "user":
            return False  # cancelled through kiln: the job ends by its cancel, not by the flow
        state = flow_run.state
        if state is None or state.type is not StateType.PAUSED or state.state_details.pause_key != OUTCOME_KEY:
            if state is not None and state.is_final():
                await booked.mark_delivered(self.store, job.id, job.flow_run_id)
            return False
        try:
            # exactly the fields of the flow's LabOutcome: Prefect checks the input against its schema
            outcome = {key: booking.outcome.get(key) for key in ("status", "results", "message", "source")}
            await resume_with_input(job.flow_run_id, outcome)
        except Exception as exc:  # noqa: BLE001 - resumed meanwhile (another API process), or Prefect down
            log.warning("could not resume the run of job %s: %s", job.id, exc)
            return False
        await booked.mark_delivered(self.store, job.id, job.flow_run_id)
        return True

    async def deliver_settled(self) -> None:
        for booking, job in await booked.undelivered(self.store):
            await self._resume(booking, job)

    # asking the lab, and the deadline

    async def ask_due(self) -> None:
        now = utcnow()
        due = await booked.due(self.store, now)
        if due:
            await asyncio.gather(*(self._ask(row, now) for row in due))

    async def _ask(self, row: LabBookingRow, now) -> None:
        if row.deadline <= now:
            await self._expire(row)
            return
        following = booked.next_poll(row, now, self.settings.lab_poll_first_seconds, self.settings.lab_poll_max_seconds)
        if not await booked.claim_poll(self.store, row, following):
            return  # another API process asks this time
        from kiln.blocks.lab import load_lab
        from kiln.tasks.lab.client import LabAnswer, LabClient

        lab = await load_lab(row.lab)
        if lab is None:
            await booked.record_said(self.store, row.job_id, f"(kiln could not ask: the lab {row.lab!r} is no longer "
                                     "registered)")  # fmt: skip
            return
        try:
            async with LabClient.of(row.lab, lab, self.settings.lab_timeout_seconds) as client:
                found = await client.booking(row.booking_id)
        except LabAnswer as answer:
            await booked.record_said(self.store, row.job_id, f"(asked at {now:%H:%M:%S} UTC, the lab answered: "
                                     f"{answer.message})")  # fmt: skip
            return
        words = f"{found.status.value}" + (f": {found.message}" if found.message else "") + " (when kiln asked)"
        if found.status in FINAL_BOOKING_STATUSES:
            if await booked.claim_outcome(self.store, row.job_id, found.status.value, message=found.message,
                                          results=found.results, source="poll", said_now=words):  # fmt: skip
                log.info("booking %s at %s ended %s, learnt by asking the lab", row.booking_id, row.lab,
                         found.status.value)  # fmt: skip
                await self.deliver(row.job_id)
        else:
            await booked.record_said(self.store, row.job_id, words)

    async def _expire(self, row: LabBookingRow) -> None:
        last = f"the lab last said: {row.last_said}" if row.last_said else "the lab never said anything of it"
        message = (
            f"no result from {row.lab} for booking {row.booking_id} ({row.resource} "
            f"{booked.hm(row.slot_start)}–{booked.hm(row.slot_end)} UTC) by the deadline "
            f"{row.deadline:%Y-%m-%d %H:%M:%S} UTC, by callback or when asked ({row.polls} time"
            f"{'s' if row.polls != 1 else ''}); {last}"
        )
        if await booked.claim_outcome(self.store, row.job_id, "expired", message=message, source="deadline"):
            await self.deliver(row.job_id)


async def cancel_booking(store: Store, job: JobRow, reason: str) -> str | None:
    """A lab_booking job is being cancelled (JobType.on_cancel): its booking ends here, so no later callback changes
    the job, and the lab gets DELETE /bookings/{id}. Returns what happened at the lab, for the job's reason."""
    booking = await booked.booking_of_job(store, job.id)
    if booking is None:
        return None  # nothing booked (awaiting approval, or still finding a slot)
    if not await booked.claim_outcome(store, job.id, "cancelled", message=reason, source="user"):
        return f"its booking {booking.booking_id} at {booking.lab} had already ended ({booking.outcome_status})"
    from kiln.blocks.lab import load_lab
    from kiln.settings import get_settings
    from kiln.tasks.lab.client import LabAnswer, LabClient

    lab = await load_lab(booking.lab)
    if lab is None:
        return f"booking {booking.booking_id} not cancelled at the lab: {booking.lab!r} is no longer registered"
    try:
        async with LabClient.of(booking.lab, lab, get_settings().lab_timeout_seconds) as client:
            await client.cancel(booking.booking_id)
    except LabAnswer as answer:
        if answer.code == "already_final":
            return f"the lab {booking.lab} had already ended booking {booking.booking_id}: {answer.message}"
        return (f"the lab {booking.lab} did not confirm the cancel of booking {booking.booking_id} ({answer.message}); "
                "it may still run it")  # fmt: skip
    return f"the lab {booking.lab} cancelled booking {booking.booking_id}"
