"""Crashes: a worker killed mid-job, and a Prefect server restarted mid-job. Runs last: it restarts parts."""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager

import pytest

from tests.integration.support import (
    DATABASE,
    SETTINGS,
    SlowPrefectApi,
    flow_run_state,
    flow_run_state_types,
    left_behind,
    wait_until,
)

# the request a kiln worker sends after it took a run (Pending) and before it starts it (Prefect's worker gives the
# run its labels): held, it keeps the run in submission on the worker
SUBMISSION_CALL = b"/labels HTTP/1.1"


def test_kill_9_of_the_worker_mid_job_fails_the_job_with_a_reason(client, stack, idle):
    job = client.jobs.create(type="sleep", input={"seconds": 20})
    wait_until(lambda: client.jobs.get(job.id).status.value == "running", what="the job to run")
    # released ahead of the busy slot (KILN_RELEASE_AHEAD): its run waits Scheduled, taken by no worker
    behind = client.jobs.create(type="sleep", input={"seconds": 0})
    wait_until(lambda: client.jobs.get(behind.id).flow_run_id, what="a job released ahead of the slot")
    stack.stop("worker", sig=signal.SIGKILL)
    job.wait(timeout=180)
    assert job.status.value == "failed"
    assert "stopped responding" in job.status_reason, job.status_reason
    assert flow_run_state(job.flow_run_id) == "CRASHED"
    # the lost worker never held it: it is not crashed, and the next worker runs it, on its first run
    behind = client.jobs.get(behind.id)
    assert behind.status.value == "queued" and flow_run_state(behind.flow_run_id) == "SCHEDULED"
    stack.start_worker()
    assert behind.wait(timeout=180).status.value == "completed" and behind.attempt == 1
    assert client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180).status.value == "completed"


def test_a_killed_job_with_retries_runs_again_on_a_new_worker(client, stack, idle):
    job = client.jobs.create(type="sleep", input={"seconds": 20}, resources={"max_retry_count": 1})
    wait_until(lambda: client.jobs.get(job.id).status.value == "running", what="the job to run")
    first_run = client.jobs.get(job.id).flow_run_id
    stack.stop("worker", sig=signal.SIGKILL)
    stack.start_worker()
    wait_until(lambda: client.jobs.get(job.id).attempt == 2, timeout=180, what="the retry")
    client.jobs.cancel(job.id)
    job.wait(timeout=180)
    assert job.status.value == "cancelled"
    assert flow_run_state(first_run) == "CRASHED"


def test_a_prefect_server_restart_mid_job_leaves_no_job_running(client, stack, idle):
    if SETTINGS.prefect_api_url:
        return
    jobs = [client.jobs.create(type="sleep", input={"seconds": 4}) for _ in range(2)]
    wait_until(lambda: client.jobs.get(jobs[0].id).status.value == "running", what="a job to run")
    stack.stop("prefect")
    time.sleep(2)
    stack.start_prefect()
    for job in jobs:
        job.wait(timeout=120)
        assert job.status.is_final, job.status
    # the relay resubscribed: a new job's events flow again
    after = client.jobs.create(type="sleep", input={"seconds": 0.5})
    kinds = [e.event for e in client.jobs.events(after.id)]
    assert kinds[-1] == "completed" and "progress" in kinds


def test_a_worker_runs_jobs_on_an_existing_dask_scheduler(client, stack, idle):
    from tests.integration.support import dask_cluster

    with dask_cluster(1, stack.env, stack.logs_dir / "dask.log") as address:
        try:
            stack.stop("worker")
            stack.start_worker(name="on-scheduler", extra=["--scheduler-address", address])
            job = client.jobs.create(type="sleep", input={"seconds": 0.2}).wait(timeout=180)
            assert job.status.value == "completed", job.status_reason
        finally:
            stack.stop("worker")
            stack.start_worker()


def test_a_dask_process_of_an_existing_cluster_killed_mid_job_fails_the_job_and_is_not_run_again(client, stack, idle):
    """That cluster's scheduler runs a task whose worker died again on another (Dask's allowed-failures is the
    cluster's setting, not kiln's): the second start is refused, and the job crashes as on kiln's own cluster."""
    import os

    import psutil
    from distributed import Client

    from tests.integration.support import dask_cluster

    with dask_cluster(2, stack.env, stack.logs_dir / "dask.log") as address:
        try:
            stack.stop("worker")
            stack.start_worker(name="on-scheduler", extra=["--scheduler-address", address])
            job = client.jobs.create(type="sleep", input={"seconds": 20})
            wait_until(lambda: client.jobs.get(job.id).status.value == "running", what="the job to run")
            prefix = f"kiln-{client.jobs.get(job.id).flow_run_id}-"  # each submission's key: kiln-<run id>-<8 hex>
            with Client(address, timeout=60) as external:
                def workers_running_it():
                    return [worker for worker, keys in external.processing().items()
                            if any(str(key).startswith(prefix) for key in keys)]
                (running_it,) = wait_until(workers_running_it, what="the job's task on the cluster")
                psutil.Process(external.run(os.getpid, workers=[running_it])[running_it]).kill()
            job.wait(timeout=180)
            assert job.status.value == "failed"
            assert "Dask worker process running this job died" in job.status_reason, job.status_reason
            assert flow_run_state(job.flow_run_id) == "CRASHED"
        finally:
            stack.stop("worker")
            stack.start_worker()


