"""The dispatcher on a real SQLite job index with Prefect faked: batch jobs released into the free slots and a bound
ahead of them (KILN_RELEASE_AHEAD), their runs scheduled in release order, and what is never released ahead."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace
from uuid import uuid4

import pytest
from sqlalchemy import update

from kiln.dispatch.dispatcher import Dispatcher, waiting_reason
from kiln.schemas import JobStatus
from kiln.settings import KilnSettings
from kiln.store.batches import NewJob, add_jobs
from kiln.store.models import JobRow, utcnow
from kiln.store.store import Store
from kiln.worker.worker import take_within_slots

SLOTS, SERVICE_SLOTS = 2, 1


class FakePrefect:
    """The few calls the dispatcher makes, over flow runs kept in a dict; an idempotency key returns its first run."""

    def __init__(self):
        self.runs: dict = {}

    async def create_flow_run_from_deployment(self, deployment_id, *, idempotency_key, state, **fields):
        for run in self.runs.values():
            if run.idempotency_key == idempotency_key:
                return run
        run = SimpleNamespace(id=uuid4(), idempotency_key=idempotency_key, state=state, infrastructure_pid=None,
                              **fields)  # fmt: skip
        self.runs[run.id] = run
        return run

    async def read_flow_run(self, flow_run_id):
        return self.runs[flow_run_id]

    async def set_flow_run_state(self, flow_run_id, state, force=False):
        self.runs[flow_run_id].state = state
        return SimpleNamespace(state=state)

    def run_of(self, job: JobRow):
        return next(run for run in self.runs.values() if str(run.id) == job.flow_run_id)

    def scheduled_order(self) -> list[str]:
        """The runs' names in the order a worker polling one band takes them: by scheduled time."""
        runs = sorted(self.runs.values(), key=lambda run: run.state.state_details.scheduled_time)
        return [run.name for run in runs]


@pytest.fixture
async def store(tmp_path):
    s = Store(f"sqlite+aiosqlite:///{tmp_path / 'index.db'}")
    await s.migrate()
    await s.worker_heartbeat("w1", "i1", SLOTS, {"cpu_count": 2}, [], utcnow(), service_slots=SERVICE_SLOTS)
    yield s
    await s.close()


def dispatcher(store: Store, release_ahead: int | None = None) -> Dispatcher:
    d = Dispatcher(store, FakePrefect(), KilnSettings(release_ahead=release_ahead))
    d.deployments = {"sleep": uuid4(), "mcp_host": uuid4()}
    return d


async def submit(store: Store, priorities: list[int], **kw) -> list[str]:
    project_id = await store.project_for_key(await store.create_key(f"p-{uuid4().hex[:6]}"))
    jobs = [NewJob(type=kw.get("type", "sleep"), input={"seconds": i}, resources=kw.get("resources", {}),
                   input_hash=None, core_hours=0, refresh=True, priority=p, persistent=kw.get("persistent", False))
            for i, p in enumerate(priorities)]  # fmt: skip
    return [s.job_id for s in (await add_jobs(store, project_id, jobs))[1]]


def strict_order(ids: list[str], priorities: list[int]) -> list[str]:
    return [job_id for _, _, job_id in sorted((-p, i, j) for i, (p, j) in enumerate(zip(priorities, ids)))]


def run_names(ids: list[str]) -> list[str]:
    return [f"sleep-{job_id[:8]}" for job_id in ids]


async def statuses(store: Store, ids: list[str]) -> list[str]:
    return [(await store.get_job(job_id)).status for job_id in ids]


async def test_batch_jobs_fill_the_free_slots_and_as_many_again_ahead_of_them_in_strict_order(store):
    priorities = [0, 5, 0, 10, -1, 5, 0]
    ids = await submit(store, priorities)
    d = dispatcher(store)
    # unset, the bound is the live batch slots: 2 into the slots, 2 ahead of them
    assert await d.release_pending_jobs() == 2 * SLOTS
    order = strict_order(ids, priorities)
    assert d.client.scheduled_order() == run_names(order[:4])
    assert await d.release_pending_jobs() == 0
    capacity = await d.capacity()
    assert (capacity.busy, capacity.waiting, capacity.releasable) == (4, 2, 0)
    # one job ends: one more is released, the next in strict order, scheduled after those released before it
    await store.transition(order[0], JobStatus.COMPLETED, output={})
    assert await d.release_pending_jobs() == 1
    assert d.client.scheduled_order() == run_names(order[:5])
    assert await statuses(store, order) == ["completed", "queued", "queued", "queued", "queued", "pending", "pending"]


@pytest.mark.parametrize("release_ahead, released", [(0, SLOTS), (1, SLOTS + 1), (5, SLOTS + 5)])
async def test_the_bound_is_a_setting_and_zero_releases_only_into_free_slots(store, release_ahead, released):
    await submit(store, [0] * 10)
    d = dispatcher(store, release_ahead)
    assert await d.release_pending_jobs() == released
    assert (await d.capacity()).waiting == released - SLOTS


