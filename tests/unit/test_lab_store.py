"""The job index's lab bookings on a real SQLite file: each callback once, the first final word wins, a callback
before its booking is kept, and a suspended job holds no slot."""

from __future__ import annotations

import asyncio
from datetime import timedelta


from kiln.schemas import JobStatus
from kiln.schemas.labs import Callback
from kiln.store import labs
from kiln.store.models import utcnow
from kiln.store.policy import Source

NOW = utcnow()


async def running_job(store) -> str:
    project_id = await store.project_for_key(await store.create_key("p"))
    job = await store.add_job(project_id=project_id, type="lab_booking", input={}, resources={})
    await store.transition(job.id, JobStatus.QUEUED)
    await store.transition(job.id, JobStatus.RUNNING, source=Source.PREFECT)
    return job.id


async def booked(store, job_id: str, booking: str = "B-1"):
    return await labs.record_booking(store, job_id, lab="lab-a", booking_id=booking, resource="xrd-1", start=NOW,
                                     end=NOW + timedelta(hours=1), deadline=NOW + timedelta(hours=2),
                                     first_poll=NOW + timedelta(hours=1, minutes=1))  # fmt: skip


def callback(status: str, sequence: int, booking: str = "B-1", **fields) -> Callback:
    return Callback.model_validate({"booking": booking, "status": status, "sequence": sequence,
                                    "at": NOW.isoformat(), **fields})  # fmt: skip


async def test_a_booking_says_what_is_booked_and_until_when(store):
    job_id = await running_job(store)
    await booked(store, job_id)
    reason = (await store.get_job(job_id)).status_reason
    assert reason.startswith("booked xrd-1 ") and "at lab-a (booking B-1)" in reason and "deadline" in reason


async def test_each_callback_is_taken_once_even_when_delivered_twice_at_once(store):
    job_id = await running_job(store)
    await booked(store, job_id)
    final = callback("completed", 3, results={"a": 1})
    taken = await asyncio.gather(*(labs.take_callback(store, "lab-a", "msg-1", final) for _ in range(4)))
    assert sorted(t.duplicate for t in taken) == [False, True, True, True]
    # the same booking and sequence under another webhook-id is the same callback
    assert (await labs.take_callback(store, "lab-a", "msg-2", final)).duplicate
    row = await labs.booking_of_job(store, job_id)
    assert row.outcome_status == "completed" and row.outcome["results"] == {"a": 1}


async def test_the_first_final_word_wins_and_later_ones_change_nothing(store):
    job_id = await running_job(store)
    await booked(store, job_id)
    await labs.take_callback(store, "lab-a", "m3", callback("failed", 3, message="broke"))
    later = await labs.take_callback(store, "lab-a", "m4", callback("completed", 4))
    assert later.effect.startswith("none: the booking had ended")
    assert not await labs.claim_outcome(store, job_id, "expired", message="late", source="deadline")
    assert (await labs.booking_of_job(store, job_id)).outcome_status == "failed"


async def test_a_reordered_callback_changes_nothing(store):
    job_id = await running_job(store)
    await booked(store, job_id)
    await labs.take_callback(store, "lab-a", "m2", callback("progress", 2, progress={"fraction": 0.5}))
    stale = await labs.take_callback(store, "lab-a", "m1", callback("started", 1))
    assert stale.effect == "none: sequence 1 arrived after 2"


async def test_a_callback_before_its_booking_is_kept_then_applied(store):
    job_id = await running_job(store)
    early = await labs.take_callback(store, "lab-a", "m9", callback("completed", 9, results={"x": 2}))
    assert early.job_id is None and not early.duplicate
    await booked(store, job_id)
    assert await labs.settle_from_callbacks(store, job_id)
    assert (await labs.booking_of_job(store, job_id)).outcome["results"] == {"x": 2}


async def test_a_suspended_job_holds_no_slot_until_a_worker_takes_it_again(store):
    job_id = await running_job(store)
    run = "run-1"
    from sqlalchemy import update

    from kiln.store.models import JobRow

    async with store.session.begin() as s:
        await s.execute(update(JobRow).where(JobRow.id == job_id).values(flow_run_id=run))
    assert await store.in_flight_count() == 1
    await store.transition(job_id, JobStatus.RUNNING, source=Source.PREFECT, flow_run_id=run, suspended=True)
    assert await store.in_flight_count() == 0 and await store.suspended_count() == 1
    assert job_id not in [j.id for j in await store.taken_before(utcnow() + timedelta(days=1))]
    await store.transition(job_id, JobStatus.QUEUED, source=Source.PREFECT, flow_run_id=run, scheduled=True,
                           at=utcnow() + timedelta(seconds=1))  # fmt: skip
    assert await store.in_flight_count() == 0
    await store.transition(job_id, JobStatus.RUNNING, source=Source.PREFECT, flow_run_id=run,
                           at=utcnow() + timedelta(seconds=2))  # fmt: skip
    assert await store.in_flight_count() == 1 and await store.suspended_count() == 0
    # a worker took it again just now: the lost-worker watch counts from then, not from its first start
    assert job_id not in [j.id for j in await store.taken_before(utcnow() + timedelta(seconds=1))]
    job = await store.get_job(job_id)
    assert job.status == "running" and job.suspended_seconds > 0
