"""Persistent jobs (a lab's `echo_service`, tests/fixtures): they serve in service slots apart from batch work, say
their health as status_reason and SSE events, fail only by themselves, and end when cancelled."""

from __future__ import annotations

import time
import uuid

from tests.integration.support import wait_until


def serving(client, name: str, **input):
    """A new persistent job, once it has said it is serving."""
    return until_serving(client, client.jobs.create(type="echo_service", input={"name": name, **input}), name)


def until_serving(client, job, name: str):
    wait_until(lambda: (client.jobs.get(job.id).status_reason or "").startswith(f"{name}: serving"), timeout=180,
               what=f"{name} to serve")  # fmt: skip
    return client.jobs.get(job.id)


def test_a_persistent_job_serves_beside_batch_work_and_says_how_it_is(client, idle):
    name = f"svc-{uuid.uuid4().hex[:6]}"
    service = serving(client, name, beat_seconds=0.2)
    assert service.status.value == "running"
    # the worker's one batch slot is free: the service holds a service slot
    assert client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180).status.value == "completed"
    second = client.jobs.create(type="echo_service", input={"name": f"{name}-2"})
    wait_until(lambda: "waits for service capacity: 1 of 1 service slots busy" in
               (client.jobs.get(second.id).status_reason or ""), timeout=180, what="the second to wait")  # fmt: skip
    assert client.jobs.get(second.id).status.value == "pending"
    kinds = []
    for event in client.jobs.events(service.id):
        kinds.append(event.event)
        if event.event == "healthy":
            break
    assert kinds[-2:] == ["starting", "healthy"] or ("starting" in kinds and kinds[-1] == "healthy"), kinds
    client.jobs.cancel(service.id)
    assert service.wait(timeout=180).status.value == "cancelled"
    # its slot freed, the second serves
    until_serving(client, second, f"{name}-2")
    client.jobs.cancel(second.id)
    assert second.wait(timeout=180).status.value == "cancelled"


def test_a_persistent_job_that_fails_by_itself_fails_and_is_not_run_again(client, idle):
    job = client.jobs.create(type="echo_service", input={"name": "quitter", "beat_seconds": 0.2, "fail_after": 3})
    job.wait(timeout=180)
    assert job.status.value == "failed" and "quitter gave up after 3 beats" in job.status_reason
    assert job.attempt == 1


def test_a_batch_job_released_ahead_of_the_busy_slot_never_takes_the_service_slot(client, idle):
    blocker = client.jobs.create(type="sleep", input={"seconds": 15})
    wait_until(lambda: client.jobs.get(blocker.id).status.value == "running", what="the blocker to run")
    behind = client.jobs.create(type="sleep", input={"seconds": 0})
    wait_until(lambda: client.jobs.get(behind.id).flow_run_id, what="a job released ahead of the slot")
    # the worker is woken by its run's Scheduled event, and polls every 2 s besides: it leaves the run for the slot
    time.sleep(3)
    assert client.jobs.get(behind.id).status.value == "queued"
    # and the service slot is there for a persistent job, at once
    name = f"svc-{uuid.uuid4().hex[:6]}"
    service = serving(client, name, beat_seconds=0.2)
    assert client.jobs.get(blocker.id).status.value == "running" and client.jobs.get(behind.id).started_at is None
    assert behind.wait(timeout=180).status.value == "completed"
    assert client.jobs.get(behind.id).started_at > blocker.wait(timeout=180).completed_at
    client.jobs.cancel(service.id)
    assert service.wait(timeout=180).status.value == "cancelled"
