"""The job index on a real SQLite file: keys, ordering, forward-only transitions, retries, events."""

from __future__ import annotations

from datetime import timedelta

import pytest

from kiln.errors import Conflict, InvalidRequest, NotFound, QuotaExceeded
from kiln.schemas import JobStatus
from kiln.store.batches import NewJob, add_jobs, set_budget, usage
from kiln.store.models import ApiKey, utcnow
from kiln.store.policy import Source

PREFECT = Source.PREFECT


async def add(store, project_id, **kw):
    defaults = dict(project_id=project_id, type="sleep", input={"seconds": 0}, resources={})
    return await store.add_job(**{**defaults, **kw})


async def project(store, name="p") -> str:
    key = await store.create_key(name)
    return await store.project_for_key(key)


async def test_keys_are_stored_hashed_and_can_be_revoked(store):
    key = await store.create_key("alpha")
    assert key.startswith("kiln_") and len(key) > 40
    async with store.session() as s:
        from sqlalchemy import select

        stored = (await s.scalars(select(ApiKey))).all()
    assert key not in {k.key_hash for k in stored} and len(stored[0].key_hash) == 64
    assert await store.project_for_key(key) == await store.project_id_by_name("alpha")
    assert await store.revoke_key(key) == 1
    assert await store.project_for_key(key) is None


async def test_pending_jobs_come_out_by_priority_then_submission(store):
    pid = await project(store)
    a = await add(store, pid, priority=0)
    b = await add(store, pid, priority=5)
    c = await add(store, pid, priority=0)
    d = await add(store, pid, priority=5)
    assert [j.id for j in await store.pending_in_order(10)] == [b.id, d.id, a.id, c.id]
    assert await store.jobs_ahead(c) == 3 and await store.jobs_ahead(b) == 0


async def test_a_claim_is_won_once(store):
    pid = await project(store)
    job = await add(store, pid)
    assert await store.claim_for_release(job.id)
    assert not await store.claim_for_release(job.id)
    assert [j.id for j in await store.claimed_without_run()] == [job.id]
    await store.record_release(job.id, "run-1")
    assert await store.claimed_without_run() == []


async def running_on_run_1(store):
    """A job released on flow run run-1, which Prefect says is running."""
    job = await add(store, await project(store))
    await store.claim_for_release(job.id)
    await store.record_release(job.id, "run-1")
    assert await store.transition(job.id, JobStatus.RUNNING, source=PREFECT, flow_run_id="run-1")
    return job


async def test_transitions_only_move_forward_and_ignore_earlier_attempts(store):
    job = await running_on_run_1(store)
    assert not await store.transition(job.id, JobStatus.QUEUED, source=PREFECT, flow_run_id="run-1")
    assert not await store.transition(job.id, JobStatus.COMPLETED, source=PREFECT, flow_run_id="run-0", output={"x": 1})
    assert await store.transition(job.id, JobStatus.COMPLETED, source=PREFECT, flow_run_id="run-1", output={"x": 2})
    assert not await store.transition(job.id, JobStatus.FAILED, reason="late")
    done = await store.get_job(job.id, documents=True)
    assert done.status == "completed" and done.output == {"x": 2} and done.completed_at >= done.started_at
    kinds = [(e.event, e.data) for e in await store.events_after(job.id)]
    assert kinds == [
        ("status", {"status": "pending"}),
        ("status", {"status": "queued", "flow_run_id": "run-1"}),
        ("status", {"status": "running"}),
        ("completed", {"output": {"x": 2}}),
    ]


async def test_a_failed_attempt_is_requeued_while_retries_remain(store):
    pid = await project(store)
    job = await add(store, pid, resources={"max_retry_count": 1})
    await store.claim_for_release(job.id)
    await store.record_release(job.id, "run-1")
    assert await store.transition(job.id, JobStatus.FAILED, source=PREFECT, flow_run_id="run-1", reason="boom")
    again = await store.get_job(job.id)
    assert again.status == "pending" and again.attempt == 2 and again.flow_run_id is None
    assert again.status_reason == "retry 1 of 1 after: boom"
    await store.claim_for_release(job.id)
    await store.record_release(job.id, "run-2")
    assert await store.transition(job.id, JobStatus.FAILED, source=PREFECT, flow_run_id="run-2", reason="boom again")
    assert (await store.get_job(job.id)).status == "failed"


