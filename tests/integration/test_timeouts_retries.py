"""Resources the platform enforces: assign and run timeouts, and retries."""

from __future__ import annotations

from tests.integration.support import flow_run_state


def test_a_job_no_worker_can_take_fails_at_its_assign_timeout_saying_why(client):
    job = client.jobs.create(
        type="sleep", input={"seconds": 0}, resources={"gpu_count": 1, "max_timeout_assign_ms": 1500}
    )
    job.wait(timeout=180)
    assert job.status.value == "failed"
    assert job.status_reason.startswith("not picked up by a worker within 1.5 s (max_timeout_assign_ms=1500)")
    assert "no worker offers gpu_count=1" in job.status_reason


def test_a_job_past_its_run_timeout_fails_with_a_reason(client, idle):
    job = client.jobs.create(type="sleep", input={"seconds": 30}, resources={"max_timeout_run_ms": 2000})
    job.wait(timeout=180)
    assert job.status.value == "failed"
    assert "timeout" in job.status_reason.lower() and "2" in job.status_reason
    assert flow_run_state(job.flow_run_id) in ("FAILED", "CRASHED")


def test_a_failing_job_is_retried_as_its_policy_says(client, idle):
    job = client.jobs.create(type="sleep", input={"seconds": 0, "fail": True}, resources={"max_retry_count": 2})
    job.wait(timeout=180)
    assert job.status.value == "failed"
    assert job.attempt == 3
    assert "asked to fail" in job.status_reason
    kinds = [(e.event, e.data.get("status")) for e in client.jobs.events(job.id)]
    assert kinds.count(("status", "running")) == 3


def test_a_failed_job_without_retries_says_what_failed(client):
    job = client.jobs.create(type="sleep", input={"seconds": 0, "fail": True})
    job.wait(timeout=180)
    assert job.status.value == "failed" and job.attempt == 1
    assert "the sleep job was asked to fail" in job.status_reason
