"""The job index's side of lab bookings: each booking, the verified callbacks (kept once), the refused ones (for
audit), and the one outcome a booking ends with.

Exactly one outcome: a lab delivers at least once and in any order, and kiln itself may learn the end by asking the
lab, by a user's cancel or by the deadline. Each verified callback is stored once — the unique constraints on (lab,
webhook-id) and (lab, booking, sequence) refuse a second delivery, also when two arrive at once in two API processes
— and the outcome is set by one conditional UPDATE (`outcome_status IS NULL`), so the first final word wins and
nothing after it changes the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from kiln.schemas.labs import FINAL_CALLBACK_STATUSES, Callback, CallbackStatus
from kiln.schemas.statuses import JobStatus
from kiln.store.models import JobEventRow, JobRow, LabBookingRow, LabCallbackRow, LabRefusalRow, utcnow
from kiln.store.store import lock_unfinished

# what a booking's outcome makes of its job
OUTCOME_STATUSES = ("completed", "failed", "cancelled", "expired")


def hm(value: datetime) -> str:
    return value.strftime("%H:%M")


def waiting_reason(row: LabBookingRow) -> str:
    """The status_reason of a job waiting for its lab: what is booked, where, and until when kiln waits."""
    day = "" if row.slot_start.date() == utcnow().date() else f"{row.slot_start:%Y-%m-%d} "
    return (
        f"booked {row.resource} {day}{hm(row.slot_start)}–{hm(row.slot_end)} UTC at {row.lab} (booking "
        f"{row.booking_id}); waiting for the lab's results, deadline {row.deadline:%Y-%m-%d %H:%M} UTC"
    )


def said(callback: Callback) -> str:
    """A callback in words, as `last_said` keeps it."""
    words = callback.status.value
    if callback.progress is not None and callback.progress.fraction is not None:
        words += f" {callback.progress.fraction:.0%}"
    message = callback.message or (callback.progress.message if callback.progress else None)
    return f"{words}: {message}" if message else words


@dataclass(frozen=True)
class Taken:
    """What a verified callback did: `duplicate` when it was delivered before; `job_id` when its booking is known."""

    duplicate: bool
    job_id: str | None
    effect: str


async def record_booking(store, job_id: str, *, lab: str, booking_id: str, resource: str, start: datetime,
                         end: datetime, deadline: datetime, first_poll: datetime) -> LabBookingRow:
    """Enters the job's booking (a re-run of its flow announces the same one again: kept as it is) and makes the
    job's status_reason say what is booked and until when kiln waits."""
    async with store.session.begin() as s:
        # the job's row locked first, as every writer of its events does (lock_unfinished)
        unfinished = await lock_unfinished(s, job_id)
        row = await s.get(LabBookingRow, job_id)
        if row is None:
            row = LabBookingRow(job_id=job_id, lab=lab, booking_id=booking_id, resource=resource, slot_start=start,
                                slot_end=end, deadline=deadline, next_poll_at=first_poll, created_at=utcnow())
            s.add(row)
            if unfinished:
                s.add(JobEventRow(job_id=job_id, event="booked", data={
                    "lab": lab, "booking": booking_id, "resource": resource, "start": start.isoformat(),
                    "end": end.isoformat(), "deadline": deadline.isoformat()}))  # fmt: skip
        job = await s.scalar(select(JobRow).where(JobRow.id == job_id))
        if unfinished and job.status == JobStatus.RUNNING.value and row.outcome_status is None:
            job.status_reason = waiting_reason(row)
    await store.notify([job_id])
    return row


async def booking_of_job(store, job_id: str) -> LabBookingRow | None:
    async with store.session() as s:
        return await s.get(LabBookingRow, job_id)


