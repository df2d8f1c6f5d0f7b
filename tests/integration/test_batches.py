"""Batches through the real stack: partial success, cache hits, quotas, rate limits and the batches API."""

from __future__ import annotations

import subprocess
import sys
import uuid

import httpx
import pytest

from tests.integration.support import SETTINGS, create_key, wait_until


def new_project() -> tuple[httpx.Client, str]:
    """Raw HTTP for a project of its own (its own cache, budget and rate-limit count), and its name."""
    name = f"batch-{uuid.uuid4().hex[:8]}"
    key = create_key(name)
    return httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60), name


def sleep_entry(seconds: float, **job) -> dict:
    return {"job": {"type": "sleep", "input": {"seconds": seconds}, **job}}


def counts(http: httpx.Client, batch_id: str) -> dict[str, int]:
    response = http.get(f"/api/v1/batches/{batch_id}")
    assert response.status_code == 200, response.text
    return response.json()["counts"]


def test_a_repeated_single_job_is_a_cache_hit_until_refreshed_or_invalidated(idle):
    http, _ = new_project()
    first = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0.01}}).json()
    wait_until(lambda: http.get(f"/api/v1/jobs/{first['id']}").json()["status"] == "completed", timeout=180)
    output = http.get(f"/api/v1/jobs/{first['id']}").json()["output"]

    # the same input written differently (a float as an int, a default spelled out) is the same calculation
    again = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0.010, "children": 0}})
    assert again.status_code == 202
    assert again.json()["status"] == "cache_hit" and again.json()["output"] == output
    assert again.json()["flow_run_id"] is None
    entries = http.get("/api/v1/cache", params={"type": "sleep"}).json()
    assert [e["job_id"] for e in entries] == [first["id"]]

    # refresh runs it again
    batch = http.post("/api/v1/jobs/submit-batch", json={"jobs": [{**sleep_entry(0.01), "refresh": True}]}).json()
    assert batch["submitted"] == 1 and batch["cache_hits"] == 0

    http.delete("/api/v1/cache", params={"input_hash": entries[0]["input_hash"]}).raise_for_status()
    wait_until(lambda: counts(http, batch["batch_id"])["succeeded"] == 1, timeout=180)
    # the refreshed run completed and answers from now on; invalidate that too, and the next one runs
    (newer,) = http.get("/api/v1/cache", params={"input_hash": entries[0]["input_hash"]}).json()
    assert newer["job_id"] == batch["jobs"][0]["job_id"]
    http.delete("/api/v1/cache", params={"input_hash": newer["input_hash"]}).raise_for_status()
    assert http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0.01}}).json()["status"] == "pending"
    missing = http.delete("/api/v1/cache", params={"input_hash": "0" * 64})
    assert missing.status_code == 404 and "input_hash" in missing.json()["detail"]


def test_a_batch_over_the_budget_is_a_402_and_leaves_nothing(idle):
    http, name = new_project()
    subprocess.run([sys.executable, "-m", "kiln.cli", "projects", "budget", name, "--core-hours", "2"], check=True,
                   capture_output=True)  # fmt: skip
    too_much = http.post("/api/v1/jobs/submit-batch", json={"jobs": [sleep_entry(3600 + i) for i in range(3)]})
    assert too_much.status_code == 402, too_much.text
    assert "2" in too_much.json()["detail"] and "nothing was submitted" in too_much.json()["detail"]
    assert http.get("/api/v1/jobs").json()["jobs"] == [] and http.get("/api/v1/batches").json() == []

    fits = http.post("/api/v1/jobs/submit-batch", json={"jobs": [sleep_entry(0.2)]})
    assert fits.status_code == 202
    wait_until(lambda: counts(http, fits.json()["batch_id"])["succeeded"] == 1, timeout=180)
    # charged from the real run time, one core
    wait_until(lambda: http.get("/api/v1/quota").json()["used_core_hours"] > 0.2 / 3600, timeout=10)
    assert http.get("/api/v1/quota").json()["used_core_hours"] < 30 / 3600


def test_batches_are_rate_limited_per_key_and_size_limited():
    http, _ = new_project()
    too_big = http.post("/api/v1/jobs/submit-batch", json={"jobs": [sleep_entry(0)] * 1001})
    assert too_big.status_code == 413 and "1000" in too_big.json()["detail"]
    for _ in range(2):
        assert http.post("/api/v1/jobs/submit-batch", json={"jobs": [sleep_entry(0)]}).status_code == 202
    third = http.post("/api/v1/jobs/submit-batch", json={"jobs": [sleep_entry(0)]})
    assert third.status_code == 429, third.text
    assert 1 <= int(third.headers["retry-after"]) <= 60 and "2 per minute" in third.json()["detail"]
    # single submissions have their own limit, and another key its own count
    assert http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}}).status_code == 202
    assert new_project()[0].post("/api/v1/jobs/submit-batch", json={"jobs": [sleep_entry(0)]}).status_code == 202


def test_the_batches_api_lists_streams_and_deletes(idle):
    from kiln import Client

    key = create_key(f"batch-{uuid.uuid4().hex[:8]}")
    with Client(SETTINGS.api_url, key) as client:
        quick = client.submit_batch([{"type": "sleep", "input": {"seconds": 0}} for _ in range(3)],
                                    hardware={"cpu": 1, "memory_gb": 0.5})  # fmt: skip
        slow = client.submit_batch([{"type": "sleep", "input": {"seconds": 120 + i}} for i in range(3)])
        assert quick.submitted == 3 and slow.submitted == 3
        listed = {b.id: b for b in client.batches()}
        assert set(listed) == {quick.batch_id, slow.batch_id}
        assert listed[quick.batch_id].hardware.cpu == 1 and listed[quick.batch_id].size == 3
        job = client.jobs.get(quick.jobs[0].job_id)
        assert job.resources.cpu_count == 1 and job.resources.min_ram_gb == 0.5

        # the quick batch's stream ends when all its jobs have
        with httpx.stream("GET", f"{SETTINGS.api_url}/api/v1/batches/{quick.batch_id}/events",
                          headers={"Authorization": f"Bearer {key}"}, timeout=120) as stream:  # fmt: skip
            events = [line for line in stream.iter_lines() if line.startswith("data:")]
        assert '"succeeded": 3' in events[-1]

        wait_until(lambda: client.batch(slow.batch_id).counts["running"] == 1, timeout=180)
        client.delete_batch(slow.batch_id)
        running = slow.jobs[0].job_id
        assert slow.batch_id not in {b.id for b in client.batches()}
        with pytest.raises(Exception, match="not found"):
            client.jobs.get(running)
        client.submit_batches([{"type": "sleep", "input": {"seconds": 0}}] * 3, chunk=2)  # waits out the limit
        assert len(client.batches()) == 3
        http = httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {key}"})
        assert http.delete("/api/v1/batches").status_code == 204
        assert client.batches() == []
