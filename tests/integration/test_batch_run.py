"""batch_run through the real stack: a batch read from a JSONL file or a directory of structures, submitted as the
job's children, and the same on a cron schedule applied from a prefect.yaml with `kiln deploy`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import yaml

from tests.integration.support import HOME, SETTINGS, wait_final, wait_until
from tests.integration.test_batches import new_project
from tests.integration.test_ml_predict import rock_salt


def write_jsonl(path: Path, tag: str) -> None:
    lines = [
        json.dumps({"job": {"type": "sleep", "input": {"seconds": 0.01}}}),
        "",  # blank lines are skipped
        json.dumps({"type": "sleep", "input": {"seconds": 0.02}, "priority": 5}),  # a bare job
        "{not json",
        json.dumps({"job": {"type": "sleep", "input": {"seconds": -1}}}),
        json.dumps({"job": {"type": "sleep", "input": {"seconds": 0.03, "children": 0}}, "refresh": True}),
        json.dumps(["neither", "an", "entry", tag]),
    ]
    path.write_text("\n".join(lines) + "\n")


def check_children_of(http: httpx.Client, job: dict, submitted: int) -> list[dict]:
    assert job["status"] == "completed", job["status_reason"]
    # the batch is the job's, under its id, and its jobs are the job's children
    batch = http.get(f"/api/v1/batches/{job['id']}").json()
    assert batch["parent_id"] == job["id"] and batch["submitted"] == submitted
    children = http.get(f"/api/v1/jobs/{job['id']}/children").json()
    assert len(children) == submitted and all(c["parent_id"] == job["id"] for c in children)
    wait_until(lambda: http.get(f"/api/v1/batches/{job['id']}").json()["counts"]["succeeded"] == submitted,
               timeout=120, interval=0.3, what="the batch's jobs to complete")  # fmt: skip
    return children


def test_a_batch_run_submits_a_jsonl_file_as_its_children_and_bad_lines_fail_alone(tmp_path, idle):
    http, _ = new_project()
    source = tmp_path / "screen.jsonl"
    write_jsonl(source, "x")
    created = http.post("/api/v1/jobs", json={"type": "batch_run", "input": {"source": str(source)}})
    assert created.status_code == 202, created.text
    job = wait_final(http, created.json()["id"], timeout=120)
    output = job["output"]
    assert (output["source"], output["batch_id"]) == (str(source), job["id"])
    assert (output["total"], output["submitted"], output["failed"]) == (6, 3, 3)
    lines = output["jobs"]
    assert [line["from"] for line in lines] == ["line 1", "line 3", "line 4", "line 5", "line 6", "line 7"]
    assert [line["status"] for line in lines] == ["submitted", "submitted", "failed", "failed", "submitted", "failed"]
    assert lines[2]["error"].startswith("jobs.2: line 4 of screen.jsonl is not JSON")
    assert lines[3]["error"].startswith("jobs.3.job.input.seconds")
    assert "neither a batch entry" in lines[5]["error"]
    children = check_children_of(http, job, submitted=3)
    assert {c["priority"] for c in children} == {0, 5}

    # a batch run is never a cache hit: the file may say something else next time
    again = http.post("/api/v1/jobs", json={"type": "batch_run", "input": {"source": str(source)}})
    assert again.json()["status"] == "pending"
    second = wait_final(http, again.json()["id"], timeout=120)
    assert second["output"]["batch_id"] == second["id"] and second["output"]["cache_hits"] == 2


def test_a_batch_run_over_a_directory_predicts_each_structure_and_a_missing_source_fails(tmp_path, idle):
    http, _ = new_project()
    folder = tmp_path / "candidates"
    folder.mkdir()
    rock_salt(5.64).to(filename=str(folder / "NaCl.cif"))
    rock_salt(5.70).to(filename=str(folder / "POSCAR_stretched"), fmt="poscar")
    (folder / "notes.txt").write_text("not a structure")
    created = http.post("/api/v1/jobs", json={"type": "batch_run", "input": {
        "source": str(folder), "job": {"type": "ml_predict", "model": "tensornet-matpes-pbe"}}})  # fmt: skip
    assert created.status_code == 202, created.text
    job = wait_final(http, created.json()["id"], timeout=120)
    assert [line["from"] for line in job["output"]["jobs"]] == ["NaCl.cif", "POSCAR_stretched"]
    children = check_children_of(http, job, submitted=2)
    outputs = [http.get(f"/api/v1/jobs/{c['id']}").json()["output"] for c in children]
    assert all(o["property"] == "energy" and o["energy"] < 0 and o["unit"] == "eV/atom" for o in outputs)

    missing = http.post("/api/v1/jobs", json={"type": "batch_run", "input": {"source": str(tmp_path / "nope")}})
    failed = wait_final(http, missing.json()["id"], timeout=120)
    assert failed["status"] == "failed" and "does not exist on the worker" in failed["status_reason"]
    assert http.get(f"/api/v1/jobs/{failed['id']}/children").json() == []


def test_a_batch_run_the_budget_cannot_cover_fails_and_submits_nothing(tmp_path, idle):
    http, name = new_project()
    subprocess.run([sys.executable, "-m", "kiln.cli", "projects", "budget", name, "--core-hours", "0.5"], check=True,
                   capture_output=True)  # fmt: skip
    source = tmp_path / "long.jsonl"
    source.write_text("\n".join(json.dumps({"type": "sleep", "input": {"seconds": 3600 + i}}) for i in range(2)))
    created = http.post("/api/v1/jobs", json={"type": "batch_run", "input": {"source": str(source)}})
    job = wait_final(http, created.json()["id"], timeout=120)
    assert job["status"] == "failed" and "nothing was submitted" in job["status_reason"]
    assert http.get(f"/api/v1/jobs/{job['id']}/children").json() == []
    assert http.get("/api/v1/batches").json() == []


def test_a_cron_deployment_in_the_project_file_runs_a_scheduled_batch_as_a_job(tmp_path, idle):
    http, name = new_project()
    source = tmp_path / "nightly.jsonl"
    source.write_text("\n".join(json.dumps({"type": "sleep", "input": {"seconds": 0.01 * (i + 1)}}) for i in range(4)))
    # the operator's prefect.yaml: kiln's own, with a scheduled batch run added
    project_file = yaml.safe_load((Path(__file__).resolve().parents[2] / "prefect.yaml").read_text())
    deployment = f"every-minute-{name}"
    project_file["deployments"].append({
        "name": deployment, "entrypoint": "flows/batch_run.py:batch_run", "tags": ["kiln", "type:batch_run",
        f"project:{name}"], "parameters": {"input": {"source": str(source)}}, "schedules": [{"cron": "* * * * *",
        "timezone": "UTC"}], "work_pool": {"name": "kiln", "work_queue_name": "normal"},
    })  # fmt: skip
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(project_file))
    deployed = subprocess.run([sys.executable, "-m", "kiln.cli", "deploy", "--file", str(path)], capture_output=True,
                              text=True, env={**os.environ, "KILN_HOME": HOME})  # fmt: skip
    assert deployed.returncode == 0, deployed.stderr
    assert f"batch_run/{deployment}: * * * * *" in deployed.stdout
    try:
        # the first tick is at the next minute
        job = wait_until(lambda: (http.get("/api/v1/jobs", params={"type": "batch_run"}).json()["jobs"] or [None])[-1],
                         timeout=100, interval=1, what="the scheduled batch run to become a job")  # fmt: skip
        job = wait_final(http, job["id"], timeout=120)
        assert job["input"]["source"] == str(source) and job["output"]["submitted"] == 4
        check_children_of(http, job, submitted=4)
        # the job is the Prefect run of the operator's deployment
        run = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{job['id']}", timeout=10).json()
        deployment_of_run = httpx.get(f"{SETTINGS.prefect_api}/deployments/{run['deployment_id']}", timeout=10).json()
        assert deployment_of_run["name"] == deployment and run["state"]["type"] == "COMPLETED"

    finally:
        asyncio.run(_delete_deployment(f"batch_run/{deployment}"))


async def _delete_deployment(name: str) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        deployment = await client.read_deployment_by_name(name)
        await client.delete_deployment(deployment.id)
