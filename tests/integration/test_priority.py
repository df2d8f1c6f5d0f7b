"""With one worker slot, jobs run strictly by priority, first in first out within a priority."""

from __future__ import annotations

import random

from tests.integration.support import wait_until


def test_thirty_jobs_of_mixed_priorities_run_in_strict_order(client, idle):
    blocker = client.jobs.create(type="sleep", input={"seconds": 2})
    wait_until(lambda: client.jobs.get(blocker.id).status.value == "running", what="the blocker to run")
    rng = random.Random(7)
    priorities = [rng.choice([-5, 0, 0, 3, 10, 10, 100]) for _ in range(30)]
    submitted = [client.jobs.create(type="sleep", input={"seconds": 0}, priority=p) for p in priorities]
    finished = [job.wait(timeout=180) for job in submitted]
    assert all(job.status.value == "completed" for job in finished), [j.status_reason for j in finished]
    # expected: priority descending, and submission order within one priority
    expected = [job.id for _, _, job in sorted(((-p, i, j) for i, (p, j) in enumerate(zip(priorities, submitted))))]
    actual = [job.id for job in sorted(finished, key=lambda j: j.started_at)]
    assert actual == expected
