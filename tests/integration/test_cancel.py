"""Cancellation: a pending job never starts, nor does one released ahead of the busy slots; a running one and its
children end cancelled in kiln and Prefect."""

from __future__ import annotations

import time

import pytest

from kiln.errors import Conflict
from tests.integration.support import RELEASE_AHEAD, flow_run_state, flow_run_state_types, wait_until

def test_a_pending_job_is_cancelled_at_once_and_never_runs(client, idle):
    blocker = client.jobs.create(type="sleep", input={"seconds": 2})
    # the jobs released ahead of the busy slot (KILN_RELEASE_AHEAD) go first; the next one waits pending
    for _ in range(RELEASE_AHEAD):
        client.jobs.create(type="sleep", input={"seconds": 0})
    pending = client.jobs.create(type="sleep", input={"seconds": 0})
    cancelled = client.jobs.cancel(pending.id)
    assert cancelled.status.value == "cancelled"
    assert cancelled.status_reason == "cancelled by request"
    blocker.wait(timeout=180)
    time.sleep(1)
    after = client.jobs.get(pending.id)
    assert after.status.value == "cancelled" and after.flow_run_id is None and after.started_at is None


def test_a_job_released_ahead_of_the_busy_slot_is_cancelled_and_its_run_never_starts(client, idle):
    blocker = client.jobs.create(type="sleep", input={"seconds": 3})
    wait_until(lambda: client.jobs.get(blocker.id).status.value == "running", what="the blocker to run")
    ahead = client.jobs.create(type="sleep", input={"seconds": 0})
    wait_until(lambda: client.jobs.get(ahead.id).flow_run_id, what="the job to be released ahead of the slot")
    ahead = client.jobs.get(ahead.id)
    assert ahead.status.value == "queued" and flow_run_state(ahead.flow_run_id) == "SCHEDULED"
    client.jobs.cancel(ahead.id)
    wait_until(lambda: client.jobs.get(ahead.id).status.value == "cancelled", timeout=10, what="the job cancelled")
    assert flow_run_state(ahead.flow_run_id) == "CANCELLED"
    # the slot frees, and the next job takes it; the cancelled one never started
    after = client.jobs.create(type="sleep", input={"seconds": 0})
    assert blocker.wait(timeout=180).status.value == "completed"
    assert after.wait(timeout=180).status.value == "completed"
    ahead = client.jobs.get(ahead.id)
    assert ahead.status.value == "cancelled" and ahead.started_at is None, ahead.status_reason
    assert ahead.status_reason == "cancelled by request"
    assert "RUNNING" not in flow_run_state_types(ahead.flow_run_id)


def test_a_running_job_and_its_children_are_cancelled_within_five_seconds(client, idle):
    parent = client.jobs.create(type="sleep", input={"seconds": 2, "children": 3})
    # the first child runs once the parent has slept its own 2 s
    children = wait_until(lambda: client.jobs.children(parent.id), timeout=180, what="a child job")
    wait_until(lambda: client.jobs.get(children[0].id).status.value == "running", what="the child to run")
    started = time.monotonic()
    client.jobs.cancel(parent.id)
    wait_until(lambda: client.jobs.get(parent.id).status.value == "cancelled", timeout=5, what="parent cancelled")
    assert time.monotonic() - started < 5
    parent = client.jobs.get(parent.id)
    assert flow_run_state(parent.flow_run_id) == "CANCELLED"
    for child in client.jobs.children(parent.id):
        assert child.status.value == "cancelled", child.status_reason
        assert flow_run_state(child.flow_run_id) == "CANCELLED"
    assert len(client.jobs.children(parent.id)) == 1, "no further child may start after the cancel"


def test_cancelling_a_finished_job_is_a_conflict(client):
    job = client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180)
    with pytest.raises(Conflict, match="already completed"):
        client.jobs.cancel(job.id)
