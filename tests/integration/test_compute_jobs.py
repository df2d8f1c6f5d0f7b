"""The GPU job API's container jobs (/api/v1/compute/jobs) against the real stack: a busybox plugin run as plugin_exec
jobs, answered in that API's job shape, cancelled with DELETE; the bodies kiln cannot run refused naming the field;
a PERSISTENT job of an MCP server image served as an mcp_host deployment until DELETE."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import datetime

import pytest

from tests.integration.support import JOB_TYPE_TESTS, SETTINGS, wait_until
from tests.integration.test_mcp_host import mcp_plugin  # noqa: F401  a fixture
from tests.sandbox.mcp_image import mcp_layout  # noqa: F401  a fixture
from tests.sandbox.python_image import python_layout  # noqa: F401  a fixture
from tests.sandbox.busybox_image import write_layout
from tests.sandbox.conftest import residue
from tests.unit.test_compute import DOCUMENT_JOB_FIELDS

pytestmark = JOB_TYPE_TESTS

# the plugin echoes its environment's GREETING, then runs what the job's RUN says
SCRIPT = 'echo "greeting=$GREETING"; eval "${RUN:-true}"'
SECRET = f"s3cr3t-{uuid.uuid4().hex}"


def kiln(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kiln.cli", *args], capture_output=True, text=True, timeout=180,
                          env=dict(os.environ))  # fmt: skip


@pytest.fixture(scope="module")
def container(stack, tmp_path_factory) -> str:
    """A busybox plugin running SCRIPT, with half a core and 64 MB unless a job asks for more."""
    name = f"container-{uuid.uuid4().hex[:6]}"
    layout = write_layout(tmp_path_factory.mktemp("image") / "layout")
    added = kiln("plugins", "add", name, "--image", str(layout), "--entrypoint", "sh", "--entrypoint", "-c",
                 "--arg", SCRIPT, "--cpus", "0.5", "--memory-mb", "64", "--pids", "32")  # fmt: skip
    assert added.returncode == 0, added.stderr
    yield name
    kiln("plugins", "remove", name)


def job_body(image: str, *, docker: dict | None = None, **fields) -> dict:
    return {"parameters": {"type": "docker", "parameters": {"image": image, **(docker or {})}},
            "title": "a container job", "task": "BATCH", "max_timeout_run_ms": 60000, **fields}  # fmt: skip


def ended(http, job_id: str, timeout: float = 90) -> dict:
    def final():
        job = http.get(f"/api/v1/compute/jobs/{job_id}").json()
        return job if job["status"] in ("COMPLETED", "FAILED", "CANCELLED") else None

    return wait_until(final, timeout=timeout, interval=0.2, what=f"compute job {job_id} to end")


def epoch_ms(text: str) -> int:
    return round(datetime.fromisoformat(text).timestamp() * 1000)


def test_a_container_job_runs_with_its_env_and_answers_in_the_documents_shape(http, container, idle):
    digest = next(p["image_digest"] for p in http.get("/api/v1/plugins").json() if p["name"] == container)
    body = job_body(container, docker={"tag": digest[7:19], "env": {"GREETING": "hello"}, "ports": []},
                    description="echoes its greeting", cpu_count=1, min_ram_gb=0.125)  # fmt: skip
    answer = http.post("/api/v1/compute/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert set(job) == DOCUMENT_JOB_FIELDS
    assert (job["object"], job["status"], job["task"], job["title"]) == ("job", "PENDING", "BATCH", "a container job")
    assert job["parameters"] == {"type": "docker", "parameters": {
        "image": container, "tag": digest[7:19], "env": {"GREETING": "hello"}, "ports": [], "allowed_ips": None,
        "host": None, "imagesrc": None, "secret": None, "sshkey": None, "user": None, "volumes": None}}  # fmt: skip
    assert (job["cpu_count"], job["min_ram_gb"], job["max_timeout_run_ms"], job["max_timeout_assign_ms"]) == (
        1, 0.125, 60000, 300000)
    assert job["timeout_assign_at_ms"] == epoch_ms(job["created_at"]) + 300000
    assert job["image_size_bytes"] > 100_000 and job["container_access_tokens"] == []

    done = ended(http, job["uuid"])
    assert done["status"] == "COMPLETED", done["status_reason"]
    assert done["started_at"] and done["completed_at"] and done["updated_at"] == done["completed_at"]
    assert {k: v for k, v in done.items() if k not in ("status", "updated_at", "started_at", "completed_at",
                                                       "status_reason")} == {
        k: v for k, v in job.items() if k not in ("status", "updated_at", "started_at", "completed_at",
                                                  "status_reason")}  # fmt: skip
    # an ordinary kiln job, run in Prefect
    kiln_job = http.get(f"/api/v1/jobs/{job['uuid']}").json()
    assert (kiln_job["type"], kiln_job["status"]) == ("plugin_exec", "completed")
    assert kiln_job["output"]["stdout"] == "greeting=hello\n" and kiln_job["output"]["image_digest"] == digest
    # the cores and memory asked for raise the plugin's 0.5 and 64 MB; max_timeout_run_ms is the wall time
    assert kiln_job["input"]["limits"] == {"cpus": 1.0, "memory_mb": 128, "wall_seconds": 60.0, "pids": None,
                                           "output_mb": None, "tmp_mb": None}  # fmt: skip
    assert kiln_job["output"]["limits"]["memory_mb"] == 128 and kiln_job["output"]["limits"]["pids"] == 32
    assert kiln_job["resources"]["cpu_count"] == 1 and kiln_job["resources"]["max_timeout_assign_ms"] == 300000
    assert kiln_job["flow_run_id"]

    newest = http.get("/api/v1/compute/jobs", params={"limit": 1}).json()
    assert [j["uuid"] for j in newest["jobs"]] == [job["uuid"]] and newest["jobs"][0]["status"] == "COMPLETED"


def test_only_jobs_submitted_this_way_are_compute_jobs(http, container, idle):
    plain = http.post("/api/v1/jobs", json={"type": "plugin_exec", "input": {"plugin": container}}).json()
    answer = http.get(f"/api/v1/compute/jobs/{plain['id']}")
    assert answer.status_code == 404 and f"GET /api/v1/jobs/{plain['id']}" in answer.json()["detail"]
    assert plain["id"] not in [j["uuid"] for j in http.get("/api/v1/compute/jobs").json()["jobs"]]
    assert http.get(f"/api/v1/compute/jobs/{uuid.uuid4()}").status_code == 404


def test_a_failing_container_fails_the_job_with_its_exit_code(http, container, idle):
    body = job_body(container, docker={"env": {"RUN": "echo 'no structure given' >&2; exit 3"}})
    job = ended(http, http.post("/api/v1/compute/jobs", json=body).json()["uuid"])
    assert job["status"] == "FAILED"
    assert job["status_reason"].startswith("exited with code 3") and "no structure given" in job["status_reason"]


def test_delete_cancels_a_running_container_job_and_kills_its_container(http, container, idle):
    body = job_body(container, docker={"env": {"RUN": "trap '' TERM; echo ready; while :; do sleep 1; done"}})
    job_id = http.post("/api/v1/compute/jobs", json=body).json()["uuid"]
    wait_until(lambda: http.get(f"/api/v1/compute/jobs/{job_id}").json()["status"] == "RUNNING", timeout=180,
               what="the container job to run")  # fmt: skip
    flow_run_id = http.get(f"/api/v1/jobs/{job_id}").json()["flow_run_id"]
    answer = http.delete(f"/api/v1/compute/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    assert answer.json()["uuid"] == job_id and answer.json()["status"] in ("RUNNING", "CANCELLED")
    job = ended(http, job_id, timeout=180)
    assert job["status"] == "CANCELLED" and job["completed_at"]
    wait_until(lambda: residue(flow_run_id, SETTINGS.sandbox_root) == [], timeout=10, what="the container to go")
    again = http.delete(f"/api/v1/compute/jobs/{job_id}")
    assert again.status_code == 409 and "already cancelled" in again.json()["detail"]


def test_bodies_kiln_cannot_run_are_refused_naming_the_field_and_never_stored(http, container):
    before = len(http.get("/api/v1/compute/jobs", params={"limit": 1000}).json()["jobs"])

    def refused(status: int, body: dict) -> dict:
        answer = http.post("/api/v1/compute/jobs", json=body)
        assert answer.status_code == status, answer.text
        return answer.json()

    unknown = refused(404, job_body("nvidia-cuda"))
    assert unknown["detail"].startswith("parameters.parameters.image: no plugin 'nvidia-cuda' is registered")
    assert container in unknown["detail"] and container in unknown["errors"][0]["registered"]
    assert "pulls nothing from a registry" in unknown["detail"]
    assert refused(404, job_body("nvidia/cuda:12.4"))["errors"][0]["loc"] == ["parameters", "parameters", "image"]
    tag = refused(404, job_body(container, docker={"tag": "12.4-runtime"}))
    assert tag["detail"].startswith(f"parameters.parameters.tag: the plugin {container!r} has one image, tagged "
                                    "'latest' and 'sha256:")  # fmt: skip
    ports = refused(400, job_body(container, docker={"ports": [8888]}))
    assert ports["detail"].startswith("parameters.parameters.ports: the sandbox has no network")
    other = refused(400, job_body(container) | {"parameters": {"type": "singularity",
                                                               "parameters": {"image": container}}})
    assert other["detail"].startswith("parameters.type: kiln runs 'docker' jobs only")
    short = refused(422, job_body(container, max_timeout_run_ms=1000))
    assert short["detail"] == "max_timeout_run_ms: Input should be greater than or equal to 60000"
    assert short["errors"][0]["loc"] == ["body", "max_timeout_run_ms"]
    # a secret is refused, and neither the answer nor any log of the stack shows it
    secret = refused(400, job_body(container, docker={"secret": SECRET, "sshkey": SECRET, "user": "root"}))
    assert [e["loc"][-1] for e in secret["errors"]] == ["secret", "sshkey", "user"]
    missing = job_body(container, docker={"secret": SECRET, "volumes": [{"secret": SECRET}]})
    del missing["title"]
    assert refused(422, missing)["detail"] == "title: Field required"
    refused(400, job_body("nvidia-cuda", docker={"secret": SECRET}))
    assert len(http.get("/api/v1/compute/jobs", params={"limit": 1000}).json()["jobs"]) == before
    logs = "".join(path.read_text(errors="replace") for path in (SETTINGS.home_dir / "logs").glob("*.log"))
    assert logs and SECRET not in logs


def test_a_body_that_is_not_json_is_refused_with_kilns_error_body(http):
    answer = http.post("/api/v1/compute/jobs", content=b"{not json", headers={"Content-Type": "application/json"})
    assert answer.status_code == 422 and set(answer.json()) == {"detail", "errors"}
    assert json.loads(answer.text)["detail"]


def test_a_persistent_container_serves_mcp_until_deleted_and_is_restarted_when_it_dies(http, api_key, mcp_plugin):
    body = job_body(mcp_plugin, task="PERSISTENT", docker={"env": {"GREETING": "hi"}}, min_ram_gb=0.125)
    answer = http.post("/api/v1/compute/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job = answer.json()
    try:
        serves_until_deleted(http, api_key, mcp_plugin, job)
    finally:  # a persistent job holds the worker's one service slot until it is cancelled
        http.delete(f"/api/v1/compute/jobs/{job['uuid']}")


def serves_until_deleted(http, api_key, mcp_plugin: str, job: dict) -> None:
    import asyncio
    import signal

    from tests.integration.test_mcp_host import server_in, session

    assert (job["task"], job["status"]) == ("PERSISTENT", "PENDING")
    (token,) = job["container_access_tokens"]
    assert token["type"] == "mcp" and token["url"] == f"{SETTINGS.api_url}/api/v1/mcp/{token['name']}/mcp"
    kiln_job = http.get(f"/api/v1/jobs/{job['uuid']}").json()
    assert (kiln_job["type"], kiln_job["input"]["server"]) == ("mcp_host", {"plugin": mcp_plugin})
    limits = {k: v for k, v in kiln_job["input"]["limits"].items() if v is not None}
    assert limits == {"memory_mb": 128} and kiln_job["resources"]["max_timeout_run_ms"] is None

    def serving():
        shown = http.get(f"/api/v1/compute/jobs/{job['uuid']}").json()
        return shown["status"] == "RUNNING" and shown["status_reason"] == "1 of 1 replica healthy"

    wait_until(serving, timeout=180, what="the persistent container to serve")

    async def use() -> tuple[dict, dict]:
        async with session(token["name"], api_key) as mcp:
            greeting = (await mcp.call_tool("getenv", {"name": "GREETING"})).structured_content
            return greeting, (await mcp.call_tool("whoami", {})).structured_content

    greeting, who = asyncio.run(use())
    assert greeting == {"value": "hi"} and who["uid"] == 65534
    flow_run_id = http.get(f"/api/v1/jobs/{job['uuid']}").json()["flow_run_id"]
    first = server_in(flow_run_id)
    os.kill(first, signal.SIGKILL)  # it dies: restarted, the job still RUNNING
    wait_until(lambda: server_in(flow_run_id) not in (None, first), timeout=180, what="a new container")
    wait_until(serving, timeout=180, what="serving again")
    assert asyncio.run(use())[0] == {"value": "hi"}

    deleted = http.delete(f"/api/v1/compute/jobs/{job['uuid']}")
    assert deleted.status_code == 200 and deleted.json()["status"] in ("RUNNING", "CANCELLED")
    assert ended(http, job["uuid"], timeout=180)["status"] == "CANCELLED"
    wait_until(lambda: residue(flow_run_id, SETTINGS.sandbox_root) == [], timeout=20, what="the container to go")
    gone = http.post(f"/api/v1/mcp/{token['name']}/mcp", json={"jsonrpc": "2.0", "id": 1, "method": "ping"})
    assert gone.status_code == 404
