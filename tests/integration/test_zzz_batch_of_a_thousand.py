"""The 1000-entry batch of the issue: 940 submitted, 50 cache hits, 10 failed, and all 940 run to completion.

In a file of its own that sorts last: its 940 runs leave Prefect's event pipeline busy for a while,
which would delay the progress events the tests after it wait for.
"""

from __future__ import annotations

import uuid

import pytest

from kiln.sdk import Client
from tests.integration.support import DATABASE, SETTINGS, wait_until
from tests.integration.test_batches import counts, new_project, sleep_entry


# 940 sleep jobs run one after another on the session's one slot (22 min in CI's PostgreSQL lane), so once per CI
# run, in the PostgreSQL pass; the other batch tests, bulk insert and cache included, run on both databases
@pytest.mark.skipif(DATABASE != "postgresql", reason="run once per CI run, in the PostgreSQL pass (22 min)")
def test_a_thousand_entries_with_bad_ones_and_repeats_all_run(idle):
    http, _ = new_project()
    # 50 finished jobs whose inputs the batch repeats
    finished = [http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": i * 1e-4}}).json()["id"]
                for i in range(50)]  # fmt: skip
    # a bound on waiting, not a speed goal
    wait_until(lambda: all(http.get(f"/api/v1/jobs/{j}").json()["status"] == "completed" for j in finished),
               timeout=360, interval=0.5, what="the 50 first jobs")  # fmt: skip

    bad = {7: {"job": {"type": "sleep", "input": {"seconds": -1}}},
           99: {"job": {"type": "no-such-type", "input": {}}},
           250: {"job": {"type": "sleep", "input": {"seconds": 0, "colour": "red"}}},
           400: {"job": {"type": "sleep"}, "refresh": "sometimes"},
           512: {"nope": 1},
           600: sleep_entry(0, priority="high"),
           700: {"job": {"type": "sleep", "input": {}}},
           801: {"job": {"type": "sleep", "input": {"seconds": "soon"}}},
           900: {"job": {"type": "sleep", "input": {"seconds": 0}, "parent_id": str(uuid.uuid4())}},
           999: {"job": {"type": "sleep", "input": {"seconds": 1e9}}}}  # fmt: skip
    repeats = {11 + 20 * i: sleep_entry(i * 1e-4) for i in range(50)}
    entries, fresh = [], 0
    for index in range(1000):
        if index in bad:
            entries.append(bad[index])
        elif index in repeats:
            entries.append(repeats[index])
        else:
            entries.append(sleep_entry(0.01 + fresh * 1e-6))  # distinct inputs, each a real run of ~0 s
            fresh += 1

    response = http.post("/api/v1/jobs/submit-batch", json={"jobs": entries})
    assert response.status_code == 202, response.text
    # a job submitted after the burst: every progress report of its flow comes before its end (kiln.run_reports)
    later = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 2}, "priority": 10}).json()
    result = response.json()
    assert (result["total"], result["submitted"], result["cache_hits"], result["failed"]) == (1000, 940, 50, 10)
    lines = result["jobs"]
    assert len(lines) == 1000
    for index in bad:
        assert lines[index]["status"] == "failed" and lines[index]["job_id"] is None
        assert lines[index]["error"].startswith(f"jobs.{index}"), lines[index]["error"]
    assert "jobs.7.job.input.seconds" in lines[7]["error"]
    assert "no-such-type" in lines[99]["error"] and "parent_id" in lines[900]["error"]
    for i, index in enumerate(repeats):
        assert lines[index]["status"] == "cache_hit" and lines[index]["state"] == "cache_hit"
        job = http.get(f"/api/v1/jobs/{lines[index]['job_id']}").json()
        source = http.get(f"/api/v1/jobs/{finished[i]}").json()
        assert job["status"] == "cache_hit" and job["output"] == source["output"] is not None
        assert finished[i] in job["status_reason"] and job["flow_run_id"] is None

    batch_id = result["batch_id"]
    seen = []

    def all_done() -> bool:
        now = counts(http, batch_id)
        seen.append(now)
        return now["succeeded"] == 940

    # a bound on waiting, not a speed goal (about 1 job/s on one slot under CI's two lanes)
    wait_until(all_done, timeout=1800, interval=1, what="the batch's 940 jobs to complete")
    # the counts add up to the batch's size at every reading, while jobs moved between them
    assert all(sum(c.values()) == 1000 for c in seen)
    assert len({tuple(sorted(c.items())) for c in seen}) > 2
    assert seen[-1] == {"pending": 0, "queued": 0, "running": 0, "merging": 0, "succeeded": 940, "failed": 10,
                        "cancelled": 0, "cache_hit": 50}  # fmt: skip
    with Client(SETTINGS.api_url, http.headers["Authorization"].removeprefix("Bearer ")) as own:
        events = list(own.jobs.events(later["id"]))
    assert events[-1].event == "completed", [e.event for e in events]
    assert [e.data["percent"] for e in events if e.event == "progress"] == [25.0, 50.0, 75.0, 100.0], events
    page = http.get(f"/api/v1/batches/{batch_id}/jobs", params={"limit": 400}).json()
    assert len(page["jobs"]) == 400 and page["next_cursor"]
    rest = http.get(f"/api/v1/batches/{batch_id}/jobs", params={"limit": 1000, "cursor": page["next_cursor"]}).json()
    assert len(page["jobs"]) + len(rest["jobs"]) == 990 and rest["next_cursor"] is None
