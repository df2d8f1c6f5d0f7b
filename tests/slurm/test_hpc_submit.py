"""hpc_submit on a real SLURM: clusters, refusals, ntasks with per-task progress and merging, cancel, walltime."""

from __future__ import annotations

import json
import threading
import time

import httpx

from tests.integration import support
from tests.integration.support import SETTINGS, wait_until
from tests.slurm.conftest import kiln_cli, sacct, squeue


def submit(http, job_type: str, input: dict, **extra) -> dict:
    response = http.post("/api/v1/jobs", json={"type": job_type, "input": input, **extra})
    assert response.status_code == 202, response.text
    return response.json()


def job(http, job_id: str) -> dict:
    return http.get(f"/api/v1/jobs/{job_id}").json()


def wait_final(http, job_id: str, timeout: float) -> dict:
    return support.wait_final(http, job_id, timeout=timeout, interval=0.5)


def cancel_and_see_squeue_empty(http, job_id: str, name: str) -> None:
    """Cancels the job; its batch jobs (named `name`) must all leave squeue within 10 s."""
    cancelled_at = time.monotonic()
    assert http.post(f"/api/v1/jobs/{job_id}/cancel").status_code == 200
    wait_until(lambda: squeue(name) == [], timeout=10, interval=0.2, what="squeue to list none of the batch jobs")
    assert time.monotonic() - cancelled_at < 10