async def take_callback(store, lab: str, webhook_id: str, callback: Callback) -> Taken:
    """Stores a verified callback once and applies what it says; a second delivery (same webhook-id, or same
    booking and sequence) is a duplicate and changes nothing."""
    now = utcnow()
    try:
        async with store.session.begin() as s:
            row = LabCallbackRow(lab=lab, webhook_id=webhook_id, booking_id=callback.booking,
                                 sequence=callback.sequence, status=callback.status.value,
                                 body=callback.model_dump(mode="json"), received_at=now)  # fmt: skip
            s.add(row)
            await s.flush()
            booking = await s.scalar(
                select(LabBookingRow).where(LabBookingRow.lab == lab, LabBookingRow.booking_id == callback.booking)
                .with_for_update()
            )  # fmt: skip
            if booking is None:
                # the flow booked it, but its announcement has not reached the index yet: kept, and applied when it
                # does (record_booking → settle_from_callbacks)
                row.effect = "kept: its booking is not yet known to kiln"
                return Taken(False, None, row.effect)
            row.effect = await _apply(s, booking, callback, now)
            job_id = booking.job_id
    except IntegrityError:
        return Taken(True, None, "none: delivered before")
    await store.notify([job_id])
    return Taken(False, job_id, row.effect)


async def _apply(s, booking: LabBookingRow, callback: Callback, now: datetime) -> str:
    """What one verified callback does to its booking and job, inside the transaction that stored it."""
    if booking.outcome_status is not None:
        return f"none: the booking had ended ({booking.outcome_status})"
    if callback.status in FINAL_CALLBACK_STATUSES:
        booking.outcome_status = callback.status.value
        booking.outcome = {"status": callback.status.value, "results": callback.results,
                           "message": callback.message, "source": "callback", "sequence": callback.sequence}
        booking.outcome_at, booking.next_poll_at = now, None
        booking.last_said, booking.last_said_at = said(callback), now
        booking.last_sequence = max(booking.last_sequence, callback.sequence)
        return f"the job's outcome ({callback.status.value})"
    if callback.sequence < booking.last_sequence:
        return f"none: sequence {callback.sequence} arrived after {booking.last_sequence}"
    booking.last_sequence = callback.sequence
    booking.last_said, booking.last_said_at = said(callback), now
    job = await s.scalar(select(JobRow).where(JobRow.id == booking.job_id).with_for_update())
    if job is None or job.status != JobStatus.RUNNING.value:
        return "none: the job is not running"
    if callback.status is CallbackStatus.PROGRESS:
        fraction = callback.progress.fraction if callback.progress else None
        message = (callback.progress.message if callback.progress else None) or callback.message
        percent = 100 * fraction if fraction is not None else None
        s.add(JobEventRow(job_id=job.id, event="progress", data={
            "percent": percent, "message": message, "lab": booking.lab, "booking": booking.booking_id}))  # fmt: skip
        return f"progress {percent:.0f}%" if percent is not None else "progress"
    job.status_reason = (
        f"started at {booking.lab}: {booking.resource} is running it (booking {booking.booking_id})"
        + (f": {callback.message}" if callback.message else "")
        + f"; waiting for the lab's results, deadline {booking.deadline:%Y-%m-%d %H:%M} UTC"
    )
    s.add(JobEventRow(job_id=job.id, event="status", data={"status": "running", "reason": job.status_reason}))
    return "started"


async def settle_from_callbacks(store, job_id: str) -> bool:
    """Applies, in order, the callbacks that came before their booking was known; True when one ended it."""
    async with store.session.begin() as s:
        booking = await s.scalar(select(LabBookingRow).where(LabBookingRow.job_id == job_id).with_for_update())
        if booking is None:
            return False
        early = list(await s.scalars(
            select(LabCallbackRow).where(LabCallbackRow.lab == booking.lab,
                                         LabCallbackRow.booking_id == booking.booking_id,
                                         LabCallbackRow.effect == "kept: its booking is not yet known to kiln")
            .order_by(LabCallbackRow.sequence)
        ))  # fmt: skip
        for row in early:
            row.effect = await _apply(s, booking, Callback.model_validate(row.body), utcnow())
        ended = booking.outcome_status is not None
    if early:
        await store.notify([job_id])
    return ended


async def claim_outcome(store, job_id: str, status: str, *, message: str | None, results: dict | None = None,
                        source: str, said_now: str | None = None) -> bool:
    """Ends the booking with this outcome unless it has one: True when this call's outcome is the one."""
    now = utcnow()
    outcome = {"status": status, "results": results, "message": message, "source": source}
    values: dict[str, Any] = {"outcome_status": status, "outcome": outcome, "outcome_at": now, "next_poll_at": None}
    if said_now is not None:
        values.update(last_said=said_now, last_said_at=now)
    async with store.session.begin() as s:
        result = await s.execute(
            update(LabBookingRow).where(LabBookingRow.job_id == job_id, LabBookingRow.outcome_status.is_(None))
            .values(**values)
        )  # fmt: skip
    return result.rowcount == 1


