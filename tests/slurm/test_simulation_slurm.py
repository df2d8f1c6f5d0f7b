"""A simulation with a SLURM compute_target: an hpc_submit child (a Prefect subflow) runs MD replicas as batch jobs."""

from __future__ import annotations



import httpx

from tests.integration.support import SETTINGS, wait_until
from tests.slurm.conftest import sacct, squeue
from tests.slurm.test_hpc_submit import cancel_and_see_squeue_empty, collect_events, job, wait_final


def test_md_replicas_on_slurm_run_as_a_child_job_and_merge(http, api_key, cluster, idle):
    created = http.post("/api/v1/jobs", json={
        "type": "simulation", "compute_target": cluster,
        "input": {"calculation": "md", "structure": "Si", "ntasks": 4,
                  "md": {"ensemble": "NVT", "steps": 20, "sample_interval": 5, "trajectory_interval": 5}},
    })
    assert created.status_code == 202, created.text
    parent_id = created.json()["id"]
    events: list = []
    reader = collect_events(api_key, parent_id, events)

    children = wait_until(lambda: http.get(f"/api/v1/jobs/{parent_id}/children").json(), timeout=60,
                          interval=0.5, what="the hpc_submit child job")
    assert len(children) == 1 and children[0]["type"] == "hpc_submit"
    child_id = children[0]["id"]

    # the child's tasks are visible while they run, on the child and on the parent
    wait_until(lambda: len(http.get(f"/api/v1/jobs/{child_id}/tasks").json()) == 4, timeout=120, interval=0.5,
               what="the child's four tasks")
    wait_until(lambda: len(http.get(f"/api/v1/jobs/{parent_id}/tasks").json()) == 4, timeout=60, interval=0.5,
               what="the four tasks on the parent")

    done = wait_final(http, parent_id, timeout=400)
    reader.join(timeout=30)
    assert done["status"] == "completed", done["status_reason"]
    out = done["output"]
    assert out["where"] == cluster and len(out["batch_jobs"]) == 4
    assert [r["replica"] for r in out["replicas"]] == [1, 2, 3, 4]
    assert len({r["seed"] for r in out["replicas"]}) == 4
    merged = out["merged"]
    assert merged["replicas"] == 4 and merged["final_potential"]["std"] > 0
    assert merged["trajectory"]["frames"] == 4 * 5  # steps 0, 5, …, 20 of each replica
    statuses = [data["status"] for event, data in events if event == "status"]
    assert "merging" in statuses

    child = job(http, child_id)
    assert child["status"] == "completed" and child["parent_id"] == parent_id
    assert child["compute_target"] == cluster
    assert [t["status"] for t in http.get(f"/api/v1/jobs/{child_id}/tasks").json()] == ["completed"] * 4
    assert [t["status"] for t in http.get(f"/api/v1/jobs/{parent_id}/tasks").json()] == ["completed"] * 4
    assert any(data.get("tasks") for event, data in events if event == "progress")
    # in Prefect the child is a subflow of the parent's flow run
    child_run = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{child['flow_run_id']}", timeout=10).json()
    assert child_run["parent_task_run_id"] is not None
    parent_task = httpx.get(f"{SETTINGS.prefect_api}/task_runs/{child_run['parent_task_run_id']}", timeout=10).json()
    assert parent_task["flow_run_id"] == done["flow_run_id"]
    accounted = wait_until(lambda: len(sacct(f"kiln-{child_id[:8]}")) == 4 and sacct(f"kiln-{child_id[:8]}"),
                           timeout=30, interval=0.5, what="four batch jobs in sacct")
    assert set(accounted) == set(out["batch_jobs"])


def _running_on_slurm(http, steps: int, cluster: str) -> tuple[str, str, str]:
    created = http.post("/api/v1/jobs", json={
        "type": "simulation", "compute_target": cluster,
        "input": {"calculation": "md", "structure": "Si", "ntasks": 2, "md": {"steps": steps}},
    })
    assert created.status_code == 202, created.text
    parent_id = created.json()["id"]
    children = wait_until(lambda: http.get(f"/api/v1/jobs/{parent_id}/children").json(), timeout=60,
                          interval=0.5, what="the hpc_submit child job")
    child_id = children[0]["id"]
    name = f"kiln-{child_id[:8]}"
    wait_until(lambda: len(squeue(name)) == 2, timeout=60, interval=0.2, what="two batch jobs in squeue")
    return parent_id, child_id, name


def test_cancelling_the_simulation_removes_its_batch_jobs_within_ten_seconds(http, cluster, idle):
    parent_id, child_id, name = _running_on_slurm(http, 100_000, cluster)
    cancel_and_see_squeue_empty(http, parent_id, name)
    assert wait_final(http, parent_id, timeout=30)["status"] == "cancelled"
    assert job(http, child_id)["status"] == "cancelled"


def test_cancelling_the_child_alone_removes_its_batch_jobs_within_ten_seconds(http, cluster, idle):
    parent_id, child_id, name = _running_on_slurm(http, 100_000, cluster)
    cancel_and_see_squeue_empty(http, child_id, name)
    # the flow removes the batch jobs before its Cancelled state reaches the job index
    assert wait_final(http, child_id, timeout=30)["status"] == "cancelled"
    parent = wait_final(http, parent_id, timeout=60)
    assert parent["status"] == "failed" and "cancelled" in parent["status_reason"]


def test_a_simulation_above_the_cost_limit_goes_to_the_configured_cluster(http, cluster, idle):
    from kiln.schemas.simulation import LOCAL_COST_LIMIT

    steps = LOCAL_COST_LIMIT // (64 * 2) + 1  # 64 atoms × 2 replicas: just above the limit
    created = http.post("/api/v1/jobs", json={
        "type": "simulation",
        "input": {"calculation": "md", "structure": "Si", "supercell": [2, 2, 2], "ntasks": 2, "md": {"steps": steps}},
    })
    assert created.status_code == 202, created.text
    parent_id = created.json()["id"]
    children = wait_until(lambda: http.get(f"/api/v1/jobs/{parent_id}/children").json(), timeout=60,
                          interval=0.5, what="the hpc_submit child job")
    assert children[0]["type"] == "hpc_submit" and children[0]["compute_target"] == cluster
    assert children[0]["input"]["callable"] == "simulation" and children[0]["input"]["ntasks"] == 2
    name = f"kiln-{children[0]['id'][:8]}"
    wait_until(lambda: len(squeue(name)) == 2, timeout=60, interval=0.2, what="two batch jobs in squeue")
    cancel_and_see_squeue_empty(http, parent_id, name)


def test_a_small_simulation_without_compute_target_stays_local(http, cluster, idle):
    created = http.post("/api/v1/jobs", json={
        "type": "simulation", "input": {"calculation": "single_point", "molecule": "H2O"}})
    assert created.status_code == 202, created.text
    done = wait_final(http, created.json()["id"], timeout=120)
    assert done["status"] == "completed", done["status_reason"]
    assert done["output"]["where"] == "local" and "within the local limit" in done["output"]["placement"]
    assert http.get(f"/api/v1/jobs/{done['id']}/children").json() == []
