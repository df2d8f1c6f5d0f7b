"""Live status over Server-Sent Events: order, resuming with Last-Event-ID, many subscribers."""

from __future__ import annotations

import asyncio

from kiln.sdk import AsyncClient
from tests.integration.support import SETTINGS


def test_events_arrive_status_then_progress_then_completed(client):
    job = client.jobs.create(type="sleep", input={"seconds": 1})
    events = list(client.jobs.events(job.id))
    kinds = [e.event for e in events]
    assert kinds[-1] == "completed" and kinds.count("completed") == 1
    statuses = [e.data["status"] for e in events if e.event == "status"]
    assert statuses == ["pending", "queued", "running"]
    first_progress = kinds.index("progress")
    assert kinds.index("status") < first_progress and all(k == "progress" for k in kinds[first_progress:-1])
    # Prefect carries progress and state changes on separate paths: a last progress event that
    # arrives after the end is dropped, so the terminal event stays last
    assert [e.data["percent"] for e in events if e.event == "progress"] in ([50.0, 100.0], [50.0])
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
    assert [kind for _, kind in streams[0]].count("progress") in (3, 4)
