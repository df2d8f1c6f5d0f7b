"""The GPU job API's container jobs mapped onto plugin_exec (BATCH) and mcp_host (PERSISTENT) jobs: the body taken
verbatim, what is refused and why, limits and resources, statuses, the job shape, and secrets never coming back."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from kiln.schemas import Job, JobStatus
from kiln.schemas.compute import (
    HIDDEN,
    RUN_GRACE_MS,
    STATUS_OF,
    ComputeJob,
    ComputeJobCreate,
    ComputeStatus,
    hide_secrets,
    tag_names,
)
from kiln.schemas.mcp_host import McpHostInput
from kiln.schemas.plugin_exec import PluginExecInput
from kiln.schemas.plugins import Limits

# the request body of the GPU job API's document (shared/seeds/004), as it gives it
DOCUMENT_BODY = {
    "parameters": {
        "parameters": {
            "allowed_ips": ["<string>"], "env": {}, "host": "<string>", "image": "<string>", "imagesrc": "<string>",
            "ports": [123], "secret": "<string>", "sshkey": "<string>", "tag": "<string>", "user": "<string>",
            "volumes": [{"image": "<string>", "mount": "<string>", "registry": "<string>", "secret": "<string>",
                         "tag": "<string>", "user": "<string>"}],
        },
        "type": "docker",
    },
    "title": "<string>", "max_timeout_run_ms": 900000, "task": "BATCH", "cpu_count": 4, "description": "<string>",
    "gpu_count": 1, "gpu_name": "NVIDIA RTX 4090", "gpu_registry_uuid": "01234567-89ab-cdef-0123-456789abcdef",
    "max_node_count": 1, "max_retry_count": 0, "max_timeout_assign_ms": 300000, "max_timeout_start_ms": 300000,
    "min_ram_gb": 0, "min_storage_gb": 0, "min_vram_gb": 0,
}  # fmt: skip
# the fields of the document's job (its response)
DOCUMENT_JOB_FIELDS = {
    "object", "created_at", "updated_at", "status", "task", "title", "cpu_count", "gpu_count", "min_ram_gb",
    "min_vram_gb", "min_storage_gb", "parameters", "timeout_assign_at_ms", "uuid", "started_at", "completed_at",
    "description", "gpu_name", "gpu_registry_uuid", "max_timeout_assign_ms", "max_timeout_run_ms",
    "max_timeout_start_ms", "max_retry_count", "max_node_count", "image_size_bytes", "container_access_tokens",
    "status_reason", "source_recipe_uuid",
}  # fmt: skip
DIGEST = "sha256:" + "ab12" * 16


def body(**fields) -> dict:
    docker = fields.pop("docker", {})
    return {"parameters": {"type": fields.pop("type", "docker"), "parameters": {"image": "shell", **docker}},
            "title": "t", "task": "BATCH", "max_timeout_run_ms": 60000, **fields}  # fmt: skip


def test_the_documents_body_is_taken_verbatim_and_each_field_kiln_cannot_honour_is_refused_naming_it():
    request = ComputeJobCreate.model_validate(DOCUMENT_BODY)
    refused = {".".join(r["loc"]): r["msg"] for r in request.refusals()}
    assert set(refused) == {f"parameters.parameters.{name}" for name in
                            ("allowed_ips", "ports", "host", "imagesrc", "secret", "sshkey", "user", "volumes")} | {
        "gpu_registry_uuid"}  # fmt: skip
    assert "no network" in refused["parameters.parameters.ports"]
    assert "uid 65534" in refused["parameters.parameters.user"]
    assert "registry" in refused["parameters.parameters.imagesrc"] and "registry" in refused["gpu_registry_uuid"]
    assert "<string>" not in " ".join(refused.values())


def test_every_field_of_the_documents_body_is_a_field_and_nothing_else_is_taken():
    assert set(ComputeJobCreate.model_fields) == set(DOCUMENT_BODY)
    with pytest.raises(ValidationError) as refused:
        ComputeJobCreate.model_validate(body(colour="red"))
    assert refused.value.errors()[0]["loc"] == ("colour",)


def test_empty_unhonourable_fields_are_no_refusal():
    request = ComputeJobCreate.model_validate(body(docker={"ports": [], "allowed_ips": [], "volumes": [], "host": None,
                                                           "secret": "", "env": {"A": "1"}}))  # fmt: skip
    assert request.refusals() == []


def test_another_type_is_refused_saying_why_and_a_persistent_task_is_not():
    (refusal,) = ComputeJobCreate.model_validate(body(type="kubernetes")).refusals()
    assert ".".join(refusal["loc"]) == "parameters.type" and "kiln runs 'docker' jobs only" in refusal["msg"]
    assert ComputeJobCreate.model_validate(body(task="PERSISTENT")).refusals() == []


@pytest.mark.parametrize("field, value", [
    ("max_timeout_run_ms", 1000), ("max_timeout_run_ms", 59999), ("max_timeout_assign_ms", 299999),
    ("max_timeout_start_ms", 119999), ("cpu_count", -1), ("gpu_count", -1), ("min_ram_gb", -0.5),
    ("min_vram_gb", -1), ("min_storage_gb", -1), ("max_retry_count", -1),
    # kiln's own bounds: the sandbox's cores, the retries kiln allows, a year
    ("cpu_count", 65), ("max_retry_count", 11), ("max_timeout_run_ms", 10**20), ("max_node_count", 0),
    ("task", "SOMETIMES"), ("cpu_count", 1.5), ("cpu_count", "4"),
])  # fmt: skip
def test_what_the_document_or_kiln_forbids_is_a_validation_error_naming_the_field(field, value):
    with pytest.raises(ValidationError) as refused:
        ComputeJobCreate.model_validate(body(**{field: value}))
    assert [e["loc"] for e in refused.value.errors()] == [(field,)]


def test_the_documents_minimums_are_taken():
    request = ComputeJobCreate.model_validate(body(max_timeout_run_ms=60000, max_timeout_assign_ms=300000,
                                                   max_timeout_start_ms=120000, cpu_count=4.0))  # fmt: skip
    assert request.cpu_count == 4


def test_a_request_becomes_a_plugin_exec_job_with_its_env_wall_time_and_resources():
    request = ComputeJobCreate.model_validate(body(docker={"env": {"GREETING": "hi"}}, max_timeout_run_ms=90000,
                                                   gpu_name="NVIDIA RTX 4090", min_storage_gb=2,
                                                   max_retry_count=2))  # fmt: skip
    job = request.kiln_job(Limits())
    assert job.type == "plugin_exec"
    run = PluginExecInput.model_validate(job.input)  # what read_job will check it against
    assert (run.plugin, run.env, run.args, run.input) == ("shell", {"GREETING": "hi"}, None, None)
    assert run.limits.model_dump(exclude_none=True) == {"wall_seconds": 90.0}
    resources = job.resources
    assert (resources.gpu_name, resources.min_storage_gb, resources.max_retry_count) == ("NVIDIA RTX 4090", 2, 2)
    assert (resources.max_timeout_assign_ms, resources.max_timeout_start_ms) == (300000, 300000)
    # the flow's timeout is a backstop past the container's own wall time
    assert resources.max_timeout_run_ms == 90000 + RUN_GRACE_MS


@pytest.mark.parametrize("cpu_count, min_ram_gb, plugin, limits", [
    (0, 0, Limits(cpus=2, memory_mb=512), {}),
    (4, 1.5, Limits(cpus=1, memory_mb=512), {"cpus": 4.0, "memory_mb": 1536}),
    # a minimum never lowers the plugin's limit
    (1, 0.25, Limits(cpus=2, memory_mb=512), {"cpus": 2.0, "memory_mb": 512}),
    (0, 0.001, Limits(memory_mb=64), {"memory_mb": 64}),
])  # fmt: skip
def test_cores_and_memory_asked_for_raise_the_plugins_limits_and_never_lower_them(cpu_count, min_ram_gb, plugin,
                                                                                  limits):  # fmt: skip
    for task in ("BATCH", "PERSISTENT"):
        request = ComputeJobCreate.model_validate(body(cpu_count=cpu_count, min_ram_gb=min_ram_gb, task=task))
        job = request.kiln_job(plugin)
        assert {k: v for k, v in job.input["limits"].items() if k != "wall_seconds"} == limits
        assert (job.resources.cpu_count, job.resources.min_ram_gb) == (cpu_count, min_ram_gb)


def test_a_persistent_request_becomes_an_mcp_host_deployment_of_its_image_with_no_run_timeout():
    request = ComputeJobCreate.model_validate(body(task="PERSISTENT", docker={"env": {"GREETING": "hi"}},
                                                   max_timeout_run_ms=90000, max_retry_count=1))  # fmt: skip
    job = request.kiln_job(Limits())
    assert job.type == "mcp_host"
    served = McpHostInput.model_validate(job.input)  # what read_job will check it against
    assert served.server.plugin == "shell" and served.transport == "stdio" and served.env == {"GREETING": "hi"}
    assert re.fullmatch(r"shell-[0-9a-f]{6}", served.name)
    assert served.limits.model_dump(exclude_none=True) == {}  # no wall time: it serves until cancelled
    assert job.resources.max_timeout_run_ms is None and job.resources.max_retry_count == 1
    assert request.kiln_job(Limits()).input["name"] != served.name  # two never share a URL
    long = ComputeJobCreate.model_validate(body(task="PERSISTENT", docker={"image": "a" * 63})).kiln_job(Limits())
    assert McpHostInput.model_validate(long.input).name.startswith("a" * 56 + "-")


@pytest.mark.parametrize("tag, names", [
    (None, True), ("latest", True), (DIGEST, True), (DIGEST[7:], True), (DIGEST[7:19], True),
    ("sha256:" + DIGEST[7:19], True), (DIGEST[7:18], False), ("v1.2", False), ("cd34" * 16, False),
    ("sha256:" + "cd34" * 16, False), ("", False), ("LATEST", False),
])  # fmt: skip
def test_a_tag_names_the_plugins_image_by_latest_or_its_digest(tag, names):
    assert tag_names(tag, DIGEST) is names


def test_secrets_are_hidden_at_any_depth_and_nothing_else_is():
    given = {"image": "x", "secret": "s3cr3t", "sshkey": "ssh-ed25519 AAAA", "env": {"secret": "shown-as-env"},
             "volumes": [{"secret": "v0l", "tag": "t"}], "user": None}  # fmt: skip
    hidden = hide_secrets(given)
    assert "s3cr3t" not in str(hidden) and "AAAA" not in str(hidden) and "v0l" not in str(hidden)
    assert hidden["secret"] == hidden["sshkey"] == hidden["volumes"][0]["secret"] == HIDDEN
    assert hidden["volumes"][0]["tag"] == "t" and hidden["user"] is None
    assert hide_secrets("s3cr3t", "secret") == HIDDEN and hide_secrets("", "secret") == ""
    # even an environment variable called `secret`: one hidden too many rather than one shown
    assert hidden["env"] == {"secret": HIDDEN}


def test_every_kiln_status_has_its_status_in_the_document():
    assert set(STATUS_OF) == set(JobStatus)
    assert STATUS_OF[JobStatus.QUEUED] is ComputeStatus.ASSIGNED
    assert STATUS_OF[JobStatus.MERGING] is ComputeStatus.RUNNING
    assert {s.value for s in ComputeStatus} == {"PENDING", "ASSIGNED", "RUNNING", "COMPLETED", "CANCELLED", "FAILED"}


def kiln_job(status: JobStatus, **fields) -> Job:
    created = datetime(2026, 12, 1, 12, 0, 0, tzinfo=UTC)
    return Job(id="j1", type="plugin_exec", project_id="p", status=status, priority=0, input={}, resources={},
               created_at=created, **fields)  # fmt: skip


def test_a_job_has_every_field_of_the_documents_job_and_echoes_the_request():
    request = ComputeJobCreate.model_validate(body(docker={"env": {"A": "1"}}, description="d", gpu_count=1))
    started = datetime(2026, 12, 1, 12, 0, 5, tzinfo=UTC)
    job = ComputeJob.of(kiln_job(JobStatus.FAILED, started_at=started, completed_at=started.replace(second=9),
                                 status_reason="exited with code 3: boom"),
                        request.record(DIGEST, 4096))  # fmt: skip
    shown = job.model_dump(mode="json")
    assert set(shown) == DOCUMENT_JOB_FIELDS
    assert (shown["object"], shown["uuid"], shown["status"], shown["status_reason"]) == (
        "job", "j1", "FAILED", "exited with code 3: boom")
    assert shown["timeout_assign_at_ms"] == round(datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp() * 1000) + 300000
    assert shown["updated_at"] == shown["completed_at"] == "2026-12-01T12:00:09.000000+00:00"
    assert (shown["title"], shown["description"], shown["task"], shown["gpu_count"]) == ("t", "d", "BATCH", 1)
    assert shown["max_timeout_run_ms"] == 60000  # as given, not the flow's timeout
    assert shown["parameters"]["parameters"]["env"] == {"A": "1"} and shown["parameters"]["type"] == "docker"
    assert shown["image_size_bytes"] == 4096
    assert shown["container_access_tokens"] == [] and shown["source_recipe_uuid"] is None
    pending = ComputeJob.of(kiln_job(JobStatus.PENDING), request.record(DIGEST, None)).model_dump(mode="json")
    assert pending["updated_at"] == pending["created_at"] and pending["started_at"] is None


def test_a_persistent_job_gives_its_mcp_endpoint_as_its_access_token():
    request = ComputeJobCreate.model_validate(body(task="PERSISTENT"))
    served = Job(id="j2", type="mcp_host", project_id="p", status=JobStatus.RUNNING, priority=0, resources={},
                 input={"name": "shell-a1b2c3"}, created_at=datetime(2026, 12, 1, tzinfo=UTC),
                 status_reason="1 of 1 replica healthy")  # fmt: skip
    shown = ComputeJob.of(served, request.record(DIGEST, None), "http://kiln:8000/").model_dump(mode="json")
    assert (shown["task"], shown["status"], shown["status_reason"]) == ("PERSISTENT", "RUNNING",
                                                                        "1 of 1 replica healthy")  # fmt: skip
    assert shown["container_access_tokens"] == [{"type": "mcp", "name": "shell-a1b2c3",
                                                 "url": "http://kiln:8000/api/v1/mcp/shell-a1b2c3/mcp"}]  # fmt: skip


def test_what_is_kept_of_a_request_has_no_secret():
    request = ComputeJobCreate.model_validate(body(docker={"secret": "s3cr3t", "sshkey": "ssh-rsa KEY"}))
    kept = request.record(DIGEST, None)
    assert "s3cr3t" not in str(kept) and "KEY" not in str(kept)
    assert ComputeJob.of(kiln_job(JobStatus.PENDING), kept).parameters.parameters.secret == HIDDEN


@pytest.fixture(scope="module")
def api():
    from kiln.api.app import create_app
    from kiln.api.auth import project_of_caller

    app = create_app()
    # the body is refused before anything reads the job index: no stack is needed
    app.dependency_overrides[project_of_caller] = lambda: "p"
    return TestClient(app, raise_server_exceptions=False)


@pytest.mark.parametrize("refused", [
    # pydantic reports a missing field with the whole object it is missing from
    {k: v for k, v in body(docker={"secret": "s3cr3t", "sshkey": "ssh-rsa KEY"}).items() if k != "title"},
    body(docker={"secret": ["s3cr3t"], "sshkey": {"KEY": 1}}),
    body(docker={"secret": "s3cr3t", "sshkey": "ssh-rsa KEY"}, max_timeout_run_ms=1000),
    {"parameters": {"type": "docker", "parameters": {"secret": "s3cr3t", "sshkey": "ssh-rsa KEY",
                                                     "volumes": [{"secret": "s3cr3t", "mount": 3}]}}},
])  # fmt: skip
def test_a_refused_body_never_echoes_its_secrets(api, refused):
    answer = api.post("/api/v1/compute/jobs", json=refused)
    assert answer.status_code == 422, answer.text
    assert answer.json()["detail"] and answer.json()["errors"]
    assert "s3cr3t" not in answer.text and "KEY" not in answer.text


def test_a_refused_body_still_names_the_field(api):
    answer = api.post("/api/v1/compute/jobs", json=body(max_timeout_run_ms=1000))
    assert answer.status_code == 422
    assert answer.json()["detail"] == "max_timeout_run_ms: Input should be greater than or equal to 60000"


def test_the_openapi_document_states_the_body_and_the_job(api):
    document = api.app.openapi()
    operation = document["paths"]["/api/v1/compute/jobs"]["post"]
    schemas = document["components"]["schemas"]
    request = schemas[operation["requestBody"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert set(request["properties"]) == set(DOCUMENT_BODY)
    assert request["properties"]["max_timeout_run_ms"]["minimum"] == 60000
    assert set(schemas["ComputeJob"]["properties"]) == DOCUMENT_JOB_FIELDS
    assert {"400", "404", "422", "429"} <= set(operation["responses"])
    assert "delete" in document["paths"]["/api/v1/compute/jobs/{job_id}"]
    for schema in ("ComputeJobCreate", "DockerParameters", "ContainerParameters", "Volume", "ComputeJob"):
        assert all(field.get("description") for field in schemas[schema]["properties"].values()), schema