async def test_nothing_is_released_ahead_of_no_worker(store):
    await store.mark_worker_lost("w1")
    await submit(store, [0] * 3)
    assert await dispatcher(store, release_ahead=2).release_pending_jobs() == 0


async def test_persistent_jobs_are_released_into_free_service_slots_only(store):
    services = await submit(store, [0, 0, 0], type="mcp_host", persistent=True)
    batch = await submit(store, [0] * 6)
    d = dispatcher(store)
    assert await d.release_pending_jobs() == SERVICE_SLOTS + 2 * SLOTS
    assert await statuses(store, services) == ["queued", "pending", "pending"]
    assert await statuses(store, batch) == ["queued"] * 4 + ["pending"] * 2


async def test_a_job_no_worker_can_run_is_not_released_ahead(store):
    (gpu,) = await submit(store, [100], resources={"gpu_count": 1})
    others = await submit(store, [0] * 5)
    assert await dispatcher(store).release_pending_jobs() == 4
    assert (await store.get_job(gpu)).status == "pending"
    assert await statuses(store, others) == ["queued"] * 4 + ["pending"]


async def test_a_waiting_job_says_how_many_are_released_ahead_of_it(store):
    ids = await submit(store, [0] * 6)
    d = dispatcher(store)
    await d.release_pending_jobs()
    capacity = await d.capacity()
    pending = await store.get_job(ids[5])
    assert await waiting_reason(store, pending, capacity) == (
        "1 job ahead at priority ≥ 0; 2 of 2 worker slots busy and 2 jobs released to take the next free ones"
    )
    queued = await store.get_job(ids[3])
    assert await waiting_reason(store, queued, capacity) == (
        "released to Prefect, its flow run waits for a worker to take it; 2 of 2 worker slots busy"
    )


async def test_cancelling_a_job_released_ahead_cancels_its_scheduled_run_at_once(store):
    ids = await submit(store, [0] * 4)
    d = dispatcher(store)
    await d.release_pending_jobs()
    job = await store.get_job(ids[3])
    await d.cancel(job, "cancelled by request")
    run = d.client.run_of(job)
    # Cancelled, not Cancelling: no worker holds it, so none is asked to stop it and none will start it
    assert run.state.type.value == "CANCELLED" and run.state.message == "cancelled by request"
    assert (await store.get_job(job.id)).cancel_requested


async def back_in_time(store: Store, job_id: str, seconds: float) -> None:
    """As if the job had been submitted, and released, `seconds` ago."""
    earlier = utcnow() - timedelta(seconds=seconds)
    async with store.session.begin() as s:
        await s.execute(update(JobRow).where(JobRow.id == job_id).values(created_at=earlier, queued_at=earlier))


async def test_a_job_waiting_ahead_of_the_slots_is_not_past_its_start_timeout_but_is_past_its_assign_timeout(store):
    await submit(store, [10, 10])
    (start,) = await submit(store, [0], resources={"max_timeout_start_ms": 1000})
    (assign,) = await submit(store, [0], resources={"max_timeout_assign_ms": 1000})
    d = dispatcher(store)
    assert await d.release_pending_jobs() == 4
    for job_id in (start, assign):
        await back_in_time(store, job_id, 10)
    await d.fail_overdue_jobs()
    # the start timeout runs from a worker's pick (a free slot), never while the run waits ahead of the slots
    assert (await store.get_job(start)).status == "queued"
    # the assign timeout runs from submission, released or not: the job was not picked within it
    failed = await store.get_job(assign)
    assert failed.status == "failed"
    assert failed.status_reason == (
        "not picked up by a worker within 1 s (max_timeout_assign_ms=1000); it was waiting because: released to "
        "Prefect, its flow run waits for a worker to take it; 2 of 2 worker slots busy"
    )
    assert d.client.run_of(failed).state.type.value == "CANCELLED"


async def test_the_lost_worker_check_leaves_runs_no_worker_took_alone(store):
    ids = await submit(store, [0] * 4)
    await dispatcher(store).release_pending_jobs()
    for job_id in ids:
        await back_in_time(store, job_id, 60)
    picked = await store.get_job(ids[0])
    await store.mark_picked(picked.id, picked.flow_run_id, utcnow() - timedelta(seconds=60))
    # only a run a worker took can have lost its worker; the others wait Scheduled for any worker
    assert [j.id for j in await store.taken_before(utcnow())] == [picked.id]


def test_a_worker_takes_each_kind_of_run_into_its_own_slots_in_the_order_offered():
    offered = [False, False, True, False, True]
    assert take_within_slots(offered, free=2, services_free=1) == [0, 1, 2]
    # the batch slots full, a persistent job's run further down is still taken
    assert take_within_slots(offered, free=0, services_free=1) == [2]
    assert take_within_slots(offered, free=3, services_free=0) == [0, 1, 3]
