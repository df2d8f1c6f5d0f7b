"""The relay's lost-worker watch on a real job index, with Prefect replaced by a recorder of the runs it crashes."""

from __future__ import annotations

from datetime import timedelta
from types import SimpleNamespace

from kiln.events.relay import Relay
from kiln.schemas import JobStatus
from kiln.settings import KilnSettings
from kiln.store.models import utcnow


class Prefect:
    """The Prefect client the relay crashes runs through: every run is Running until crashed."""

    def __init__(self):
        self.crashed: list[str] = []

    async def read_flow_run(self, flow_run_id):
        state = SimpleNamespace(is_final=lambda: False, is_paused=lambda: False, name="Running")
        return SimpleNamespace(id=flow_run_id, state=state)

    async def set_flow_run_state(self, flow_run_id, state, force=False):
        self.crashed.append(str(flow_run_id))
        return SimpleNamespace(state=state)


async def a_running_job_of_a_worker_last_heard_30_s_ago(store) -> str:
    key = await store.create_key("p")
    job = await store.add_job(project_id=await store.project_for_key(key), type="sleep", input={"seconds": 60},
                              resources={})  # fmt: skip
    run_id = "00000000-0000-0000-0000-000000000001"
    long_ago = utcnow() - timedelta(seconds=30)
    await store.claim_for_release(job.id)
    await store.record_release(job.id, run_id)
    await store.transition(job.id, JobStatus.RUNNING, flow_run_id=run_id, at=long_ago)
    await store.worker_heartbeat("w1", "i1", 1, {}, [run_id], long_ago)
    return job.id


def relay_of(store, prefect) -> Relay:
    relay = Relay(store, prefect, SimpleNamespace(wake=lambda: None), KilnSettings(worker_lost_seconds=10))
    relay.connected.set()
    return relay


async def test_no_worker_is_lost_before_the_relay_has_listened_for_the_lost_worker_window(store):
    """Right after the kiln API restarts, a live worker's newest recorded heartbeat is from before the outage."""
    job_id = await a_running_job_of_a_worker_last_heard_30_s_ago(store)
    prefect = Prefect()
    relay = relay_of(store, prefect)
    relay.following_since = utcnow() - timedelta(seconds=2)
    await relay.crash_runs_of_lost_workers()
    assert prefect.crashed == []
    assert not (await store.workers())[0].lost
    assert (await store.get_job(job_id)).status == JobStatus.RUNNING.value


async def test_a_worker_silent_while_the_relay_listened_is_lost_and_its_runs_crash(store):
    job_id = await a_running_job_of_a_worker_last_heard_30_s_ago(store)
    prefect = Prefect()
    relay = relay_of(store, prefect)
    relay.following_since = utcnow() - timedelta(seconds=20)
    await relay.crash_runs_of_lost_workers()
    assert (await store.workers())[0].lost
    assert prefect.crashed == ["00000000-0000-0000-0000-000000000001"]
    assert (await store.get_job(job_id)).status == JobStatus.FAILED.value


async def test_no_worker_is_lost_while_the_relay_hears_nothing_from_prefect(store):
    await a_running_job_of_a_worker_last_heard_30_s_ago(store)
    prefect = Prefect()
    relay = relay_of(store, prefect)
    relay.following_since = None  # what the relay sets when Prefect's event stream is lost, until it caught up again
    await relay.crash_runs_of_lost_workers()
    assert prefect.crashed == [] and not (await store.workers())[0].lost
