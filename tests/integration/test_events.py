"""Live status over Server-Sent Events: order, resuming with Last-Event-ID, many subscribers, dropped and resumed."""

from __future__ import annotations

import asyncio
import random
import uuid

import httpx
import pytest
from sqlalchemy import event
from sqlalchemy.util import await_only

from kiln.schemas import JobStatus
from kiln.sdk import AsyncClient, Client
from kiln.sdk.sse import SSEParser
from kiln.store.policy import Source
from kiln.store.store import Store
from tests.integration.support import DATABASE, PG_ADMIN, SETTINGS, pg_admin, wait_until
from tests.integration.test_batches import new_project, sleep_entry

TERMINAL_EVENTS = ("completed", "failed", "cancelled")


def test_events_arrive_status_then_progress_then_completed(client):
    job = client.jobs.create(type="sleep", input={"seconds": 1})
    events = list(client.jobs.events(job.id))
    kinds = [e.event for e in events]
    assert kinds[-1] == "completed" and kinds.count("completed") == 1
    statuses = [e.data["status"] for e in events if e.event == "status"]
    assert statuses == ["pending", "queued", "running"]
    first_progress = kinds.index("progress")
    assert kinds.index("status") < first_progress and all(k == "progress" for k in kinds[first_progress:-1])
    # progress goes from the flow straight to the kiln API (kiln.run_reports), so each report, the last one too,
    # is in before the flow ends
    assert [e.data["percent"] for e in events if e.event == "progress"] == [50.0, 100.0]
    assert events[-1].data == {"output": {"slept_seconds": 1.0, "children": 0}}
    ids = [e.id for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


def test_a_reconnect_with_last_event_id_replays_what_was_missed(client):
    job = client.jobs.create(type="sleep", input={"seconds": 1})
    everything = list(client.jobs.events(job.id))
    for cut in range(len(everything)):
        rest = list(client.jobs.events(job.id, last_event_id=everything[cut].id))
        assert [e.id for e in rest] == [e.id for e in everything[cut + 1:]]


async def test_a_hundred_concurrent_subscribers_each_receive_every_event(api_key):
    async with AsyncClient(SETTINGS.api_url, api_key) as client:
        job = await client.jobs.create(type="sleep", input={"seconds": 2})

        async def follow():
            return [(e.id, e.event) async for e in client.jobs.events(job.id)]

        streams = await asyncio.gather(*(follow() for _ in range(100)))
    assert all(stream == streams[0] for stream in streams)
    assert streams[0][-1][1] == "completed"
    assert [kind for _, kind in streams[0]].count("progress") == 4


async def test_a_hundred_subscribers_dropped_at_random_points_resume_with_last_event_id(api_key):
    # raw HTTP, so that a connection is dropped for real at any line of the stream, mid-event included,
    # and the next one sends the Last-Event-ID of the last whole event received, as a browser's EventSource does
    seeds = random.Random(16)
    headers = {"Authorization": f"Bearer {api_key}", "Accept": "text/event-stream"}
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=SETTINGS.api_url, headers=headers, limits=limits, timeout=60) as http:
        created = await http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 5}})
        job_id = created.json()["id"]

        async def follow(seed: int) -> tuple[list[tuple[str, str]], int]:
            rng = random.Random(seed)
            received: list[tuple[str, str]] = []
            connections = 0
            while not received or received[-1][1] not in TERMINAL_EVENTS:
                # a drop after 1 to 12 lines: the opening `retry:`, inside an event, between events, or after its end
                drop_after = rng.randint(1, 12)
                resume = {"Last-Event-ID": received[-1][0]} if received else {}
                connections += 1
                async with http.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=resume) as response:
                    assert response.status_code == 200, (response.status_code, received)
                    parser = SSEParser()
                    lines = 0
                    async for line in response.aiter_lines():
                        event = parser.feed(line)
                        if event is not None:
                            received.append((event.id, event.event))
                        lines += 1
                        if lines == drop_after or received and received[-1][1] in TERMINAL_EVENTS:
                            break
                # away for a while, so that events are also missed while disconnected and replayed on resuming
                await asyncio.sleep(rng.uniform(0, 0.5))
            return received, connections

        followed = await asyncio.gather(*(follow(seeds.randrange(2**32)) for _ in range(100)))
        async with http.stream("GET", f"/api/v1/jobs/{job_id}/events") as response:
            parser = SSEParser()
            everything = [(e.id, e.event) async for line in response.aiter_lines() if (e := parser.feed(line))]
    assert everything[-1][1] == "completed" and len(everything) >= 8
    for received, _ in followed:
        assert received == everything
    # at most 12 lines a connection: every subscriber resumed several times (about 1600 connections in all)
    assert min(connections for _, connections in followed) >= 3