def test_a_dask_process_killed_mid_job_fails_the_job_with_a_reason(client, stack, idle):
    import psutil

    job = client.jobs.create(type="sleep", input={"seconds": 20})
    wait_until(lambda: client.jobs.get(job.id).status.value == "running", what="the job to run")
    worker = psutil.Process(stack.procs["worker"].pid)
    # the LocalCluster's worker processes, spawned by the nannies inside the kiln worker
    dask_processes = [p for p in worker.children() if "spawn_main" in " ".join(p.cmdline())]
    assert dask_processes
    for process in dask_processes:
        process.kill()
    job.wait(timeout=180)
    assert job.status.value == "failed"
    assert "Dask worker process running this job died" in job.status_reason, job.status_reason
    assert flow_run_state(job.flow_run_id) == "CRASHED"
    # the nanny brings a fresh process up, and the next job runs
    assert client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180).status.value == "completed"


def test_no_job_is_released_twice_across_a_dispatcher_restart(client, stack, idle):
    import httpx

    blocker = client.jobs.create(type="sleep", input={"seconds": 2})
    jobs = [client.jobs.create(type="sleep", input={"seconds": 0}) for _ in range(6)]
    stack.stop("api")
    stack.start_api()
    for job in [blocker, *jobs]:
        assert job.wait(timeout=120).status.value == "completed", job.status_reason
        runs = httpx.post(
            f"{SETTINGS.prefect_api}/flow_runs/filter",
            json={"flow_runs": {"tags": {"all_": [f"job:{job.id}"]}, "parent_task_run_id": {"is_null_": True}}},
        ).json()
        assert len(runs) == 1, f"job {job.id} has {len(runs)} flow runs"


async def test_releasing_the_same_attempt_again_returns_its_first_flow_run(client):
    from prefect.client.orchestration import get_client

    from kiln.dispatch.runs import create_job_run
    from kiln.store.store import Store

    job = client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180)
    store = Store(SETTINGS.job_index_url)
    try:
        row = await store.get_job(job.id, documents=True)
    finally:
        await store.close()
    async with get_client() as prefect:
        deployment = await prefect.read_deployment_by_name("sleep/kiln")
        again = await create_job_run(prefect, row, deployment.id, "alpha")
    assert str(again.id) == job.flow_run_id


async def test_a_job_failed_in_the_index_whose_run_completed_is_mended_after_a_restart(client, stack, idle):
    from sqlalchemy import update

    from kiln.store.models import JobRow
    from kiln.store.store import Store

    job = client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180)
    assert job.status.value == "completed"
    # what a relay that took the run's worker as lost believed, before the run completed: failed, no output
    store = Store(SETTINGS.job_index_url)
    try:
        async with store.session.begin() as s:
            await s.execute(update(JobRow).where(JobRow.id == job.id).values(
                status="failed", output=None, completed_at=job.started_at,
                status_reason="crashed: the kiln worker running this job stopped responding"))  # fmt: skip
    finally:
        await store.close()
    assert client.jobs.get(job.id).status.value == "failed"
    stack.stop("api")
    stack.start_api()
    # the reconcile after the restart compares recent failures with Prefect: the run completed, so the job is
    mended = wait_until(lambda: (now := client.jobs.get(job.id)).status.value == "completed" and now, timeout=180,
                        what="the reconcile to mend the job")  # fmt: skip
    assert mended.output == job.output and mended.flow_run_id == job.flow_run_id


def plugin_running(client, plugin: str):
    """A plugin_exec job whose container runs (it printed `ready`) until it is killed."""
    job = client.jobs.create(type="plugin_exec", input={"plugin": plugin, "args": ["echo ready; sleep 120"]})
    wait_until(lambda: any(e.data.get("message") == "ready" for e in client.jobs.events(job.id)
                           if e.event == "progress") if client.jobs.get(job.id).status.value == "running" else False,
               timeout=180, what="the plugin to start")  # fmt: skip
    return client.jobs.get(job.id)


