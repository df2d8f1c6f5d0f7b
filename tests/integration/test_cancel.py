"""Cancellation: a pending job never starts; a running one and its children end cancelled in kiln and Prefect."""

from __future__ import annotations

import time

import pytest

from kiln.errors import Conflict
from tests.integration.support import flow_run_state, wait_until


def test_a_pending_job_is_cancelled_at_once_and_never_runs(client, idle):
    blocker = client.jobs.create(type="sleep", input={"seconds": 2})
    pending = client.jobs.create(type="sleep", input={"seconds": 0})
    cancelled = client.jobs.cancel(pending.id)
    assert cancelled.status.value == "cancelled"
    assert cancelled.status_reason == "cancelled by request"
    blocker.wait(timeout=60)
    time.sleep(1)
    after = client.jobs.get(pending.id)
    assert after.status.value == "cancelled" and after.flow_run_id is None and after.started_at is None


def test_a_running_job_and_its_children_are_cancelled_within_five_seconds(client, idle):
    parent = client.jobs.create(type="sleep", input={"seconds": 2, "children": 3})
    # the first child runs once the parent has slept its own 2 s
    children = wait_until(lambda: client.jobs.children(parent.id), timeout=60, what="a child job")
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
    job = client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=60)
    with pytest.raises(Conflict, match="already completed"):
        client.jobs.cancel(job.id)