@pytest.fixture
async def own_index(tmp_path):
    """A job index of the test's own, on the session's kind of database, with no stack writing to it."""
    if DATABASE == "postgresql":
        name = f"kiln_index_{uuid.uuid4().hex[:8]}"
        pg_admin([f"CREATE DATABASE {name}"])
        url = PG_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+asyncpg://") + f"/{name}"
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'index.db'}"
    store = Store(url)
    await store.migrate()
    yield store
    await store.close()
    if DATABASE == "postgresql":
        pg_admin([f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"])


# sleep(0) jobs submitted at once before the job whose progress is followed
BURST = 200


def test_a_job_submitted_after_a_burst_gets_every_progress_event_before_its_end(idle):
    """Progress goes from the flow to the kiln API, not through Prefect's event pipeline, which after a burst of runs
    can lag minutes behind their states (the 1000-job test does the same after its batch, on PostgreSQL)."""
    http, _ = new_project()
    burst = http.post("/api/v1/jobs/submit-batch",
                      json={"jobs": [sleep_entry(0.02 + i * 1e-6) for i in range(BURST)]})  # fmt: skip
    assert burst.status_code == 202, burst.text
    try:
        later = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 2}, "priority": 10}).json()
        with Client(SETTINGS.api_url, http.headers["Authorization"].removeprefix("Bearer ")) as own:
            events = list(own.jobs.events(later["id"]))
    finally:
        http.delete(f"/api/v1/batches/{burst.json()['batch_id']}")
    kinds = [e.event for e in events]
    assert kinds[-1] == "completed", kinds
    assert [e.data["percent"] for e in events if e.event == "progress"] == [25.0, 50.0, 75.0, 100.0], kinds


def _a_running_job_and_its_token(client, seconds: float):
    """(the run key, a job that has ended, a sleep job now running, its flow run id, that run's token)."""
    from kiln.run_reports import run_key, run_token

    key = run_key(SETTINGS)
    other = client.jobs.create(type="sleep", input={"seconds": 0.01 + random.random() * 1e-3}).wait(timeout=180)
    job = client.jobs.create(type="sleep", input={"seconds": seconds + random.random() * 1e-3})
    wait_until(lambda: client.jobs.get(job.id).status.value == "running", what="the job to run")
    flow_run_id = client.jobs.get(job.id).flow_run_id
    return key, other, job, flow_run_id, run_token(key, job.id, flow_run_id)


def test_a_progress_report_needs_its_runs_token_and_reaches_its_own_job_only(client, idle):
    from kiln.run_reports import RUN_TOKEN_HEADER, run_token

    key, other, job, flow_run_id, token = _a_running_job_and_its_token(client, 4)

    def post(job_id: str, body: dict, token: str | None) -> httpx.Response:
        headers = {RUN_TOKEN_HEADER: token} if token is not None else {}
        return httpx.post(f"{SETTINGS.api_url}/api/v1/jobs/{job_id}/progress", json=body, headers=headers)

    refusals = {
        "no token": (post(job.id, {"percent": 10}, None), 401),
        "a token signed with another key": (post(job.id, {"percent": 10}, run_token(b"x" * 32, job.id, flow_run_id)),
                                            401),  # fmt: skip
        "the token of another job": (post(other.id, {"percent": 10}, token), 401),
        "the token of an earlier attempt": (post(job.id, {"percent": 10}, run_token(key, job.id, str(uuid.uuid4()))),
                                            409),  # fmt: skip
        "a percent above 100": (post(job.id, {"percent": 150}, token), 422),
    }
    for what, (response, status) in refusals.items():
        assert response.status_code == status, (what, response.text)
        assert key.decode() not in response.text
    assert RUN_TOKEN_HEADER in refusals["no token"][0].json()["detail"]
    assert "percent" in refusals["a percent above 100"][0].json()["detail"]
    taken = post(job.id, {"percent": 12.5, "message": "from the test"}, token)
    assert taken.status_code == 200 and taken.json() == {"recorded": True}, taken.text
    job.wait(timeout=180)
    late = post(job.id, {"percent": 99, "message": "after the end"}, token)
    assert late.status_code == 200 and late.json() == {"recorded": False}, late.text
    events = list(client.jobs.events(job.id))
    progress = [(e.data["percent"], e.data["message"]) for e in events if e.event == "progress"]
    assert (12.5, "from the test") in progress and all(message != "after the end" for _, message in progress)
    assert events[-1].event == "completed"
    assert not [e for e in client.jobs.events(other.id) if e.data.get("message") == "from the test"]