async def test_a_crash_reported_twice_is_counted_once(store):
    # the relay crashes an orphan and proposes it; Prefect's Crashed event of the same run comes in beside it
    pid = await project(store)
    job = await add(store, pid, resources={"max_retry_count": 1})
    await store.claim_for_release(job.id)
    await store.record_release(job.id, "run-1")
    crash = dict(source=PREFECT, flow_run_id="run-1", reason="crashed: the kiln worker stopped responding", crashed=True)
    assert await store.transition(job.id, JobStatus.FAILED, **crash)
    assert not await store.transition(job.id, JobStatus.FAILED, **crash)
    again = await store.get_job(job.id)
    assert (again.status, again.attempt) == ("pending", 2)


async def test_prefect_overrules_kiln_a_run_that_completed_after_kiln_failed_its_job(store):
    pid = await project(store)
    job = await add(store, pid)
    await store.claim_for_release(job.id)
    await store.record_release(job.id, "run-1")
    await store.transition(job.id, JobStatus.RUNNING, source=PREFECT, flow_run_id="run-1")
    assert await store.transition(job.id, JobStatus.FAILED, reason="the kiln worker stopped responding")
    used = (await usage(store, pid))["used_core_hours"]
    assert await store.transition(job.id, JobStatus.COMPLETED, source=PREFECT, flow_run_id="run-1", output={"x": 1})
    done = await store.get_job(job.id, documents=True)
    assert done.status == "completed" and done.output == {"x": 1}
    assert (await usage(store, pid))["used_core_hours"] == used, "charged once"


async def test_a_run_restarted_in_prefect_reopens_its_finished_job(store):
    pid = await project(store)
    job = await add(store, pid)
    await store.claim_for_release(job.id)
    await store.record_release(job.id, "run-1")
    await store.transition(job.id, JobStatus.FAILED, source=PREFECT, flow_run_id="run-1", reason="boom")
    ended = (await store.get_job(job.id)).completed_at
    # a late report from before the end changes nothing; a restart after it reopens the job
    assert not await store.transition(job.id, JobStatus.RUNNING, source=PREFECT, flow_run_id="run-1",
                                      at=ended - timedelta(seconds=1))  # fmt: skip
    assert await store.transition(job.id, JobStatus.QUEUED, source=PREFECT, flow_run_id="run-1",
                                  at=ended + timedelta(seconds=1))  # fmt: skip
    reopened = await store.get_job(job.id)
    assert reopened.status == "queued" and reopened.completed_at is None and "Retry" in reopened.status_reason
    assert await store.transition(job.id, JobStatus.COMPLETED, source=PREFECT, flow_run_id="run-1", output={})
    assert (await store.get_job(job.id)).status == "completed"


async def test_cancel_pending_only_touches_pending_jobs(store):
    pid = await project(store)
    job = await add(store, pid)
    assert await store.cancel_pending(job.id, "cancelled by request")
    assert not await store.cancel_pending(job.id, "again")
    cancelled = await store.get_job(job.id)
    assert cancelled.status == "cancelled" and cancelled.cancel_requested
    assert (await store.events_after(job.id))[-1].event == "cancelled"


async def test_a_job_whose_run_fails_after_its_cancel_was_asked_ends_cancelled(store):
    # the run failed by itself before the cancel reached Prefect (seen in CI): no Cancelled state follows
    job = await running_on_run_1(store)
    await store.mark_cancel_requested([job.id])
    assert await store.transition(job.id, JobStatus.FAILED, source=PREFECT, flow_run_id="run-1",
                                  reason="SourceError: no such file")  # fmt: skip
    ended = await store.get_job(job.id)
    assert ended.status == "cancelled" and ended.completed_at is not None
    assert ended.status_reason == "cancelled by request; its run failed meanwhile: SourceError: no such file"
    assert (await store.events_after(job.id))[-1].event == "cancelled"
    # the Cancelled state that may still come changes nothing
    assert not await store.transition(job.id, JobStatus.CANCELLED, source=PREFECT, flow_run_id="run-1")


