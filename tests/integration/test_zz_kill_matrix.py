"""The kill matrix: kill -9 of each part of the stack, and a PostgreSQL restart, in the middle of a 200-job batch.

Each job is a `ledger` job (tests/fixtures/echo_job_type) that appends `<job id> <attempt> <pid>` to a file and sleeps.
Whatever is killed, every job ends; the job index agrees with Prefect, run by run; each job's side effect happened once
per attempt that ran, the attempts being those its max_retry_count allows; and the stack runs the rest of the batch.
Runs after the other tests but the resilience ones (it restarts parts), on PostgreSQL: the production setup, and the
only one where the database itself can restart.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from kiln.dispatch.runs import status_of_state
from tests.integration.kills import PARTS, kill
from tests.integration.support import DATABASE, SETTINGS, create_key, wait_until

pytestmark = pytest.mark.skipif(
    DATABASE != "postgresql", reason="the kill matrix runs in the PostgreSQL pass: it restarts PostgreSQL itself"
)

BATCH = 200
# worker slots while the module runs: the session's one slot would take the five batches past the module's budget
SLOTS = 4
# the job's sleep, short so that five batches stay within minutes, long enough that kills find jobs mid-run
SECONDS = (0.1, 0.2, 0.3)
# max_retry_count of the batch's jobs, in turn: jobs a kill crashes run again, or not, as each allows
RETRIES = (0, 1, 2)
# the kill comes when about a quarter of the batch has completed
KILL_AFTER = BATCH // 4
FINAL = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def worker_slots(stack):
    """The session's worker, restarted with SLOTS slots for the module; with its one slot again afterwards."""
    stack.stop("worker")
    stack.start_worker(extra=["--slots", str(SLOTS)])
    yield
    stack.stop("worker")
    stack.start_worker()


def submit_batch(http: httpx.Client, log: Path) -> tuple[str, list[str]]:
    entries = [
        {"job": {"type": "ledger", "input": {"log": str(log), "seconds": SECONDS[i % len(SECONDS)]},
                 "resources": {"max_retry_count": RETRIES[i % len(RETRIES)]}}}
        for i in range(BATCH)
    ]  # fmt: skip
    response = http.post("/api/v1/jobs/submit-batch", json={"jobs": entries})
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["submitted"] == BATCH, body
    return body["batch_id"], [line["job_id"] for line in body["jobs"]]


def counts(http: httpx.Client, batch_id: str) -> dict[str, int] | None:
    """The batch's counts; None while the API does not answer (it is being restarted, or PostgreSQL is)."""
    try:
        response = http.get(f"/api/v1/batches/{batch_id}")
    except httpx.HTTPError:
        return None
    return response.json()["counts"] if response.status_code == 200 else None


def batch_ended(http: httpx.Client, batch_id: str) -> bool:
    now = counts(http, batch_id)
    return now is not None and not any(now[status] for status in ("pending", "queued", "running", "merging"))


def batch_jobs(http: httpx.Client, batch_id: str) -> dict[str, dict]:
    response = http.get(f"/api/v1/batches/{batch_id}/jobs", params={"limit": 1000})
    assert response.status_code == 200, response.text
    page = response.json()
    assert page["next_cursor"] is None
    return {job["id"]: job for job in page["jobs"]}


def flow_runs_of(project: str) -> dict[str, list[dict]]:
    """Job id → its top-level flow runs in Prefect (one per attempt), oldest first."""
    runs: list[dict] = []
    while True:
        response = httpx.post(
            f"{SETTINGS.prefect_api}/flow_runs/filter",
            json={"flow_runs": {"tags": {"all_": [f"project:{project}"]}, "parent_task_run_id": {"is_null_": True}},
                  "limit": 200, "offset": len(runs)},
            timeout=30,
        )  # fmt: skip
        response.raise_for_status()
        page = response.json()
        runs += page
        if len(page) < 200:
            break
    by_job: dict[str, list[dict]] = {}
    for run in sorted(runs, key=lambda run: run["created"]):
        job_id = next(tag[4:] for tag in run["tags"] if tag.startswith("job:"))
        by_job.setdefault(job_id, []).append(run)
    return by_job


def ledger(log: Path) -> list[tuple[str, int, int]]:
    """The side effects: (job id, attempt, pid) per line."""
    if not log.exists():
        return []
    # the last piece is empty, or a line still being written
    lines = log.read_text().split("\n")[:-1]
    return [(job, int(attempt), int(pid)) for job, attempt, pid in (line.split() for line in lines)]


