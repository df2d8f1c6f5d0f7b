"""With one worker slot, jobs run by priority, first in first out within a priority: strictly, but for the jobs the
dispatcher had released ahead of the busy slot (KILN_RELEASE_AHEAD; unset, as many as the worker's slots), which
only a job of a higher band released later can pass."""

from __future__ import annotations

import random

from deployments.project import load_project
from tests.integration.support import RELEASE_AHEAD, wait_until

def test_thirty_jobs_of_mixed_priorities_run_in_strict_order_behind_the_jobs_released_ahead(client, idle):
    blocker = client.jobs.create(type="sleep", input={"seconds": 6})
    wait_until(lambda: client.jobs.get(blocker.id).status.value == "running", what="the blocker to run")
    rng = random.Random(7)
    priorities = [rng.choice([-5, 0, 0, 3, 10, 10, 100]) for _ in range(30)]
    submitted = [client.jobs.create(type="sleep", input={"seconds": 0}, priority=p) for p in priorities]
    assert client.jobs.get(blocker.id).status.value == "running", "the blocker must hold the slot while all are submitted"
    finished = [job.wait(timeout=180) for job in submitted]
    assert all(job.status.value == "completed" for job in finished), [j.status_reason for j in finished]
    blocker.wait(timeout=180)
    # released while the blocker held the slot: the bound's worth, filled from the jobs submitted by then
    ahead = {job.id for job in finished if job.queued_at < blocker.completed_at}
    assert len(ahead) == RELEASE_AHEAD
    started = {job.id: job.started_at for job in finished}
    actual = sorted(started, key=started.get)
    # every other job: priority descending, and submission order within one priority
    expected = [job.id for _, _, job in sorted((-p, i, j) for i, (p, j) in enumerate(zip(priorities, submitted))
                                               if j.id not in ahead)]  # fmt: skip
    assert [job_id for job_id in actual if job_id not in ahead] == expected
    # a job released ahead goes before every later one of its band or a lower one; a job of a higher band released
    # after it may pass it (a worker takes Prefect's Scheduled runs band first), as the README says
    project = load_project()
    band = {job.id: project.band_for(p).prefect_priority for p, job in zip(priorities, submitted)}
    for early in ahead:
        passed_by = [j for j in actual if started[j] < started[early] and j not in ahead]
        assert all(band[j] < band[early] for j in passed_by), (early, passed_by)
