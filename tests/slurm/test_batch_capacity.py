"""A batch sent to a cluster with a slot capacity: counted through the batch, the rest refused; delete cleans SLURM."""

from __future__ import annotations

from tests.integration.support import wait_until
from tests.slurm.conftest import kiln_cli, squeue


def test_a_batch_fills_a_clusters_free_slots_and_fails_the_rest(http, slurm, idle):
    kiln_cli("clusters", "add", "slurm-5", "--scheduler", "slurm", "--queue", slurm, "--cores", "1",
             "--memory", "1GB", "--walltime", "00:10:00", "--max-jobs", "1", "--slots", "5", "--overwrite")  # fmt: skip
    spin = {"callable": "spin", "kwargs": {"seconds": 300}}
    entries = [{"job": {"type": "hpc_submit", "input": {**spin, "kwargs": {"seconds": 300 + i}}},
                "compute_target": "slurm-5"} for i in range(8)]  # fmt: skip
    response = http.post("/api/v1/jobs/submit-batch", json={"jobs": entries})
    assert response.status_code == 202, response.text
    result = response.json()
    assert (result["submitted"], result["failed"]) == (5, 3)
    assert [line["status"] for line in result["jobs"]] == ["submitted"] * 5 + ["failed"] * 3
    for index in (5, 6, 7):
        error = result["jobs"][index]["error"]
        assert error.startswith(f"jobs.{index}.compute_target") and "'slurm-5'" in error and "5" in error

    # one runs on the session's one slot: the first, or the one released ahead with it (their runs are made together,
    # so either may reach the worker first; README, "Priority bands"); deleting the batch cancels it and empties squeue
    ids = [line["job_id"] for line in result["jobs"][:5]]
    names = [f"kiln-{job_id[:8]}" for job_id in ids]
    running = wait_until(lambda: [name for name in names if squeue(name)], timeout=180, interval=0.5,
                         what="a batch job of the batch")  # fmt: skip
    assert len(running) == 1 and running[0] in names[:2], running
    assert http.delete(f"/api/v1/batches/{result['batch_id']}").status_code == 204
    wait_until(lambda: not any(squeue(name) for name in names), timeout=30, interval=0.5,
               what="squeue to empty after the delete")  # fmt: skip
    assert {http.get(f"/api/v1/jobs/{job_id}").status_code for job_id in ids} == {404}
    # its slots are free again
    again = http.post("/api/v1/jobs/submit-batch", json={"jobs": entries[:5]}).json()
    assert again["submitted"] == 5
    http.delete(f"/api/v1/batches/{again['batch_id']}").raise_for_status()