def job_running_now(log: Path) -> tuple[str, int]:
    """The job whose line comes next, and its Dask process: read within milliseconds of its write, while the job
    sleeps after it (at least SECONDS[0]), so that the kill comes in the middle of a job."""
    seen = len(ledger(log))
    job_id, _, pid = wait_until(lambda: (lines := ledger(log))[seen:] and lines[-1], timeout=120, interval=0.005,
                                what="a job to write its line")  # fmt: skip
    return job_id, pid


def problems_of(jobs: dict[str, dict], runs: dict[str, list[dict]], lines: list[tuple[str, int, int]]) -> list[str]:
    """Every way the batch's end contradicts Prefect or the side-effect log, in words; empty when it agrees."""
    problems = []
    written = Counter((job, attempt) for job, attempt, _ in lines)
    problems += [f"job {job} attempt {attempt} wrote its line {n} times" for (job, attempt), n in written.items() if n > 1]
    problems += [f"a line of job {job}, not of the batch" for job, _ in written if job not in jobs]
    for job_id, job in jobs.items():
        allowed = 1 + job["resources"]["max_retry_count"]
        its_runs = runs.get(job_id, [])
        attempts = sorted(attempt for job, attempt in written if job == job_id)
        if job["status"] not in FINAL:
            problems.append(f"job {job_id} did not end: {job['status']} ({job['status_reason']})")
            continue
        if job["attempt"] > allowed:
            problems.append(f"job {job_id} ran {job['attempt']} attempts; its max_retry_count allows {allowed}")
        if len(its_runs) != job["attempt"]:
            problems.append(f"job {job_id} is at attempt {job['attempt']} with {len(its_runs)} flow runs in Prefect")
        if any(attempt > job["attempt"] for attempt in attempts):
            problems.append(f"job {job_id} at attempt {job['attempt']} wrote lines of attempts {attempts}")
        if job["status"] == "completed" and job["attempt"] not in attempts:
            problems.append(f"job {job_id} completed at attempt {job['attempt']} without its side effect ({attempts})")
        if not its_runs:
            continue
        last = its_runs[-1]
        if job["flow_run_id"] != last["id"]:
            problems.append(f"job {job_id} runs on {job['flow_run_id']}, its newest flow run is {last['id']}")
        mirrored = status_of_state(last["state"]["type"], last["state"]["name"])
        if mirrored is None or mirrored.value != job["status"]:
            problems.append(f"job {job_id} is {job['status']} ({job['status_reason']}), its flow run {last['id']} "
                            f"is {last['state']['type']} ({last['state']['message']})")  # fmt: skip
        for earlier in its_runs[:-1]:
            # an attempt is retried only after it failed or crashed
            if earlier["state"]["type"] not in ("FAILED", "CRASHED"):
                problems.append(f"job {job_id} was retried after its flow run {earlier['id']} was "
                                f"{earlier['state']['type']}")  # fmt: skip
    return problems


@pytest.mark.parametrize("part", PARTS)
def test_a_kill_mid_batch_leaves_every_job_ended_once_and_the_stack_running(part, stack, worker_slots, idle,
                                                                             tmp_path):  # fmt: skip
    project = f"kill-{part}-{uuid.uuid4().hex[:6]}"
    log = tmp_path / "ledger.txt"
    with httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {create_key(project)}"},
                      timeout=60) as http:  # fmt: skip
        started = time.monotonic()
        batch_id, job_ids = submit_batch(http, log)
        wait_until(lambda: (now := counts(http, batch_id)) and now["succeeded"] >= KILL_AFTER, timeout=300,
                   interval=0.2, what=f"{KILL_AFTER} jobs of the batch to complete")  # fmt: skip
        running, pid = job_running_now(log)
        killed_at = time.monotonic()
        did = kill(stack, part, dask_pid=pid)
        back_at = time.monotonic()
        # the batch goes on to its end: a bound on waiting, not a speed goal
        wait_until(lambda: batch_ended(http, batch_id), timeout=900, interval=1, what=f"the batch to end after {did}")
        ended_at = time.monotonic()
        jobs = batch_jobs(http, batch_id)
    assert sorted(jobs) == sorted(job_ids)
    runs = flow_runs_of(project)
    problems = problems_of(jobs, runs, ledger(log))
    assert not problems, f"after {did}:\n" + "\n".join(problems)
    outcome = Counter(job["status"] for job in jobs.values())
    hit = runs[running][0]["state"]
    # what the kill did, for a reader of `pytest -s`
    print(f"\nthe job running at the kill ({running}): {jobs[running]['status']} at attempt {jobs[running]['attempt']}, "
          f"its first run {hit['type']} ({hit['message']})")
    print(f"\n{did}: {dict(outcome)}, {sum(job['attempt'] > 1 for job in jobs.values())} retried; killed "
          f"{killed_at - started:.0f} s after the batch, back {back_at - killed_at:.0f} s later, batch ended "
          f"{ended_at - back_at:.0f} s after that")
