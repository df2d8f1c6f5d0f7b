"""The jobs API against the real stack: submit, read, list, patch, auth, and errors that name the field."""

from __future__ import annotations

import re

import httpx
import pytest

import subprocess
import sys

from tests.integration.support import SETTINGS, create_key, flow_run_state, wait_final, wait_until

ISO_MICROS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}\+00:00$")


def test_a_sleep_job_submitted_over_http_completes_with_its_output(http):
    response = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0.2}})
    assert response.status_code == 202
    job = response.json()
    assert job["status"] == "pending" and job["type"] == "sleep" and job["priority"] == 0
    done = wait_final(http, job["id"])
    assert done["status"] == "completed", done["status_reason"]
    assert done["output"] == {"slept_seconds": 0.2, "children": 0}
    for field in ("created_at", "queued_at", "started_at", "completed_at"):
        assert ISO_MICROS.match(done[field]), (field, done[field])
    assert done["created_at"] <= done["queued_at"] <= done["started_at"] <= done["completed_at"]
    assert done["flow_run_url"].endswith(f"/runs/flow-run/{done['flow_run_id']}")
    assert flow_run_state(done["flow_run_id"]) == "COMPLETED"


def test_the_flow_run_is_named_and_tagged_for_the_prefect_ui(http):
    # the key's project is `alpha`; a job may name its project by name as well as by id
    body = {"type": "sleep", "input": {"seconds": 0}, "priority": 12, "project_id": "alpha"}
    job = http.post("/api/v1/jobs", json=body).json()
    done = wait_final(http, job["id"])
    run = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{done['flow_run_id']}").json()
    assert run["name"] == f"sleep-{job['id'][:8]}"
    assert {f"job:{job['id']}", "project:alpha", "type:sleep"} <= set(run["tags"])
    by_id = http.post("/api/v1/jobs", json={**body, "project_id": job["project_id"]})
    assert by_id.status_code == 202
    other = http.post("/api/v1/jobs", json={**body, "project_id": "beta"})
    assert other.status_code == 404 and other.json()["detail"] == "project_id: project beta not found"
    assert run["work_queue_name"] == "high"
    assert run["parameters"] == {"input": {"seconds": 0.0, "children": 0, "fail": False}}


def test_unknown_type_is_a_400_naming_the_available_types(http):
    response = http.post("/api/v1/jobs", json={"type": "warp_drive", "input": {}})
    assert response.status_code == 400
    assert "unknown job type 'warp_drive'" in response.json()["detail"]
    assert "sleep" in response.json()["detail"]


@pytest.mark.parametrize(
    "body, field",
    [
        ({"type": "sleep", "input": {"seconds": -1}}, "input.seconds"),
        ({"type": "sleep", "input": {}}, "input.seconds"),
        ({"type": "sleep", "input": {"seconds": 1, "colour": "red"}}, "input.colour"),
        ({"type": "sleep", "input": {"seconds": 1}, "priority": "high"}, "priority"),
        ({"type": "sleep", "input": {"seconds": 1}, "resources": {"gpu_count": -1}}, "resources.gpu_count"),
        ({"type": "sleep", "input": {"seconds": 1}, "resources": {"max_timeout_assign_ms": 5}}, "resources.max_timeout_assign_ms"),
    ],
)
def test_bad_input_is_a_422_naming_the_field(http, body, field):
    before = len(http.get("/api/v1/jobs", params={"limit": 1000}).json()["jobs"])
    response = http.post("/api/v1/jobs", json=body)
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith(field + ":"), response.json()["detail"]
    assert len(http.get("/api/v1/jobs", params={"limit": 1000}).json()["jobs"]) == before


def test_every_endpoint_but_healthz_needs_a_key():
    assert httpx.get(f"{SETTINGS.api_url}/healthz").status_code == 200
    response = httpx.get(f"{SETTINGS.api_url}/api/v1/jobs")
    assert response.status_code == 401 and "Bearer" in response.json()["detail"]
    bad = httpx.get(f"{SETTINGS.api_url}/api/v1/jobs", headers={"Authorization": "Bearer kiln_nope"})
    assert bad.status_code == 401


def test_a_key_never_sees_another_projects_jobs(http, other_key):
    job = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}}).json()
    other = httpx.Client(base_url=SETTINGS.api_url, headers={"Authorization": f"Bearer {other_key}"})
    for method, path in [
        ("GET", f"/api/v1/jobs/{job['id']}"),
        ("POST", f"/api/v1/jobs/{job['id']}/cancel"),
        ("GET", f"/api/v1/jobs/{job['id']}/children"),
        ("GET", f"/api/v1/jobs/{job['id']}/events"),
    ]:
        assert other.request(method, path).status_code == 404, path
    assert job["id"] not in [j["id"] for j in other.get("/api/v1/jobs").json()["jobs"]]
    foreign = other.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}, "project_id": job["project_id"]})
    assert foreign.status_code == 404
    wait_final(http, job["id"])


