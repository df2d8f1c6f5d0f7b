"""Live status over Server-Sent Events: order, resuming with Last-Event-ID, many subscribers, dropped and resumed."""

from __future__ import annotations

import asyncio
import random

import httpx

from kiln.sdk import AsyncClient
from kiln.sdk.sse import SSEParser
from tests.integration.support import SETTINGS

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