async def mark_delivered(store, job_id: str, flow_run_id: str) -> None:
    async with store.session.begin() as s:
        await s.execute(update(LabBookingRow).where(LabBookingRow.job_id == job_id).values(delivered_run=flow_run_id))


async def undelivered(store, limit: int = 200) -> list[tuple[LabBookingRow, JobRow]]:
    """Bookings with an outcome whose job's current run has not been handed it, and whose job has not ended."""
    async with store.session() as s:
        rows = await s.execute(
            select(LabBookingRow, JobRow).join(JobRow, JobRow.id == LabBookingRow.job_id)
            .where(LabBookingRow.outcome_status.is_not(None), JobRow.flow_run_id.is_not(None),
                   JobRow.status.in_([JobStatus.RUNNING.value, JobStatus.QUEUED.value]),
                   or_(LabBookingRow.delivered_run.is_(None), LabBookingRow.delivered_run != JobRow.flow_run_id))
            .limit(limit)
        )  # fmt: skip
        return [(booking, job) for booking, job in rows]


async def due(store, now: datetime, limit: int = 100) -> list[LabBookingRow]:
    """Bookings with no outcome whose next ask of the lab is due, or whose deadline has passed, of unfinished jobs."""
    async with store.session() as s:
        return list(await s.scalars(
            select(LabBookingRow).join(JobRow, JobRow.id == LabBookingRow.job_id)
            .where(LabBookingRow.outcome_status.is_(None),
                   or_(LabBookingRow.next_poll_at <= now, LabBookingRow.deadline <= now),
                   JobRow.status.not_in([s.value for s in (JobStatus.COMPLETED, JobStatus.FAILED,
                                                           JobStatus.CANCELLED)]))
            .order_by(LabBookingRow.next_poll_at).limit(limit)
        ))  # fmt: skip


async def claim_poll(store, row: LabBookingRow, next_at: datetime) -> bool:
    """Takes this ask of the lab for this process: one API process asks, however many run (the index decides)."""
    async with store.session.begin() as s:
        result = await s.execute(
            update(LabBookingRow)
            .where(LabBookingRow.job_id == row.job_id, LabBookingRow.outcome_status.is_(None),
                   LabBookingRow.polls == row.polls)
            .values(next_poll_at=next_at, polls=row.polls + 1)
        )  # fmt: skip
    return result.rowcount == 1


async def record_said(store, job_id: str, words: str) -> None:
    """What the lab answered when asked, kept as the last thing it said (the deadline's reason names it)."""
    async with store.session.begin() as s:
        await s.execute(update(LabBookingRow).where(LabBookingRow.job_id == job_id, LabBookingRow.outcome_status.is_(None))
                        .values(last_said=words, last_said_at=utcnow()))  # fmt: skip


async def record_refusal(store, lab: str, *, webhook_id: str | None, reason: str, message: str, client: str | None,
                         body_sha256: str, body_bytes: int) -> None:
    async with store.session.begin() as s:
        s.add(LabRefusalRow(lab=lab, webhook_id=webhook_id[:200] if webhook_id else None, reason=reason,
                            message=message, client=client, body_sha256=body_sha256, body_bytes=body_bytes,
                            received_at=utcnow()))  # fmt: skip


async def callbacks(store, lab: str, limit: int = 100) -> tuple[list[LabCallbackRow], list[LabRefusalRow]]:
    """The lab's newest taken callbacks and refusals."""
    async with store.session() as s:
        taken = list(await s.scalars(select(LabCallbackRow).where(LabCallbackRow.lab == lab)
                                     .order_by(LabCallbackRow.id.desc()).limit(limit)))  # fmt: skip
        refused = list(await s.scalars(select(LabRefusalRow).where(LabRefusalRow.lab == lab)
                                       .order_by(LabRefusalRow.id.desc()).limit(limit)))  # fmt: skip
    return taken, refused


def next_poll(row: LabBookingRow, now: datetime, first_s: float, max_s: float) -> datetime:
    """When to ask the lab next: from the slot's end, waiting twice as long each time, never past the deadline."""
    wait = min(first_s * (2 ** row.polls), max_s)
    return min(max(now, row.slot_end) + timedelta(seconds=wait), row.deadline)