async def test_priority_changes_only_while_pending(store):
    pid = await project(store)
    job = await add(store, pid)
    assert (await store.set_priority(job.id, pid, 9)).priority == 9
    await store.claim_for_release(job.id)
    with pytest.raises(Conflict):
        await store.set_priority(job.id, pid, 1)
    with pytest.raises(NotFound):
        await store.set_priority(job.id, "another-project", 1)


async def test_a_child_needs_a_parent_in_the_same_project(store):
    pid = await project(store, "p")
    other = await project(store, "q")
    parent = await add(store, pid)
    await add(store, pid, parent_id=parent.id)
    with pytest.raises(InvalidRequest, match="parent_id"):
        await add(store, other, parent_id=parent.id)
    assert len(await store.unfinished_children(parent.id)) == 1


async def test_listing_pages_newest_first(store):
    pid = await project(store)
    ids = [(await add(store, pid)).id for _ in range(5)]
    page, cursor = await store.list_jobs(pid, limit=2)
    assert [j.id for j in page] == ids[::-1][:2]
    page2, cursor2 = await store.list_jobs(pid, limit=2, cursor=cursor)
    assert [j.id for j in page2] == ids[::-1][2:4]
    page3, cursor3 = await store.list_jobs(pid, limit=2, cursor=cursor2)
    assert [j.id for j in page3] == ids[:1] and cursor3 is None


async def test_a_key_and_its_projects_running_jobs_of_a_type_come_in_one_read_as_listing_finds_them(store):
    key = await store.create_key("alpha")
    pid = await store.project_for_key(key)
    other = await project(store, "beta")

    async def running(project_id, type="mcp_host", name="tools"):
        job = await add(store, project_id, type=type, input={"name": name})
        await store.claim_for_release(job.id)
        await store.record_release(job.id, f"run-{job.id}")
        await store.transition(job.id, JobStatus.RUNNING, source=PREFECT, flow_run_id=f"run-{job.id}")
        return job

    first, second = await running(pid), await running(pid, name="other")
    await add(store, pid, type="mcp_host", input={"name": "tools"})  # pending
    await running(pid, type="sleep")
    await running(other)
    caller, rows = await store.caller_and_jobs(key, type="mcp_host", status=JobStatus.RUNNING, limit=200)
    listed, _ = await store.list_jobs(pid, type="mcp_host", status=JobStatus.RUNNING, limit=200)  # as it was found
    assert caller == await store.caller(key) and caller.project_id == pid
    assert rows == [(row.id, row.input) for row in listed]
    assert rows == [(second.id, {"name": "other"}), (first.id, {"name": "tools"})]
    _, newest = await store.caller_and_jobs(key, type="mcp_host", status=JobStatus.RUNNING, limit=1)
    assert newest == rows[:1]
    caller, rows = await store.caller_and_jobs(key, type="mcp_host", status=JobStatus.COMPLETED)
    assert caller.project_id == pid and rows == []  # a caller with nothing to find is still a caller
    await store.revoke_key(key)
    assert await store.caller_and_jobs(key, type="mcp_host", status=JobStatus.RUNNING) == (None, [])


async def test_a_job_keeps_the_api_that_submitted_it_and_is_listed_by_it(store):
    pid = await project(store)
    plain = NewJob(type="sleep", input={"seconds": 0}, resources={}, input_hash=None, core_hours=0.0)
    recorded = NewJob(type="sleep", input={"seconds": 0}, resources={}, input_hash=None, core_hours=0.0,
                      submitted_via="compute", submitted_request={"body": {"title": "t"}})  # fmt: skip
    _, stored = await add_jobs(store, pid, [plain, recorded, plain])
    page, _ = await store.list_jobs(pid, submitted_via="compute")
    assert [j.id for j in page] == [stored[1].job_id]
    assert (page[0].submitted_via, page[0].submitted_request) == ("compute", {"body": {"title": "t"}})
    unrecorded = await store.get_job(stored[0].job_id)
    assert (unrecorded.submitted_via, unrecorded.submitted_request) == (None, None)
    assert len((await store.list_jobs(pid))[0]) == 3