@pytest.mark.skipif(DATABASE == "postgresql", reason="the sandbox's cleanup does not touch the database")
def test_kill_9_of_the_worker_mid_plugin_run_leaves_nothing_once_a_worker_starts(client, stack, idle, shell_plugin):
    job = plugin_running(client, shell_plugin)
    assert left_behind(job.flow_run_id) != []  # the container, its cgroups and bundle, while it runs
    stack.stop("worker", sig=signal.SIGKILL)
    job.wait(timeout=180)
    assert job.status.value == "failed", job.status_reason
    stack.start_worker()
    wait_until(lambda: left_behind(job.flow_run_id) == [], timeout=180, what="the new worker to clean up")


@pytest.mark.skipif(DATABASE == "postgresql", reason="the sandbox's cleanup does not touch the database")
def test_a_dask_process_killed_mid_plugin_run_leaves_nothing(client, stack, idle, shell_plugin):
    import psutil

    job = plugin_running(client, shell_plugin)
    worker = psutil.Process(stack.procs["worker"].pid)
    for process in worker.children():
        if "spawn_main" in " ".join(process.cmdline()):
            process.kill()
    job.wait(timeout=180)
    assert job.status.value == "failed" and "Dask worker process running this job died" in job.status_reason
    wait_until(lambda: left_behind(job.flow_run_id) == [], timeout=180, what="the worker to clean the run up")


def test_a_persistent_job_serves_again_after_its_worker_is_killed(client, stack, idle):
    job = client.jobs.create(type="echo_service", input={"name": "survivor", "beat_seconds": 0.2})
    wait_until(lambda: (client.jobs.get(job.id).status_reason or "").startswith("survivor: serving"), timeout=180,
               what="the service to serve")  # fmt: skip
    first_run = client.jobs.get(job.id).flow_run_id
    stack.stop("worker", sig=signal.SIGKILL)
    stack.start_worker()
    wait_until(lambda: client.jobs.get(job.id).attempt == 2 and (client.jobs.get(job.id).status_reason or "")
               .startswith("survivor: serving"), timeout=180, what="the service to serve again")  # fmt: skip
    assert flow_run_state(first_run) == "CRASHED"
    client.jobs.cancel(job.id)
    assert client.jobs.get(job.id).wait(timeout=180).status.value == "cancelled"


@contextmanager
def worker_with_a_slow_submission(stack, seconds: float):
    """The stack's worker restarted against a Prefect API whose first answer to SUBMISSION_CALL takes `seconds`;
    the ordinary worker again afterwards."""
    slow = SlowPrefectApi(SETTINGS.prefect_port, SUBMISSION_CALL, seconds)
    ordinary = stack.settings
    stack.stop("worker")
    stack.settings = ordinary.model_copy(update={"prefect_api_url": slow.api_url})
    try:
        stack.start_worker()
        yield slow
    finally:
        stack.settings = ordinary
        stack.stop("worker")
        slow.close()
        stack.start_worker()


def runs_of(job_id: str) -> list[dict]:
    import httpx

    return httpx.post(
        f"{SETTINGS.prefect_api}/flow_runs/filter",
        json={"flow_runs": {"tags": {"all_": [f"job:{job_id}"]}, "parent_task_run_id": {"is_null_": True}}},
    ).json()


def test_a_run_held_in_submission_past_the_lost_worker_window_runs_once(client, stack, idle):
    # the worker took the run and heartbeats all along: it is not lost, and its run is no orphan
    with worker_with_a_slow_submission(stack, SETTINGS.worker_lost_seconds + 6) as slow:
        job = client.jobs.create(type="sleep", input={"seconds": 0}, resources={"max_retry_count": 1})
        assert slow.holding.wait(60), "the worker never took the run"
        assert slow.released.wait(60)
        job.wait(timeout=180)
    assert job.status.value == "completed", job.status_reason
    assert job.attempt == 1, job.status_reason
    assert len(runs_of(job.id)) == 1
    assert "CRASHED" not in flow_run_state_types(job.flow_run_id)


def test_a_job_cancelled_while_its_run_is_held_in_submission_never_runs(client, stack, idle):
    with worker_with_a_slow_submission(stack, 4) as slow:
        job = client.jobs.create(type="sleep", input={"seconds": 0})
        assert slow.holding.wait(60), "the worker never took the run"
        client.jobs.cancel(job.id)
        assert job.wait(timeout=180).status.value == "cancelled"
        assert slow.released.wait(30)
        # the worker goes on with the held run, then takes the next job
        after = client.jobs.create(type="sleep", input={"seconds": 0}).wait(timeout=180)
        assert after.status.value == "completed", after.status_reason
    assert client.jobs.get(job.id).status.value == "cancelled"
    assert "RUNNING" not in flow_run_state_types(job.flow_run_id)
    assert flow_run_state(job.flow_run_id) == "CANCELLED"