def collect_events(api_key: str, job_id: str, into: list) -> threading.Thread:
    """Reads the job's SSE stream to its end in a thread, keeping (event, data) pairs."""

    def read() -> None:
        headers = {"Authorization": f"Bearer {api_key}"}
        with httpx.stream("GET", f"{SETTINGS.api_url}/api/v1/jobs/{job_id}/events", headers=headers,
                          timeout=300) as response:
            event = None
            for line in response.iter_lines():
                if line.startswith("event: "):
                    event = line[7:]
                elif line.startswith("data: ") and event:
                    into.append((event, json.loads(line[6:])))
                    if event in ("completed", "failed", "cancelled"):
                        return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def test_clusters_are_registered_with_the_cli_and_listed(http, cluster):
    listed = http.get("/api/v1/clusters")
    assert listed.status_code == 200
    by_name = {c["name"]: c for c in listed.json()}
    assert by_name[cluster]["scheduler"] == "slurm"
    assert by_name[cluster]["queue"] == "debug"
    assert by_name[cluster]["walltime"] == "00:10:00"
    bad = kiln_cli("clusters", "add", "broken", "--scheduler", "slurm", "--walltime", "ten minutes", check=False)
    assert bad.returncode != 0
    assert "walltime" in bad.stderr
    assert "broken" not in {c["name"] for c in http.get("/api/v1/clusters").json()}

    kiln_cli("clusters", "add", "pbs-site", "--scheduler", "pbs", "--queue", "workq", "--account", "matsci")
    again = kiln_cli("clusters", "add", "pbs-site", "--scheduler", "pbs", check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr
    assert "pbs-site\tpbs\tqueue=workq" in kiln_cli("clusters", "list").stdout
    kiln_cli("clusters", "remove", "pbs-site")
    assert "pbs-site" not in {c["name"] for c in http.get("/api/v1/clusters").json()}


def test_what_a_cluster_cannot_meet_is_refused_at_submission(http, cluster):
    spin = {"callable": "spin", "kwargs": {"seconds": 1}}
    too_many_cores = http.post("/api/v1/jobs", json={
        "type": "hpc_submit", "input": spin, "compute_target": cluster, "resources": {"cpu_count": 64}})
    assert too_many_cores.status_code == 400
    assert "cpu_count=64" in too_many_cores.json()["detail"] and cluster in too_many_cores.json()["detail"]
    too_long = http.post("/api/v1/jobs", json={
        "type": "hpc_submit", "input": spin, "compute_target": cluster,
        "resources": {"max_timeout_run_ms": 3_600_000}})
    assert too_long.status_code == 400 and "walltime 00:10:00" in too_long.json()["detail"]
    unknown = http.post("/api/v1/jobs", json={"type": "hpc_submit", "input": spin, "compute_target": "nowhere"})
    assert unknown.status_code == 400
    assert "compute_target" in unknown.json()["detail"] and cluster in unknown.json()["detail"]
    no_target = http.post("/api/v1/jobs", json={"type": "hpc_submit", "input": spin})
    assert no_target.status_code == 400 and "compute_target" in no_target.json()["detail"]
    sleep_on_cluster = http.post("/api/v1/jobs", json={
        "type": "sleep", "input": {"seconds": 0}, "compute_target": cluster})
    assert sleep_on_cluster.status_code == 400 and "compute_target" in sleep_on_cluster.json()["detail"]
    unknown_callable = http.post("/api/v1/jobs", json={
        "type": "hpc_submit", "input": {"callable": "os:system"}, "compute_target": cluster})
    assert unknown_callable.status_code == 422 and "input.callable" in unknown_callable.json()["detail"]


def test_four_tasks_show_progress_then_merging_then_a_merged_output(http, api_key, cluster, idle):
    created = submit(http, "hpc_submit", {"callable": "spin", "kwargs": {"seconds": 6, "units": 12}, "ntasks": 4},
                     compute_target=cluster)
    events: list = []
    reader = collect_events(api_key, created["id"], events)

    # while it runs, the task table shows a task part-way through its units
    def part_way():
        assert job(http, created["id"])["status"] in ("pending", "queued", "running"), job(http, created["id"])
        tasks = http.get(f"/api/v1/jobs/{created['id']}/tasks").json()
        return any(0 < t["done_units"] < t["requested_units"] for t in tasks) and tasks

    tasks = wait_until(part_way, timeout=90, interval=0.2, what="a task part-way through")
    assert [t["task_id"] for t in tasks] == [1, 2, 3, 4]
    assert all(t["requested_units"] in (0, 12) for t in tasks)

    done = wait_final(http, created["id"], timeout=120)
    reader.join(timeout=30)
    assert done["status"] == "completed", done["status_reason"]
    output = done["output"]
    assert output["ntasks"] == 4 and len(output["outputs"]) == 4
    assert sorted(o["task_id"] for o in output["outputs"]) == [1, 2, 3, 4]
    assert 6 <= output["merged"]["seconds"]["mean"] < 9
    assert len(output["batch_jobs"]) == 4
    assert http.get(f"/api/v1/jobs/{created['id']}/tasks").json() == [
        {"task_id": i, "status": "completed", "done_units": 12, "requested_units": 12} for i in range(1, 5)
    ]

    statuses = [data["status"] for event, data in events if event == "status"]
    assert statuses.index("running") < statuses.index("merging")
    task_progress = [data["tasks"] for event, data in events if event == "progress" and data.get("tasks")]
    assert any(any(t["status"] == "running" for t in tasks) for tasks in task_progress)
    assert events[-1][0] == "completed"

    # SLURM's own accounting of the four batch jobs, named after the kiln job
    name = f"kiln-{created['id'][:8]}"
    accounted = wait_until(lambda: len(sacct(name)) == 4 and sacct(name), timeout=30, interval=0.5,
                           what="four batch jobs in sacct")
    assert set(accounted) == set(output["batch_jobs"])
    # each ends when kiln removes it after its task: scancel'd as it idles, or completed as it exits
    assert all(state.split()[0] in ("CANCELLED", "COMPLETED") for state in accounted.values())
    assert squeue(name) == []


def test_cancelling_removes_the_batch_jobs_within_ten_seconds(http, cluster, idle):
    created = submit(http, "hpc_submit", {"callable": "spin", "kwargs": {"seconds": 300}, "ntasks": 2},
                     compute_target=cluster)
    name = f"kiln-{created['id'][:8]}"
    wait_until(lambda: len(squeue(name)) == 2, timeout=60, interval=0.2, what="two batch jobs in squeue")
    wait_until(lambda: any(t["status"] == "running" for t in http.get(f"/api/v1/jobs/{created['id']}/tasks").json()),
               timeout=60, interval=0.2, what="a task running")
    cancel_and_see_squeue_empty(http, created["id"], name)
    assert wait_final(http, created["id"], timeout=30)["status"] == "cancelled"


def test_a_walltime_kill_fails_the_job_with_a_reason_saying_so(http, short_cluster, idle):
    created = submit(http, "hpc_submit", {"callable": "spin", "kwargs": {"seconds": 600}},
                     compute_target=short_cluster)
    done = wait_final(http, created["id"], timeout=240)
    assert done["status"] == "failed"
    assert "walltime (00:01:00)" in done["status_reason"]
    assert "TIMEOUT" in sacct(f"kiln-{created['id'][:8]}").values()
    assert squeue(f"kiln-{created['id'][:8]}") == []


def test_a_task_over_its_memory_fails_the_job_with_a_reason_saying_so(http, cluster, idle):
    # the cluster gives 1GB per batch job; Dask's nanny stops a worker at 95 % of it
    created = submit(http, "hpc_submit", {"callable": "allocate", "kwargs": {"gigabytes": 2.5, "hold_seconds": 30}},
                     compute_target=cluster)
    done = wait_final(http, created["id"], timeout=120)
    assert done["status"] == "failed"
    assert "more than its memory (1GB per batch job)" in done["status_reason"]
    assert "min_ram_gb" in done["status_reason"]
    assert squeue(f"kiln-{created['id'][:8]}") == []


def test_a_failing_task_names_itself_and_its_error(http, cluster, idle):
    created = submit(http, "hpc_submit", {"command": ["sh", "-c", "test $KILN_TASK_ID != 2 || exit 3"], "ntasks": 2},
                     compute_target=cluster)
    done = wait_final(http, created["id"], timeout=120)
    assert done["status"] == "failed"
    assert "task 2" in done["status_reason"] and "exited with 3" in done["status_reason"]


def test_a_failed_hpc_job_is_retried_as_its_max_retry_count_allows(http, cluster, idle):
    created = submit(http, "hpc_submit", {"command": ["sh", "-c", "exit 5"]}, compute_target=cluster,
                     resources={"max_retry_count": 1})
    done = wait_final(http, created["id"], timeout=180)
    assert done["status"] == "failed" and done["attempt"] == 2
    assert "task 1" in done["status_reason"] and "exited with 5" in done["status_reason"]


def test_cancelling_while_the_batch_jobs_still_wait_in_the_queue_removes_them(http, api_key, stack, slurm, idle):
    kiln_cli("clusters", "add", "slurm-later", "--scheduler", "slurm", "--queue", slurm, "--memory", "1GB",
             "--directive=--begin=now+3600", "--overwrite")
    created = submit(http, "hpc_submit", {"callable": "spin", "ntasks": 2}, compute_target="slurm-later")
    events: list = []
    reader = collect_events(api_key, created["id"], events)
    name = f"kiln-{created['id'][:8]}"
    wait_until(lambda: len(squeue(name)) == 2, timeout=60, interval=0.2, what="two batch jobs waiting in squeue")
    # the job's progress says why nothing runs yet, in the scheduler's words
    wait_until(lambda: any("waiting in the queue (BeginTime)" in (data.get("message") or "")
                           for event, data in events if event == "progress"),
               timeout=30, interval=0.2, what="a progress message saying the batch jobs wait")
    cancel_and_see_squeue_empty(http, created["id"], name)
    assert wait_final(http, created["id"], timeout=30)["status"] == "cancelled"
    reader.join(timeout=30)