async def test_capacity_counts_live_workers_and_in_flight_jobs(store):
    pid = await project(store)
    await store.worker_heartbeat("w1", "i1", 2, {"cpu_count": 2}, [], utcnow())
    job = await add(store, pid)
    await store.claim_for_release(job.id)
    capacity = await store.capacity(timedelta(seconds=10))
    assert (capacity.slots, capacity.busy, capacity.free) == (2, 1, 1)
    assert (await store.capacity(timedelta(seconds=0))).slots == 0


async def test_a_restarted_worker_hands_back_the_runs_of_its_previous_life(store):
    t0 = utcnow()
    assert await store.worker_heartbeat("w1", "i1", 1, {}, ["run-a"], t0) == []
    assert await store.worker_heartbeat("w1", "i1", 1, {}, ["run-a"], t0 + timedelta(seconds=2)) == []
    assert await store.worker_heartbeat("w1", "i2", 1, {}, ["run-b"], t0 + timedelta(seconds=4)) == ["run-a"]
    # a replayed beat of the old instance is older than the last one: no restart, nothing handed back
    assert await store.worker_heartbeat("w1", "i1", 1, {}, ["run-a"], t0 + timedelta(seconds=1)) == []
    assert await store.worker_heartbeat("w1", "i2", 1, {}, ["run-b"], t0 + timedelta(seconds=6)) == []


async def test_taken_jobs_are_found_for_the_lost_worker_check(store):
    pid = await project(store)
    job = await add(store, pid)
    await store.claim_for_release(job.id)
    await store.record_release(job.id, "run-1")
    await store.transition(job.id, JobStatus.RUNNING, flow_run_id="run-1", at=utcnow() - timedelta(seconds=30))
    assert [j.id for j in await store.taken_before(utcnow() - timedelta(seconds=10))] == [job.id]
    assert await store.taken_before(utcnow() - timedelta(seconds=60)) == []


async def test_progress_after_the_end_is_dropped(store):
    pid = await project(store)
    job = await add(store, pid)
    await store.add_progress(job.id, 50, "half")
    await store.cancel_pending(job.id, "cancelled by request")
    await store.add_progress(job.id, 100, "late")
    assert [e.event for e in await store.events_after(job.id)] == ["status", "progress", "cancelled"]


def new_job(hours: float, **kw) -> NewJob:
    return NewJob(type="sleep", input={"seconds": hours * 3600}, resources={}, input_hash=None, core_hours=hours,
                  refresh=True, **kw)  # fmt: skip


async def test_unfinished_jobs_hold_their_estimate_against_the_budget_until_they_end(store):
    pid = await project(store)
    await set_budget(store, "p", 1.5)
    _, (first,) = await add_jobs(store, pid, [new_job(1.0)])
    with pytest.raises(QuotaExceeded, match=r"0.50 of its 1.5 left \(0.00 used, 1.00 held by unfinished jobs\)"):
        await add_jobs(store, pid, [new_job(1.0)])
    # ended after 36 s of running: charged 0.01 core-hours, and it holds nothing any more
    await store.transition(first.job_id, JobStatus.RUNNING, at=utcnow() - timedelta(seconds=36))
    await store.transition(first.job_id, JobStatus.COMPLETED, output={})
    assert (await usage(store, pid))["used_core_hours"] == pytest.approx(0.01, abs=1e-3)
    await add_jobs(store, pid, [new_job(1.0)])


async def test_children_of_a_batch_are_released_by_the_dispatcher_and_subflow_children_are_not(store):
    pid = await project(store)
    parent = await add(store, pid, status=JobStatus.QUEUED, flow_run_id="run-parent")
    await add(store, pid, parent_id=parent.id, status=JobStatus.QUEUED, flow_run_id="run-sub", in_parent_run=True)
    batch_id, stored = await add_jobs(store, pid, [new_job(0, parent_id=parent.id)] * 2, batch_size=2,
                                      batch_id=parent.id, parent_id=parent.id)  # fmt: skip
    assert batch_id == parent.id
    assert {j.id for j in await store.pending_in_order(10)} == {s.job_id for s in stored}
    assert await store.in_flight_count() == 1  # the parent; its subflow runs in the parent's slot
    with pytest.raises(Conflict, match="exists already"):
        await add_jobs(store, pid, [new_job(0)], batch_size=1, batch_id=parent.id)
    assert len((await store.list_jobs(pid, parent_id=parent.id, limit=10))[0]) == 3
