"""Finding a free slot and booking it, once per job: lab_booking's executor."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from prefect import task

from kiln.schemas.lab_booking import LabBookingInput
from kiln.schemas.labs import BookingRequest, Slot
from kiln.tasks.lab.client import LabAnswer, LabClient

# windows tried when each one is taken between the lab listing it and kiln booking it (a race with another client)
MAX_SLOT_TRIES = 20
# the event that tells the kiln API what a job booked (kiln.events.relay enters it in the job index)
BOOKED_EVENT = "kiln.lab.booked"


class NoSlot(Exception):
    """No free window of the resource, long enough, is left between the job's earliest and its latest (or deadline)."""


def idempotency_key(job_id: str) -> str:
    """The key every POST /bookings of the job carries: the lab books once per job, whatever kiln retries."""
    return f"kiln-{job_id}"


def _utc(value: datetime) -> str:
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def _overlaps(slot: Slot, start: datetime, end: datetime) -> bool:
    return slot.start < end and start < slot.end


def _booking_key(context, parameters: dict[str, Any]) -> str:
    return f"kiln-lab-booking-{parameters['job_id']}"


@task(name="book a slot", cache_key_fn=_booking_key, persist_result=True, result_serializer="json")
async def book_slot(input: LabBookingInput, job_id: str, callback_url: str, timeout: float = 10.0) -> dict:
    """Books the earliest free window of `input.duration_minutes` on the resource, and returns the booking.

    Its result is cached under the job's id in the results block: when a resume re-runs the flow from its start
    (Prefect re-runs a suspended flow), or a retry runs it again, this answers the booking made before and sends
    nothing. Under the cache the lab's Idempotency-Key holds too: the same key books once, and a second request with
    it answers (or, for another window, names) the booking it made.
    """
    from kiln.blocks.lab import load_lab

    lab = await load_lab(input.lab)
    if lab is None:
        raise NoSlot(f"the lab {input.lab!r} is no longer registered (`kiln labs list`)")
    now = datetime.now(timezone.utc)
    deadline = now + timedelta(hours=input.deadline_hours)
    start, latest = input.window(now)
    end = min(latest, deadline) if latest is not None else deadline
    duration = timedelta(minutes=input.duration_minutes)
    taken: list[tuple[datetime, datetime]] = []
    async with LabClient.of(input.lab, lab, timeout) as client:
        for _ in range(MAX_SLOT_TRIES):
            listed = await client.slots(input.resource, start, end, min_minutes=input.duration_minutes)
            free = [slot for slot in listed.slots
                    if slot.end - slot.start >= duration and slot.start + duration <= end
                    and not any(_overlaps(slot, a, b) for a, b in taken)]  # fmt: skip
            if not free:
                break
            slot = free[0]
            request = BookingRequest(resource=input.resource, start=slot.start, end=slot.start + duration,
                                     protocol=input.protocol, callback_url=callback_url, reference=job_id)  # fmt: skip
            try:
                booking = await client.book(request, idempotency_key(job_id))
            except LabAnswer as answer:
                if answer.code == "slot_taken":
                    taken.append((request.start, request.end))
                    continue
                if answer.code == "idempotency_key_reused" and answer.booking is not None:
                    booking = answer.booking  # booked by an earlier run of this job, whose answer was lost
                else:
                    raise
            return {
                "lab": input.lab, "booking": booking.id, "resource": booking.resource,
                "start": booking.start.isoformat(), "end": booking.end.isoformat(), "deadline": deadline.isoformat(),
                "slots_taken_by_others": len(taken),
            }  # fmt: skip
    limit = f"latest {_utc(latest)}" if latest is not None and latest <= deadline else f"the deadline {_utc(deadline)}"
    raise NoSlot(
        f"no free {input.duration_minutes:g}-minute slot of {input.resource} at {input.lab} between {_utc(start)} and "
        f"{limit}" + (f" ({len(taken)} taken by others while kiln was booking them)" if taken else "")
        + "; choose a later latest, a longer deadline_hours or a shorter duration_minutes"
    )
