"""Prefect is the engine of record: actions taken on a kiln run in Prefect show on its job, and kiln's job events
start Prefect automations (the trigger example of prefect.yaml)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tests.integration.support import HOME, SETTINGS, flow_run_state, wait_final, wait_until
from tests.integration.test_batches import new_project


def set_run_state(flow_run_id: str, state: dict) -> None:
    """What the Prefect UI does to a run: a forced state through Prefect's own API."""
    response = httpx.post(f"{SETTINGS.prefect_api}/flow_runs/{flow_run_id}/set_state",
                          json={"state": state, "force": True}, timeout=10)  # fmt: skip
    response.raise_for_status()


def wait_status(http: httpx.Client, job_id: str, status: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (job := http.get(f"/api/v1/jobs/{job_id}").json())["status"] == status and job,
                      timeout=timeout, what=f"job {job_id} to be {status}")  # fmt: skip


def test_a_run_cancelled_in_prefect_cancels_its_job(http, idle):
    job = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 60}}).json()
    running = wait_status(http, job["id"], "running")
    set_run_state(running["flow_run_id"], {"type": "CANCELLING", "message": "cancelled in the Prefect UI"})
    done = wait_final(http, job["id"], timeout=180)
    assert done["status"] == "cancelled" and "Prefect UI" in done["status_reason"]
    assert flow_run_state(done["flow_run_id"]) == "CANCELLED"


def test_a_failed_run_retried_in_prefect_runs_its_job_again(http, idle):
    job = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0.2, "fail": True}}).json()
    failed = wait_final(http, job["id"])
    assert failed["status"] == "failed"
    # the Prefect UI's Retry: the run goes back to Scheduled (AwaitingRetry) and a worker takes it again
    set_run_state(failed["flow_run_id"], {"type": "SCHEDULED", "name": "AwaitingRetry"})
    again = wait_until(lambda: (j := http.get(f"/api/v1/jobs/{job['id']}").json())["completed_at"] != failed[
        "completed_at"] and j["status"] == "failed" and j, timeout=180, what="the retried run to end")  # fmt: skip
    assert again["flow_run_id"] == failed["flow_run_id"] and "fail=true" in again["status_reason"]
    events = [e for e in _events(http, job["id"]) if e[0] in ("status", "failed")]
    statuses = [data.get("status", kind) for kind, data in events]
    # failed, then back through queued/running (reopened), then failed again
    first = statuses.index("failed")
    assert "running" in statuses[first:] and statuses[-1] == "failed", statuses
    run = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{failed['flow_run_id']}", timeout=10).json()
    assert run["run_count"] == 2


def _events(http: httpx.Client, job_id: str) -> list[tuple[str, dict]]:
    """Every event of the job: the stream ends at a terminal event, and resuming after it gives what followed."""
    found, last = [], None
    while True:
        headers = {"Last-Event-ID": last} if last else {}
        with http.stream("GET", f"/api/v1/jobs/{job_id}/events", headers=headers, timeout=10) as response:
            if response.status_code == 204:
                return found
            kind = None
            for line in response.iter_lines():
                if line.startswith("id: "):
                    last = line[4:]
                elif line.startswith("event: "):
                    kind = line[7:]
                elif line.startswith("data: "):
                    found.append((kind, json.loads(line[6:])))


def test_a_completed_ml_predict_job_triggers_a_simulation_through_a_prefect_deployment_trigger(tmp_path, idle):
    http, name = new_project()
    project_file = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    (example,) = [d for d in project_file["deployments"] if d.get("triggers")]
    # the shipped example, turned on, for this test's project
    deployment = f"relax-after-ml-predict-{name}"
    trigger = {**example["triggers"][0], "enabled": True}
    trigger["match"] = {**trigger["match"], "kiln.project": name}
    trigger["parameters"] = {"input": {**trigger["parameters"]["input"], "relax": {"steps": 20}}}
    project_file["deployments"] = [{**example, "name": deployment, "triggers": [trigger],
                                    "tags": ["kiln", "type:simulation", f"project:{name}"]}]  # fmt: skip
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(project_file))
    deployed = subprocess.run([sys.executable, "-m", "kiln.cli", "deploy", "--file", str(path)], capture_output=True,
                              text=True, env={**os.environ, "KILN_HOME": HOME})  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    try:
        predicted = http.post("/api/v1/jobs", json={"type": "ml_predict", "input": {"structure": "Si"}}).json()
        assert wait_final(http, predicted["id"], timeout=120)["status"] == "completed"
        simulation = wait_until(lambda: (http.get("/api/v1/jobs", params={"type": "simulation"}).json()["jobs"]
                                         or [None])[0], timeout=180, interval=1,
                                what="the trigger's simulation run to become a job")  # fmt: skip
        done = wait_final(http, simulation["id"], timeout=180)
        assert done["status"] == "completed", done["status_reason"]
        assert done["input"]["structure"] == "Si" and done["input"]["calculation"] == "relax"
        assert done["output"]["final_structure"]
    finally:
        asyncio.run(_delete_deployment(f"simulation/{deployment}"))


async def _delete_deployment(name: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        await client.delete_resource_owned_automations(f"prefect.deployment.{deployment.id}")
        await client.delete_deployment(deployment.id)