def test_a_workers_word_that_a_run_ended_is_checked_with_prefect_and_the_job_ends_at_once(client, idle):
    # the kiln worker says so after each run (POST …/ended, its run's token): the job ends without waiting for
    # Prefect's event of the end, which lags under load; what the job takes is the run's state in Prefect
    from kiln.run_reports import RUN_TOKEN_HEADER, run_token
    from tests.integration.support import flow_run_state

    key, other, job, flow_run_id, token = _a_running_job_and_its_token(client, 3)

    def ended(job_id: str, token: str | None) -> httpx.Response:
        headers = {RUN_TOKEN_HEADER: token} if token is not None else {}
        return httpx.post(f"{SETTINGS.api_url}/api/v1/jobs/{job_id}/ended", headers=headers)

    stranger = str(uuid.uuid4())
    refusals = {
        "no token": (ended(job.id, None), 401),
        "a token signed with another key": (ended(job.id, run_token(b"x" * 32, job.id, flow_run_id)), 401),
        "the token of another job": (ended(other.id, token), 401),
        "no such job": (ended(stranger, run_token(key, stranger, flow_run_id)), 404),
    }
    for what, (response, status) in refusals.items():
        assert response.status_code == status, (what, response.text)
        assert key.decode() not in response.text and token not in response.text
    # the worker's word alone changes nothing: in Prefect the run still runs
    running = ended(job.id, token)
    assert running.status_code == 200 and running.json() == {"mirrored": False}, running.text
    assert client.jobs.get(job.id).status.value == "running"
    earlier = ended(job.id, run_token(key, job.id, str(uuid.uuid4())))
    assert earlier.status_code == 200 and earlier.json() == {"mirrored": False}, earlier.text
    wait_until(lambda: flow_run_state(flow_run_id) == "COMPLETED", what="the run to complete in Prefect")
    done = ended(job.id, token)
    assert done.status_code == 200 and done.json() == {"mirrored": True}, done.text
    job = client.jobs.get(job.id)
    assert job.status.value == "completed" and job.output is not None and job.started_at is not None
    events = [e.event for e in client.jobs.events(job.id)]
    assert events.count("completed") == 1 and events[-1] == "completed"


async def test_an_event_written_while_the_job_ends_is_committed_before_the_end(own_index):
    # The relay writes a progress event while its watch ends the job: were the progress numbered first and committed
    # last, a stream that had sent the end would never send it (PostgreSQL numbers a row at its INSERT)
    store = own_index
    project_id = await store.project_for_key(await store.create_key("order"))
    job = await store.add_job(project_id=project_id, type="sleep", input={"seconds": 0}, resources={})
    flow_run_id = str(uuid.uuid4())
    await store.claim_for_release(job.id)
    await store.record_release(job.id, flow_run_id)
    await store.transition(job.id, JobStatus.RUNNING, source=Source.PREFECT, flow_run_id=flow_run_id)
    running = (await store.events_after(job.id))[-1].id
    inserted, commit = asyncio.Event(), asyncio.Event()

    def hold_the_progress_before_its_commit(_connection, _cursor, statement, parameters, _context, _many):
        if statement.lstrip().upper().startswith("INSERT INTO JOB_EVENTS") and "progress" in str(parameters):
            inserted.set()
            await_only(commit.wait())

    event.listen(store.engine.sync_engine, "after_cursor_execute", hold_the_progress_before_its_commit)
    progress = asyncio.create_task(store.add_progress(job.id, 50, "half"))
    await inserted.wait()
    end = asyncio.create_task(
        store.transition(job.id, JobStatus.COMPLETED, source=Source.PREFECT, flow_run_id=flow_run_id, output={})
    )
    # the end waits for the progress's transaction; a second is its chance to get ahead were it not made to wait
    await asyncio.wait([end], timeout=1)
    seen_meanwhile = [e.event for e in await store.events_after(job.id, running)]
    commit.set()
    await asyncio.gather(progress, end)
    assert seen_meanwhile == []
    assert [e.event for e in await store.events_after(job.id, running)] == ["progress", "completed"]