def test_a_revoked_key_is_refused(stack):
    key = create_key("gamma")
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{SETTINGS.api_url}/api/v1/jobs", headers=headers).status_code == 200
    subprocess.run([sys.executable, "-m", "kiln.cli", "keys", "revoke", key], check=True, capture_output=True)
    assert httpx.get(f"{SETTINGS.api_url}/api/v1/jobs", headers=headers).status_code == 401


def test_listing_filters_and_pages_newest_first(http):
    ids = [http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}}).json()["id"] for _ in range(5)]
    for job_id in ids:
        wait_final(http, job_id)
    page = http.get("/api/v1/jobs", params={"limit": 2, "type": "sleep"}).json()
    assert [j["id"] for j in page["jobs"]] == ids[::-1][:2]
    seen = [j["id"] for j in page["jobs"]]
    while page["next_cursor"] and len(seen) < 5:
        page = http.get("/api/v1/jobs", params={"limit": 2, "cursor": page["next_cursor"]}).json()
        seen += [j["id"] for j in page["jobs"]]
    assert seen[:5] == ids[::-1]
    completed = http.get("/api/v1/jobs", params={"status": "completed", "limit": 1000}).json()["jobs"]
    assert set(ids) <= {j["id"] for j in completed}
    assert http.get("/api/v1/jobs", params={"status": "exploded"}).status_code == 422


def test_a_pending_job_says_why_it_waits_and_can_change_priority(http, idle):
    blocker = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 3}}).json()
    wait_until(lambda: http.get(f"/api/v1/jobs/{blocker['id']}").json()["status"] == "running", what="blocker running")
    # released ahead of the busy slot (KILN_RELEASE_AHEAD: one here), this one takes it next, and says so
    ahead = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}}).json()
    wait_until(lambda: http.get(f"/api/v1/jobs/{ahead['id']}").json()["flow_run_id"], what="a job released ahead")
    assert http.get(f"/api/v1/jobs/{ahead['id']}").json()["status"] == "queued"
    waiting = http.post("/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}, "priority": 5}).json()
    assert waiting["status"] == "pending"
    assert waiting["status_reason"] == (
        "0 jobs ahead at priority ≥ 5; 1 of 1 worker slots busy and 1 job released to take the next free one"
    )
    patched = http.patch(f"/api/v1/jobs/{waiting['id']}", json={"priority": 7})
    assert patched.status_code == 200 and patched.json()["priority"] == 7
    gpu = http.post(
        "/api/v1/jobs", json={"type": "sleep", "input": {"seconds": 0}, "resources": {"gpu_count": 1}}
    ).json()
    assert gpu["status_reason"] == "no worker offers gpu_count=1"
    http.post(f"/api/v1/jobs/{gpu['id']}/cancel")
    wait_final(http, waiting["id"])
    late = http.patch(f"/api/v1/jobs/{waiting['id']}", json={"priority": 1})
    assert late.status_code == 409 and "only a pending job" in late.json()["detail"]


def test_job_types_are_listed_with_their_input_schemas(http):
    types = {t["type"]: t for t in http.get("/api/v1/job-types").json()}
    assert types["sleep"]["available"] is True
    assert types["sleep"]["input_schema"]["required"] == ["seconds"]
    assert http.get("/openapi.json").json()["paths"]["/api/v1/jobs"]["post"]


def test_a_job_type_from_another_package_registers_through_the_entry_point_group_and_runs(http):
    # tests/fixtures/echo_job_type: a package of its own, installed beside the stack (conftest), no kiln edit
    types = {t["type"]: t for t in http.get("/api/v1/job-types").json()}
    assert types["echo"]["available"] and types["echo"]["input_schema"]["properties"]["message"]["description"]
    job = http.post("/api/v1/jobs", json={"type": "echo", "input": {"message": "hi", "times": 3}}).json()
    done = wait_final(http, job["id"])
    assert done["status"] == "completed" and done["output"] == {"echo": "hi hi hi"}
    run = httpx.get(f"{SETTINGS.prefect_api}/flow_runs/{done['flow_run_id']}").json()
    assert "type:echo" in run["tags"]
    refused = http.post("/api/v1/jobs", json={"type": "echo", "input": {"message": ""}})
    assert refused.status_code == 422 and "input.message" in refused.json()["detail"]
